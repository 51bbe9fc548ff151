"""The run plan: experiments from the grid, shared teacher artifacts, lineage, stage ids and who consumes what.

The Snakefile, the roll-up and the tests all read the same plan, so the accounting (which teacher stages and which
upstream checkpoints each student is charged for) can never drift from the DAG that was run.
"""
from __future__ import annotations

import copy
import hashlib
import itertools
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from distill_bench.config.load import SECTIONS, ConfigError
from distill_bench.defaults import KERNEL_KEYS
from distill_bench.models.vocab import vocabulary_hash_from_files
from distill_bench.synthetic.ids import generation_shard_key, synthetic_artifact_id

# datasets whose eval split has a verifiable final answer, scored by exact match on their own held-out split
VERIFIABLE_SOURCES = {"embedded", "openr1_math", "gsm8k"}
# pipelines that start from an earlier experiment's model, and the section naming it
LINEAGE_KEY = {"dpo": ("dpo", "start_from"), "selfdistill": ("selfdistill", "from"),
               "continued": ("selfdistill", "from")}


# A stage's identity, in one place: the workflow rule that runs it -> its stage id over the rule's wildcards. The
# plan lists stages by these ids, the rules derive their energy JSON, log and benchmark paths from them
# (rules/common.smk), the stage adapter reads the id back from the energy JSON's name, and the roll-up charges by
# them. The role lives in the stage registry (distill_bench.stages).
STAGE_IDS: dict[str, str] = {
    "prepare_data": "data.prepare.{dataset}",
    "prepare_tokenizer": "setup.tokenizer",
    "prepare_teacher": "setup.teacher",
    "init_student": "setup.init.{student}",
    "cache_logits": "teacher.logits.{artifact}",
    "cache_tail": "teacher.tail.{artifact}",
    "generate_synthetic": "teacher.generate.{shard_key}.shard{shard}of{nshards}",
    "merge_synthetic": "teacher.merge.{artifact}",
    "sample_preferences": "teacher.sample.{artifact}",
    "judge_preferences": "teacher.judge.{artifact}",
    "precompute_reference": "student.reference.{exp}",
    "train_student": "student.train.{exp}",
    "evaluate": "eval.{model_id}.{eval_name}",
}


def stage_id(rule: str, **wildcards: Any) -> str:
    """The stage id of ``rule``'s job for ``wildcards`` (e.g. ``stage_id("train_student", exp="kd.tiny.arith")``)."""
    return STAGE_IDS[rule].format(**wildcards)


def stage_id_from_energy_json(path: Any) -> str:
    """The stage id a stage JSON is named after (``<results>/energy/<stage id>.json``): the stage adapter and the
    roll-up read it back from the path the rule declared, so no rule spells it a second time."""
    name = str(path).replace("\\", "/").rsplit("/", 1)[-1]
    if not name.endswith(".json"):
        raise ValueError(f"stage JSON {str(path)!r} does not end in .json")
    return name[: -len(".json")]


def stable_hash(obj: Any, n: int = 8) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value).replace("/", "_")


