"""The run plan: experiments from the grid, shared teacher artifacts, stage ids and who consumes what.

The Snakefile, the roll-up and the tests all read the same plan, so the accounting (which teacher stages each
student is charged for) can never drift from the DAG that was run.
"""
from __future__ import annotations

import copy
import hashlib
import itertools
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from distill_bench.config.load import SECTIONS

PIPELINES_WITH_TEACHER_ARTIFACT = {"kd": "logits", "sft": "synthetic"}
# datasets whose eval split has a verifiable final answer, scored by exact match on their own held-out split
VERIFIABLE_SOURCES = {"embedded", "openr1_math"}


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


@dataclass
class Experiment:
    id: str
    pipeline: str
    student: str
    dataset: str
    variant: dict[str, Any]
    sections: dict[str, dict]
    artifact: str | None = None            # the shared teacher artifact this experiment consumes

    @property
    def training(self) -> dict:
        return self.sections["training"]


@dataclass
class Artifact:
    id: str
    kind: str                                # logits | synthetic
    dataset: str
    params: dict
    stage_ids: list[str]
    consumers: list[str] = field(default_factory=list)
    shard_key: str | None = None             # synthetic: generation shards shared across filter settings


@dataclass
class Plan:
    config: dict
    experiments: dict[str, Experiment]
    artifacts: dict[str, Artifact]
    eval_units: list[tuple[str, str]]        # (model_id, eval_name): eval_name is a dataset or an lm-eval task

    @property
    def results(self) -> str:
        return self.config["results_dir"]

    def energy_json(self, stage_id: str) -> str:
        return f"{self.results}/energy/{stage_id}.json"

    def setup_stage_ids(self) -> list[str]:
        ids = [f"data.prepare.{d}" for d in self.config["datasets"]]
        ids += ["setup.tokenizer", "setup.teacher"]
        ids += [f"setup.init.{s}" for s in self.used_students()]
        return ids

    def used_students(self) -> list[str]:
        return sorted({e.student for e in self.experiments.values()})

    def used_datasets(self) -> list[str]:
        return sorted({e.dataset for e in self.experiments.values()})

    def all_stage_ids(self) -> list[str]:
        ids = self.setup_stage_ids()
        for art in self.artifacts.values():
            ids += art.stage_ids
        ids += [f"student.train.{e}" for e in self.experiments]
        ids += [eval_stage_id(m, d) for m, d in self.eval_units]
        return ids

    def to_dict(self) -> dict:
        return {
            "run_name": self.config["run_name"],
            "experiments": {k: asdict(v) for k, v in self.experiments.items()},
            "artifacts": {k: asdict(v) for k, v in self.artifacts.items()},
            "eval_units": [list(u) for u in self.eval_units],
            "stage_ids": self.all_stage_ids(),
        }


def eval_stage_id(model_id: str, dataset: str) -> str:
    return f"eval.{model_id}.{dataset}"


def _teacher_identity(cfg: dict) -> dict:
    t = cfg["teacher"]
    if t["source"] == "pretrained":
        return {"source": "pretrained", "name_or_path": t["name_or_path"], "tokenizer": cfg["tokenizer"]}
    return {"source": "train", "arch": t.get("arch"), "train": t["train"], "tokenizer": cfg["tokenizer"],
            "seed": cfg["seed"]}


def _logits_artifact(cfg: dict, dataset: str, exp_sections: dict) -> Artifact:
    kd = exp_sections["kd"]
    params = {"top_k": kd["top_k"], "value_dtype": kd["value_dtype"], "batch_size": kd["batch_size"],
              "cache_shards": kd["cache_shards"], "max_length": exp_sections["training"]["max_length"]}
    identity = {"teacher": _teacher_identity(cfg), "dataset": cfg["datasets"][dataset], **params}
    art_id = f"{dataset}-k{kd['top_k']}-{kd['value_dtype']}-{stable_hash(identity, 6)}"
    return Artifact(id=art_id, kind="logits", dataset=dataset, params=params,
                    stage_ids=[f"teacher.logits.{art_id}"])


def _synthetic_artifact(cfg: dict, dataset: str, exp_sections: dict) -> Artifact:
    from distill_bench.synthetic.ids import generation_shard_key, synthetic_artifact_id

    syn = exp_sections["synthetic"]
    teacher = stable_hash({"teacher": _teacher_identity(cfg), "dataset": cfg["datasets"][dataset]}, 12)
    shard_key = generation_shard_key(dataset, syn, seed=cfg["seed"], teacher=teacher)
    art_id = synthetic_artifact_id(dataset, syn, seed=cfg["seed"], teacher=teacher)
    shards = syn["shards"]
    stage_ids = [f"teacher.generate.{shard_key}.shard{i}of{shards}" for i in range(shards)]
    stage_ids.append(f"teacher.merge.{art_id}")
    return Artifact(id=art_id, kind="synthetic", dataset=dataset, params=copy.deepcopy(syn),
                    stage_ids=stage_ids, shard_key=shard_key)


def build_plan(cfg: dict) -> Plan:
    """Expand the experiment grid of a *validated* config into experiments, artifacts and eval units."""
    experiments: dict[str, Experiment] = {}
    artifacts: dict[str, Artifact] = {}
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
                    exp_id = ".".join([spec["pipeline"], student, dataset] + suffix_parts)
                    if exp_id in experiments:
                        raise _duplicate(exp_id, index)
                    exp = Experiment(id=exp_id, pipeline=spec["pipeline"], student=student, dataset=dataset,
                                     variant=variant, sections=sections)
                    kind = PIPELINES_WITH_TEACHER_ARTIFACT.get(spec["pipeline"])
                    if kind:
                        art = (_logits_artifact if kind == "logits" else _synthetic_artifact)(cfg, dataset, sections)
                        art = artifacts.setdefault(art.id, art)
                        art.consumers.append(exp_id)
                        exp.artifact = art.id
                    experiments[exp_id] = exp
    datasets = sorted({e.dataset for e in experiments.values()})
    students = sorted({e.student for e in experiments.values()})
    tasks = list(cfg["eval"]["tasks"]) if cfg["eval"]["backend"] == "lm_eval" else []
    scored = [d for d in datasets if cfg["datasets"][d]["source"] in VERIFIABLE_SOURCES]
    eval_units = [("teacher", d) for d in scored + tasks]
    eval_units += [(f"init.{s}", d) for s in students for d in scored + tasks]
    eval_units += [(e.id, d) for e in experiments.values()
                   for d in ([e.dataset] if e.dataset in scored else []) + tasks]
    return Plan(config=cfg, experiments=experiments, artifacts=artifacts, eval_units=eval_units)


def _duplicate(exp_id: str, index: int):
    from distill_bench.config.load import ConfigError

    return ConfigError(f"config key 'experiments[{index}]': experiment id {exp_id!r} is produced twice; give one "
                       f"of the experiments a distinct 'name'")