def _set_dotted(section: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = section
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def _deep_merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def seed_suffix(seed: int) -> str:
    """The last component of a seeded experiment id: ``kd.tiny.arith.temperature-2.s1`` trains with seed 1."""
    return f"s{int(seed)}"


@dataclass
class Experiment:
    id: str                                  # group id + "." + seed suffix
    pipeline: str                            # what the table shows: sft_gt, kd, sft, dpo, selfdistill, continued
    student: str
    dataset: str
    variant: dict[str, Any]
    sections: dict[str, dict]
    trainer: str = ""                        # the training machinery: sft_gt, kd, sft or dpo
    artifact: str | None = None              # the shared teacher artifact this experiment consumes
    tail_artifact: str | None = None         # KD: the tail at this student's tau, when the cache does not hold it
    init_from: str | None = None             # experiment whose final model this one starts from (else the init)
    lineage: list[str] = field(default_factory=list)   # earlier experiments this one builds on, nearest first
    seed: int = 0                            # the student's training seed (one of config 'seeds')
    group: str = ""                          # the id without its seed: the table's row, the seeds its replicates

    @property
    def training(self) -> dict:
        return self.sections["training"]


@dataclass
class Artifact:
    id: str
    kind: str                                # logits | logit_tail | synthetic | preferences
    dataset: str
    params: dict
    stage_ids: list[str]
    teacher: str = "teacher"                 # model id of the model that produces it (teacher or an experiment)
    consumers: list[str] = field(default_factory=list)
    shard_key: str | None = None             # synthetic: generation shards shared across filter settings
    sources: dict[str, str] = field(default_factory=dict)   # preferences: sample source label -> model id
    judge_model: str | None = None           # preferences: model id or path of the judge (None: no model)
    base: str | None = None                  # logit_tail: the logit cache artifact it adds one temperature to


@dataclass
class Plan:
    config: dict
    experiments: dict[str, Experiment]
    artifacts: dict[str, Artifact]
    eval_units: list[tuple[str, str]]        # (model_id, eval_name): eval_name is a dataset or an lm-eval task

    def setup_stage_ids(self) -> list[str]:
        ids = [stage_id("prepare_data", dataset=d) for d in self.config["datasets"]]
        ids += [stage_id("prepare_tokenizer")] if self.uses_run_tokenizer() else []
        ids += [stage_id("prepare_teacher")]
        ids += [stage_id("init_student", student=s) for s in self.used_students()]
        return ids

    def groups(self) -> dict[str, list[str]]:
        """Group id (an experiment without its seed) -> its seeded experiment ids, in config seed order."""
        out: dict[str, list[str]] = {}
        for exp in self.experiments.values():
            out.setdefault(exp.group, []).append(exp.id)
        return out

    def used_students(self) -> list[str]:
        return sorted({e.student for e in self.experiments.values()})

    def all_stage_ids(self) -> list[str]:
        ids = self.setup_stage_ids()
        for art in self.artifacts.values():
            ids += art.stage_ids
        ids += [stage_id("train_student", exp=e) for e in self.experiments]
        ids += [reference_stage_id(e) for e in self.experiments.values() if reference_stage_id(e)]
        ids += [eval_stage_id(m, d) for m, d in self.eval_units]
        return ids

    def tokenizer_of(self, model_id: str) -> str | None:
        """None when ``model_id`` uses the run's tokenizer (results/tokenizer), else its own tokenizer's id/path."""
        return model_tokenizer(self.config, self.experiments, model_id)

    def uses_run_tokenizer(self) -> bool:
        """Whether any model of the run needs results/tokenizer (trained, or copied from tokenizer.source)."""
        models = ["teacher"] + [f"init.{s}" for s in self.used_students()]
        return any(self.tokenizer_of(m) is None for m in models)

    def checkpoint_consumers(self) -> dict[str, list[str]]:
        """Experiment id -> the experiments that build on its model (directly or further down the lineage)."""
        out: dict[str, list[str]] = {}
        for exp in self.experiments.values():
            for upstream in exp.lineage:
                out.setdefault(upstream, []).append(exp.id)
        return out

    def to_dict(self) -> dict:
        return {
            "run_name": self.config["run_name"],
            "seeds": list(self.config["seeds"]),
            "groups": self.groups(),
            "experiments": {k: asdict(v) for k, v in self.experiments.items()},
            "artifacts": {k: asdict(v) for k, v in self.artifacts.items()},
            "checkpoint_consumers": self.checkpoint_consumers(),
            "eval_units": [list(u) for u in self.eval_units],
            "stage_ids": self.all_stage_ids(),
        }


def reference_stage_id(exp: Experiment) -> str | None:
    """DPO with precomputed reference log-probs: that forward pass is its own metered stage."""
    if exp.trainer == "dpo" and exp.sections["dpo"]["precompute_ref_logprobs"]:
        return stage_id("precompute_reference", exp=exp.id)
    return None


def eval_stage_id(model_id: str, dataset: str) -> str:
    return stage_id("evaluate", model_id=model_id, eval_name=dataset)


def model_tokenizer(cfg: dict, experiments: dict[str, Experiment], model_id: str) -> str | None:
    """The tokenizer a model reads and writes text with: None = the run's tokenizer (``tokenizer.source``, the one
    trained for the embedded task), which every model built from an ``arch`` uses; a pretrained model uses its own
    (``name_or_path``) unless its ``tokenizer`` key names another (e.g. the instruct variant's, for a base model
    without a chat template). A trained experiment keeps its student's."""
    if model_id == "teacher":
        spec = cfg["teacher"]
        pretrained = spec.get("source") == "pretrained"
    else:
        student = model_id[len("init."):] if model_id.startswith("init.") else experiments[model_id].student
        spec = cfg["students"][student]
        pretrained = spec.get("init") == "pretrained"
    if spec.get("tokenizer"):
        return spec["tokenizer"]
    return spec.get("name_or_path") if pretrained else None


def _tokenizer_label(cfg: dict, experiments: dict[str, Experiment], model_id: str) -> str:
    ref = model_tokenizer(cfg, experiments, model_id)
    if ref is not None:
        return ref
    source = cfg["tokenizer"]["source"]
    return "the run's trained tokenizer" if source == "train" else source


def check_kd_vocabularies(cfg: dict, experiments: dict[str, Experiment], artifacts: dict[str, Artifact]) -> None:
    """Refuse a KD experiment whose teacher and student vocabularies differ, where both are readable locally
    (a directory or the HF cache); otherwise the train stage compares them before it trains (kd/trainer.py)."""
    run_source = cfg["tokenizer"]["source"]
    for art in artifacts.values():
        if art.kind != "logits":
            continue
        for consumer in art.consumers:
            student = f"init.{experiments[consumer].student}"
            refs = []
            for model_id in (art.teacher, student):
                ref = model_tokenizer(cfg, experiments, model_id)
                refs.append(ref if ref is not None else (None if run_source == "train" else run_source))
            if refs[0] == refs[1] and refs[0] is not None or refs == [None, None]:
                continue  # one tokenizer: the same id/path, or both the run's
            hashes = [vocabulary_hash_from_files(r) for r in refs]
            if None in hashes or hashes[0] == hashes[1]:
                continue
            names = [_tokenizer_label(cfg, experiments, m) for m in (art.teacher, student)]
            raise ConfigError(
                f"experiment {consumer!r} (pipeline kd): logit distillation needs one vocabulary, but the teacher "
                f"{art.teacher!r} uses tokenizer {names[0]!r} (vocabulary hash {hashes[0][:12]}) and student "
                f"{experiments[consumer].student!r} uses {names[1]!r} (vocabulary hash {hashes[1][:12]}); "
                f"distil across vocabularies with the text pipelines (sft, dpo) instead, or pick a student of the "
                f"teacher's family")


# teacher.train keys that replace the student protocol's training.* for the embedded teacher (token_budget is
# always replaced, by teacher.train.tokens)
TEACHER_TRAIN_KEYS = ("lr", "batch_size", "grad_accum", "warmup_ratio", "weight_decay", "lr_scheduler")


def teacher_training(cfg: dict) -> dict | None:
    """The training.* settings the embedded teacher is trained with (those teacher.train does not replace); None for
    a pretrained teacher. What prepare_teacher gets, so a student-only change never retrains the teacher."""
    t = cfg["teacher"]
    if t["source"] != "train":
        return None
    replaced = {"token_budget", *(k for k in TEACHER_TRAIN_KEYS if k in t["train"])}
    return {k: v for k, v in cfg["training"].items() if k not in replaced}


def _base_teacher_identity(cfg: dict) -> dict:
    t = cfg["teacher"]
    if t["source"] == "pretrained":
        own = {"own_tokenizer": t["tokenizer"]} if t.get("tokenizer") else {}
        return {"source": "pretrained", "name_or_path": t["name_or_path"], "tokenizer": cfg["tokenizer"], **own}
    return {"source": "train", "arch": t.get("arch"), "train": t["train"], "training": teacher_training(cfg),
            "tokenizer": cfg["tokenizer"], "datasets": cfg["datasets"], "seed": cfg["seed"]}


# config sections a student's weights depend on, by trainer (training always): an eval setting, or another
# pipeline's section, changes nothing an artifact built from this student could see
TRAINER_SECTIONS = {"sft_gt": (), "kd": ("kd",), "sft": ("synthetic",), "dpo": ("dpo",)}


def _model_identity(cfg: dict, experiments: dict[str, Experiment], model_id: str) -> Any:
    """What determines a model's weights: the configured teacher, or an experiment and everything upstream of it."""
    if model_id == "teacher":
        return _base_teacher_identity(cfg)
    exp = experiments[model_id]
    sections = {s: {k: v for k, v in exp.sections[s].items() if k not in KERNEL_KEYS}
                for s in ("training", *TRAINER_SECTIONS[exp.trainer])}
    return {"experiment": exp.id, "trainer": exp.trainer, "sections": sections,
            "student": cfg["students"][exp.student], "dataset": cfg["datasets"][exp.dataset],
            "upstream": [_model_identity(cfg, experiments, u) for u in exp.lineage[:1]], "seed": exp.seed}


def _student_teacher_label(exp: Experiment) -> str:
    """Name of an artifact an earlier student produces (self-distillation): its pipeline and seed."""
    return f"{exp.dataset}-from-{exp.lineage[0].split('.')[0]}-{seed_suffix(exp.seed)}"


def _logits_artifact(cfg: dict, exp: Experiment, teacher: str, identity: Any) -> Artifact:
    kd = exp.sections["kd"]
    params = {"top_k": kd["top_k"], "value_dtype": kd["value_dtype"], "batch_size": kd["batch_size"],
              "cache_shards": kd["cache_shards"], "max_length": exp.training["max_length"]}
    ident = {"teacher": identity, "dataset": cfg["datasets"][exp.dataset], **params}
    # temperatures precomputed in the cache's own pass (kd.cache_temperatures); any other tau is its own tail artifact
    params["cache_temperatures"] = sorted({float(t) for t in kd["cache_temperatures"]} - {1.0})
    prefix = exp.dataset if teacher == "teacher" else _student_teacher_label(exp)
    art_id = f"{prefix}-k{kd['top_k']}-{kd['value_dtype']}-{stable_hash(ident, 6)}"
    return Artifact(id=art_id, kind="logits", dataset=exp.dataset, params=params,
                    stage_ids=[stage_id("cache_logits", artifact=art_id)], teacher=teacher)


def _tail_artifact(cfg: dict, exp: Experiment, cache: Artifact) -> Artifact | None:
    """The exact tail at this KD student's tau, unless the cache's own pass computed it: adding a tau to a sweep
    then costs one teacher pass for that tau's tail, and nothing else upstream."""
    tau = float(exp.sections["kd"]["temperature"])
    if tau == 1.0 or tau in cache.params["cache_temperatures"]:
        return None
    art_id = f"{cache.id}-tau{_fmt(tau)}"
    params = {"temperature": tau, "batch_size": cache.params["batch_size"], "max_length": cache.params["max_length"]}
    return Artifact(id=art_id, kind="logit_tail", dataset=exp.dataset, params=params,
                    stage_ids=[stage_id("cache_tail", artifact=art_id)], teacher=cache.teacher, base=cache.id)


def _synthetic_artifact(cfg: dict, exp: Experiment, teacher: str, identity: Any) -> Artifact:

    syn = exp.sections["synthetic"]
    teacher_hash = stable_hash({"teacher": identity, "dataset": cfg["datasets"][exp.dataset]}, 12)
    name = exp.dataset if teacher == "teacher" else _student_teacher_label(exp)
    shard_key = generation_shard_key(name, syn, seed=cfg["seed"], teacher=teacher_hash)
    art_id = synthetic_artifact_id(name, syn, seed=cfg["seed"], teacher=teacher_hash)
    shards = syn["shards"]
    stage_ids = [stage_id("generate_synthetic", shard_key=shard_key, shard=i, nshards=shards) for i in range(shards)]
    stage_ids.append(stage_id("merge_synthetic", artifact=art_id))
    return Artifact(id=art_id, kind="synthetic", dataset=exp.dataset, params=copy.deepcopy(syn),
                    stage_ids=stage_ids, shard_key=shard_key, teacher=teacher)


def _preference_artifact(cfg: dict, exp: Experiment, experiments: dict[str, Experiment]) -> Artifact:
    dpo = exp.sections["dpo"]
    start = exp.init_from
    sources = {}
    if dpo["sample_source"] in ("student", "both"):
        sources["student"] = start
    if dpo["sample_source"] in ("teacher", "both"):
        sources["teacher"] = "teacher"
    judge_model = None
    if dpo["judge"] in ("teacher_logprob", "llm"):
        judge_model = dpo["judge_model"] or "teacher"
    keys = ("sample_source", "samples_per_prompt", "temperature", "top_p", "max_new_tokens", "batch_size",
            "n_prompts", "judge", "judge_model", "margin")
    params = {k: dpo[k] for k in keys}
    ident = {"params": params, "dataset": cfg["datasets"][exp.dataset], "judge": judge_model,
             "sources": {k: _model_identity(cfg, experiments, v) for k, v in sources.items()}}
    per_seed = f"-{seed_suffix(exp.seed)}" if "student" in sources else ""
    art_id = f"{exp.dataset}-{dpo['judge']}-n{dpo['samples_per_prompt']}{per_seed}-{stable_hash(ident, 6)}"
    return Artifact(id=art_id, kind="preferences", dataset=exp.dataset, params=params,
                    stage_ids=[stage_id(rule, artifact=art_id) for rule in ("sample_preferences", "judge_preferences")],
                    teacher=judge_model or "teacher", sources=sources, judge_model=judge_model)


def _expand(cfg: dict) -> dict[str, Experiment]:
    experiments: dict[str, Experiment] = {}
    for index, spec in enumerate(cfg["experiments"]):
        base_sections = {s: _deep_merge(cfg[s], (spec.get("overrides") or {}).get(s, {})) for s in SECTIONS}
        grid = spec.get("grid") or {}
        keys = sorted(grid)
        points = list(itertools.product(*(grid[k] for k in keys))) if keys else [()]
        for point in points:
            sections = copy.deepcopy(base_sections)
            variant = dict(zip(keys, point))
            for dotted, value in variant.items():
                section, _, leaf = dotted.partition(".")
                _set_dotted(sections[section], leaf, value)
            suffix_parts = [spec["name"]] if spec.get("name") else []
            suffix_parts += [f"{k.split('.')[-1]}-{_fmt(v)}" for k, v in variant.items()]
            for student in spec["students"]:
                for dataset in spec["datasets"]:
                    group = ".".join([spec["pipeline"], student, dataset] + suffix_parts)
                    for seed in cfg["seeds"]:
                        exp_id = f"{group}.{seed_suffix(seed)}"
                        if exp_id in experiments:
                            raise ConfigError(f"config key 'experiments[{index}]': experiment id {group!r} is "
                                              f"produced twice; give one of the experiments a distinct 'name'")
                        experiments[exp_id] = Experiment(
                            id=exp_id, pipeline=spec["pipeline"], student=student, dataset=dataset,
                            variant=variant, sections=copy.deepcopy(sections), seed=int(seed), group=group)
    return experiments


def _resolve_reference(exp: Experiment, experiments: dict[str, Experiment]) -> str:
    section, key = LINEAGE_KEY[exp.pipeline]
    ref = exp.sections[section][key]
    where = f"{section}.{key}"
    # lineage pairs by seed: seed s of DPO starts from seed s of its SFT student
    by_group = [e for e in experiments.values() if e.group == ref and e.seed == exp.seed]
    if ref in experiments and ref not in {e.id for e in by_group}:
        raise ConfigError(f"config key '{where}' of experiment {exp.id!r}: {ref!r} names one seed; name the "
                          f"experiment without its seed suffix ({experiments[ref].group!r}), lineage pairs by seed")
    if by_group:
        target = by_group[0]
    else:
        matches = [e for e in experiments.values() if e.pipeline == ref and e.student == exp.student
                   and e.dataset == exp.dataset and e.seed == exp.seed]
        if not matches:
            raise ConfigError(f"config key '{where}' of experiment {exp.id!r}: no experiment {ref!r} (neither an "
                              f"experiment id nor a pipeline with student {exp.student!r} and dataset "
                              f"{exp.dataset!r}); experiments: {sorted({e.group for e in experiments.values()})}")
        if len(matches) > 1:
            raise ConfigError(f"config key '{where}' of experiment {exp.id!r}: {ref!r} matches several experiments "
                              f"({sorted(m.group for m in matches)}); name one by its experiment id")
        target = matches[0]
    if target.group == exp.group:
        raise ConfigError(f"config key '{where}' of experiment {exp.id!r}: an experiment cannot start from itself")
    if exp.pipeline == "dpo" and target.pipeline == "dpo":
        raise ConfigError(f"config key '{where}' of experiment {exp.id!r}: DPO starts from a distilled-SFT "
                          f"checkpoint, not from another DPO run ({target.id})")
    return target.id


def _resolve_lineage(experiments: dict[str, Experiment]) -> None:
    direct = {e.id: _resolve_reference(e, experiments) for e in experiments.values() if e.pipeline in LINEAGE_KEY}
    for exp in experiments.values():
        chain, node = [], exp.id
        while node in direct:
            node = direct[node]
            if node in chain or node == exp.id:
                raise ConfigError(f"experiment {exp.id!r}: its lineage loops ({' -> '.join([exp.id] + chain)})")
            chain.append(node)
        exp.lineage = chain
        exp.init_from = chain[0] if chain else None
        if exp.pipeline == "selfdistill":
            exp.trainer = exp.sections["selfdistill"]["method"]
        elif exp.pipeline == "continued":
            exp.trainer = "sft_gt"
        else:
            exp.trainer = exp.pipeline


def build_plan(cfg: dict) -> Plan:
    """Expand the experiment grid of a *validated* config into experiments, artifacts and eval units."""
    experiments = _expand(cfg)
    _resolve_lineage(experiments)
    artifacts: dict[str, Artifact] = {}
    for exp in experiments.values():
        art = None
        if exp.trainer in ("kd", "sft"):
            teacher = exp.init_from if exp.pipeline == "selfdistill" else "teacher"
            identity = _model_identity(cfg, experiments, teacher)
            make = _logits_artifact if exp.trainer == "kd" else _synthetic_artifact
            art = make(cfg, exp, teacher, identity)
        elif exp.trainer == "dpo":
            art = _preference_artifact(cfg, exp, experiments)
        if art is not None:
            art = artifacts.setdefault(art.id, art)
            art.consumers.append(exp.id)
            exp.artifact = art.id
            tail = _tail_artifact(cfg, exp, art) if art.kind == "logits" else None
            if tail is not None:
                tail = artifacts.setdefault(tail.id, tail)
                tail.consumers.append(exp.id)
                exp.tail_artifact = tail.id
    datasets = sorted({e.dataset for e in experiments.values()})
    students = sorted({e.student for e in experiments.values()})
    tasks = list(cfg["eval"]["tasks"]) if cfg["eval"]["backend"] == "lm_eval" else []
    scored = [d for d in datasets if cfg["datasets"][d]["source"] in VERIFIABLE_SOURCES]
    eval_units = [("teacher", d) for d in scored + tasks]
    eval_units += [(f"init.{s}", d) for s in students for d in scored + tasks]
    eval_units += [(e.id, d) for e in experiments.values()
                   for d in ([e.dataset] if e.dataset in scored else []) + tasks]
    check_kd_vocabularies(cfg, experiments, artifacts)
    return Plan(config=cfg, experiments=experiments, artifacts=artifacts, eval_units=eval_units)
