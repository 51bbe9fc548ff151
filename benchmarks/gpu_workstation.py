"""configs/workstation.yaml's stages at real shapes with random weights, on one GPU, for a bounded token budget.

Builds random-weight Hugging Face checkpoints of the config's models from their published architectures
(`distill_bench/models/random_checkpoint.py`: Qwen2.5-7B-Instruct teacher, Qwen2.5-0.5B and SmolLM2-360M-Instruct
students), with tokenizers of the real vocabulary sizes (byte-level BPE merges trained on the embedded task text, the
id space filled to the real length, the special tokens at their real ids: token counts of a text differ from the real
tokenizers', per-token costs do not), and runs the workstation pipelines' stages through the package's own stage
functions (`distill_bench.stages.run_named_stage`, the workflow's entry point, each inside the energy meter, stage
JSON written as in a real run):

  setup      prepare_teacher / init_student (model_ref.json pointers, tokenizer and embedding checks)
  teacher    generate_synthetic + merge_synthetic (7B), cache_logits (7B, and the 0.5B self-distillation cache)
  student    train_student sft_gt (0.5B, and 360M: another vocabulary), kd (0.5B), dpo (0.5B) after
             sample_preferences (0.5B samples; pairs = reference answer over a sample, since a random model's
             answers give a verifier nothing to rank)
  eval       evaluate (0.5B KD student; the 7B teacher when time is left)

Data: GSM8K is not on the GPU machine; the records are embedded arithmetic problems, three per record, so prompt and
answer lengths are GSM8K-like (a question of ~60 words, a worked solution ending in `#### N`). Random weights never
emit end-of-sequence, so every generation runs to max_new_tokens (the config's 512): generation costs below are upper
bounds per prompt. The synthetic filter `drop_truncated` is off here for the same reason (it would drop every sample).
The SFT students train on the reference solutions (sft_gt), not on the random teacher's samples: those are mostly ids
of the tokenizer's filler region, whose text re-encodes ~6x longer, so at max_new_tokens 512 no sample fits the
config's max_length (1024). Synthetic SFT runs the same trainer per loss token; its cross-tokenizer text path is
covered on CPU (--quick, tests/test_real_models.py).

It prints the per-stage table (seconds, tokens, tok/s, GPU J, J/token, loss first -> last) and the measured time per
stage scaled to the full config: per job, overhead (duration minus tokens at the steady rate: loading, compilation,
CUDA-graph capture, the final save) plus the full config's tokens at the measured steady rate (training: the
trainer's own window of steps after warm-up; elsewhere the meter's steady state); GPU energy = the stage's measured mean
GPU power x that time. Token counts of the full config: the plan of configs/workstation.yaml, GSM8K's 7,473 / 1,319
problems, max_new_tokens per generation (upper bound) and an assumed 230 tokens per chat-templated GSM8K record
(labelled in the output). JSON (stage records, scaled table) goes to --out.

    python benchmarks/gpu_workstation.py --out $OUT           # one H100/H200, ~6 minutes (--budget-s: when to
                                                              # stop starting stages; --teacher qwen2.5-1.5b-instruct)
    python benchmarks/gpu_workstation.py --out DIR --quick    # tiny shapes on CPU (every code path, seconds)
    python benchmarks/gpu_workstation.py --out $OUT --previous earlier.json --skip teacher.generate,...
                                                              # a second call: the stages the first did not reach,
                                                              # the others' records kept from the first
    python benchmarks/gpu_workstation.py --out DIR --rescale earlier.json
                                                              # an earlier run's tables under this version's rules
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

from offline_env import ROOT  # noqa: E402  (sets the offline environment before transformers loads)

CONFIG = ROOT / "configs" / "workstation.yaml"
GSM8K_TRAIN, GSM8K_TEST = 7473, 1319
GSM8K_RECORD_TOKENS = 230   # ASSUMPTION: chat-templated GSM8K question + reference solution in Qwen2.5 tokens
PROBLEMS_PER_RECORD = 3
T0 = time.monotonic()

SIZES = {  # what each mode runs: records in the train split, prompts generated, loss tokens trained, ...
    "gpu": dict(problems_per_record=PROBLEMS_PER_RECORD, records=1024, gen_prompts=256, budget=120_000, dpo_prompts=64, eval_limit=256, max_new_tokens=None,
                max_length=None, tiny=False, dtype="bfloat16", budget_s=300.0),
    # quick: tiny models learn visibly only at a larger learning rate than the config's 2e-5 for 0.5B
    "quick": dict(problems_per_record=1, records=96, gen_prompts=8, budget=2400, dpo_prompts=64, eval_limit=4, max_new_tokens=8,
                  max_length=512, tiny=True, dtype="float32", budget_s=600.0, lr=3e-3,
                  tokenizer_size={"qwen2.5": 600, "smollm2": 512},
                  rows={"qwen2.5-7b-instruct": 640, "qwen2.5-0.5b": 608, "smollm2-360m-instruct": 512}),
}
MODELS = {"teacher": "qwen2.5-7b-instruct", "qwen05": "qwen2.5-0.5b", "smol360": "smollm2-360m-instruct"}


def log(msg: str) -> None:
    print(f"[{time.monotonic() - T0:6.1f}s] {msg}", flush=True)


# ------------------------------------------------------------------------------------------------ inputs
def workstation_plan():
    from distill_bench.config import build_plan, load_config

    cfg = load_config(CONFIG)
    return cfg, build_plan(cfg)


def gsm8k_shaped_records(out: Path, n_train: int, n_eval: int, seed: int = 0,
                         k: int = PROBLEMS_PER_RECORD) -> Path:
    """Embedded problems, ``k`` per record, in the common record schema (k = 3: GSM8K-like lengths)."""
    import datasets

    from distill_bench.data.io import save_dataset_dir
    from distill_bench.data.task import generate_task

    base = generate_task(seed=seed, n_train=n_train * k, n_eval=n_eval * k, min_steps=3, max_steps=4,
                         max_operand=99, ops=("+", "-", "*"), name="gsm8k_shaped")
    splits = {}
    for split, n in (("train", n_train), ("eval", n_eval)):
        rows = base[split]
        recs = {c: [] for c in ("id", "prompt", "response", "answer", "source")}
        for i in range(n):
            part = rows.select(range(i * k, (i + 1) * k))
            steps = [r.rsplit("\n#### ", 1)[0] for r in part["response"]]
            recs["id"].append(f"gsm8k_shaped-{split}-{i}")
            recs["prompt"].append(" Then: ".join(part["prompt"]))
            recs["response"].append("\n".join(steps) + f"\n#### {part['answer'][-1]}")
            recs["answer"].append(part["answer"][-1])
            recs["source"].append("embedded")
        splits[split] = datasets.Dataset.from_dict(recs)
    dsd = datasets.DatasetDict(splits)
    save_dataset_dir(dsd, out, {"dataset": "gsm8k_shaped", "problems_per_record": k})
    return out


def build_checkpoints(work: Path, size: dict, device: str, texts: list[str]) -> dict[str, str]:
    from distill_bench.models.random_checkpoint import ARCHITECTURES, build_tokenizer, save_random_checkpoint

    toks, dirs = {}, {}
    for role, arch in MODELS.items():
        family = ARCHITECTURES[arch].tokenizer
        if family not in toks:
            t = time.monotonic()
            toks[family] = build_tokenizer(family, texts, size=(size.get("tokenizer_size") or {}).get(family),
                                           bpe_vocab=4000)
            log(f"tokenizer {family}: {len(toks[family])} entries ({time.monotonic() - t:.1f}s)")
        t = time.monotonic()
        dirs[role] = str(save_random_checkpoint(arch, work / "ckpt" / role, toks[family], tiny=size["tiny"],
                                                vocab_size=(size.get("rows") or {}).get(arch), dtype=size["dtype"],
                                                device=device, seed=len(dirs)))
        log(f"checkpoint {role} ({arch}) saved in {time.monotonic() - t:.1f}s")
    return dirs


# ------------------------------------------------------------------------------------------------ stages
class Runner:
    """Runs registry stages in the meter, records their stage JSON, skips what the time budget no longer allows."""

    def __init__(self, out: Path, work: Path, budget_s: float, skip: frozenset[str] = frozenset(),
                 previous: dict[str, dict] | None = None):
        self.out, self.work, self.budget_s = out, work, budget_s
        self.skip, self.previous = skip, previous or {}
        self.records: dict[str, dict] = {}

    def _earlier(self, label: str) -> dict | None:
        """The earlier call's record of a measured stage, marked as such (``--previous``)."""
        earlier = self.previous.get(label)
        return {**earlier, "from_previous_run": True} if earlier and earlier.get("seconds") is not None else None

    def keep_previous(self) -> None:
        """Skipped stages whose caller never reached them (a condition on a skipped stage's output) still take their
        earlier record, so the scaled table covers both calls."""
        for label in sorted(self.skip - self.records.keys()):
            if (earlier := self._earlier(label)) is not None:
                self.records[label] = earlier

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - T0)

    def stage(self, label: str, rule: str, *, role: str, pipeline: str = "shared", min_left_s: float = 0.0,
              train_log: Path | None = None, **kwargs) -> dict | None:
        from distill_bench.stages import run_named_stage

        if label in self.skip:
            if (earlier := self._earlier(label)) is not None:
                self.records[label] = earlier
                log(f"{label}: skipped (--skip); its record comes from the earlier run (--previous)")
            else:
                self.records[label] = {"label": label, "rule": rule, "skipped": True}
                log(f"{label}: skipped (--skip)")
            return None
        if self.left() < min_left_s:
            log(f"{label}: skipped ({self.left():.0f}s left of the time budget, needs ~{min_left_s:.0f}s)")
            self.records[label] = {"label": label, "rule": rule, "skipped": True}
            return None
        out_json = self.out / "energy" / f"{label}.json"
        out_json.parent.mkdir(parents=True, exist_ok=True)
        t = time.monotonic()
        error = None
        try:
            run_named_stage(rule, out_json=out_json, kwargs=kwargs,
                            meter_args={"stage_id": f"bench.{label}", "role": role, "pipeline": pipeline,
                                        "energy": {"codecarbon": False, "sample_interval_s": 0.1}})
        except Exception as exc:  # noqa: BLE001 -- recorded; later stages that need this one skip themselves
            error = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
        rec = summarize_stage(label, rule, out_json, time.monotonic() - t, error, train_log)
        self.records[label] = rec
        log(f"{label}: {rec.get('seconds', 0):.1f}s, {rec.get('tokens')} {rec.get('token_kind')}"
            + (f", ERROR {error}" if error else ""))
        return rec


TRAINER_WINDOW = "trainer's step window (excludes loading and the final save)"


def training_rate(token_kind: str | None, metrics: dict) -> float | None:
    """A training stage's rate for scaling: the trainer's synchronised window of steps after warm-up. The meter's
    steady state runs on to the stage's end and so includes the final save, which does not grow with the token
    budget (a 4-step DPO run read 2,153 tok/s there against 6,758 in its steps)."""
    speed = metrics.get("speed") or {}
    return speed.get("trained_tokens_per_s") if token_kind == "trained_tokens" else None


def rescored(records: dict) -> dict:
    """Earlier records with the rate basis of this version (``--rescale``): nothing is run again."""
    out = {}
    for label, rec in records.items():
        rate = training_rate(rec.get("token_kind"), rec.get("metrics") or {})
        out[label] = {**rec, "steady_tok_per_s": rate, "rate_basis": TRAINER_WINDOW} if rate else rec
    return out


def summarize_stage(label, rule, out_json: Path, wall_s: float, error, train_log: Path | None) -> dict:
    rec: dict = {"label": label, "rule": rule, "wall_s": wall_s, "error": error}
    if not out_json.is_file():
        return rec
    d = json.loads(out_json.read_text())
    primary = d["tokens"]["primary"]
    tokens = d["tokens"]["counts"].get(primary) if primary else None
    steady = (d.get("throughput") or {}).get("steady_state") or None
    rate = steady["tokens_per_s"] if steady and steady.get("tokens_per_s") else None
    rate_basis = "steady state (meter)" if rate else None
    trainer_rate = training_rate(primary, d.get("metrics") or {})
    if trainer_rate:
        rate, rate_basis = trainer_rate, TRAINER_WINDOW
    if rate is None and (d.get("metrics") or {}).get("steady_generated_tokens_per_s"):
        rate, rate_basis = d["metrics"]["steady_generated_tokens_per_s"], "steady batches (stage metric)"
    if rate is None and tokens and d["duration_s"]:
        rate, rate_basis = tokens / d["duration_s"], "whole stage (includes loading)"
    gpu_j = d["energy"]["gpu_j"]
    rec.update(status=d["status"], seconds=d["duration_s"], token_kind=primary, tokens=tokens,
               tokens_all=d["tokens"]["counts"], tok_per_s=(tokens / d["duration_s"]) if tokens else None,
               steady_tok_per_s=rate, rate_basis=rate_basis, gpu_j=gpu_j, gpu_source=d["energy"]["sources"]["gpu"],
               gpu_avg_w=(gpu_j / d["duration_s"]) if d["duration_s"] else None,
               j_per_token=(gpu_j / tokens) if tokens else None, metrics=d.get("metrics") or {})
    if train_log is not None and train_log.is_file():
        curve = json.loads(train_log.read_text()).get("loss_curve") or []
        if curve:
            rec["loss_first"], rec["loss_last"] = curve[0][1], curve[-1][1]
    return rec


def make_pairs(candidates: Path, dataset: Path, out: Path, tokenizer_dir: Path, max_tokens: int) -> Path:
    """chosen = the reference answer, rejected = the student's sample (a random model's samples tie under the
    verifier, so the judge would keep no pair; DPO training cost depends on lengths, not on who wins). The sample is
    cut to ``max_tokens`` of the student's tokenizer: a random model emits ids of the tokenizer's filler region, whose
    text re-encodes ~6x longer, so uncut pairs would not fit max_length, while a real sample is at most
    max_new_tokens long."""
    import datasets
    from transformers import AutoTokenizer

    from distill_bench.dpo.stage import read_candidates

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))

    def cut(text: str) -> str:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        limit = max_tokens
        while len(ids) > max_tokens and limit > 0:   # decode/re-encode may merge differently: cut until it fits
            text = tok.decode(ids[:limit])
            ids, limit = tok(text, add_special_tokens=False)["input_ids"], limit - 8
        return text

    rows, _ = read_candidates(candidates)
    ref = {r["id"]: r["response"] for r in datasets.load_from_disk(str(dataset))["train"]}
    seen, pairs = set(), []
    for r in rows:
        if r["prompt_id"] in seen or not r["response"]:
            continue
        seen.add(r["prompt_id"])
        pairs.append({"prompt_id": r["prompt_id"], "prompt": r["prompt"], "chosen": ref[r["prompt_id"]],
                      "rejected": cut(r["response"]), "chosen_score": 1.0, "rejected_score": 0.0,
                      "chosen_source": "reference", "rejected_source": "student"})
    datasets.DatasetDict({"train": datasets.Dataset.from_list(pairs)}).save_to_disk(str(out))
    return out


def run_pipelines(runner: Runner, ckpt: dict, data: Path, sections: dict, seed: int) -> None:
    w = runner.work
    teacher, qwen, smol = w / "models" / "teacher", w / "models" / "init_qwen05", w / "models" / "init_smol360"
    training = sections["training"]
    runner.stage("setup.teacher", "prepare_teacher", role="setup", out_dir=str(teacher), dataset=str(data),
                 teacher={"source": "pretrained", "name_or_path": ckpt["teacher"]}, training=training, seed=seed)
    for name, out in (("qwen05", qwen), ("smol360", smol)):
        runner.stage(f"setup.init.{name}", "init_student", role="setup", out_dir=str(out), seed=seed,
                     student={"init": "pretrained", "name_or_path": ckpt[name]})

    shard, syn = w / "teacher" / "shard0of1", w / "teacher" / "synthetic"
    runner.stage("teacher.generate", "generate_synthetic", role="teacher", pipeline="sft", teacher=str(teacher),
                 tokenizer=str(teacher), dataset=str(data), out_dir=str(shard), synthetic=sections["synthetic"],
                 shard=0, num_shards=1, seed=seed, min_left_s=60)
    if shard.is_dir():
        runner.stage("teacher.merge", "merge_synthetic", role="teacher", pipeline="sft", shards=[str(shard)],
                     out_dir=str(syn), synthetic=sections["synthetic"], dataset=str(data))
    cache = w / "teacher" / "logits"
    runner.stage("teacher.logits", "cache_logits", role="teacher", pipeline="kd", teacher=str(teacher),
                 tokenizer=str(teacher), dataset=str(data), out_dir=str(cache), kd=sections["cache"],
                 training={"max_length": training["max_length"]}, seed=seed, min_left_s=40)

    def train(label, pipeline, student_dir, dataset, out, min_left_s=45, **extra):
        return runner.stage(label, "train_student", role="student", pipeline=pipeline, dataset=str(dataset),
                            tokenizer=str(student_dir), init_model=str(extra.pop("init", student_dir)),
                            out_dir=str(out), training=training, seed=seed, min_left_s=min_left_s,
                            train_log=Path(out) / "train_log.json", **extra)

    students = w / "students"
    train("student.train.sft_gt.qwen05", "sft_gt", qwen, data, students / "sft_gt.qwen05")
    if cache.is_dir():
        train("student.train.kd.qwen05", "kd", qwen, data, students / "kd.qwen05", kd_cache=str(cache),
              kd=sections["kd"])
    train("student.train.sft_gt.smol360", "sft_gt", smol, data, students / "sft_gt.smol360")
    kd_final = students / "kd.qwen05" / "final"
    if kd_final.is_dir():
        runner.stage("eval.kd.qwen05", "evaluate", role="eval", pipeline="kd", model=str(kd_final),
                     tokenizer=str(kd_final), dataset=str(data), out_json=str(w / "eval" / "kd.qwen05.json"),
                     eval=sections["eval"], model_id="kd.qwen05", seed=seed, min_left_s=30)
    sft_final = students / "sft_gt.qwen05" / "final"
    cand = w / "teacher" / "preferences" / "candidates"
    if sft_final.is_dir():
        runner.stage("teacher.sample.qwen05", "sample_preferences", role="teacher", pipeline="dpo",
                     models={"student": str(sft_final)}, dataset=str(data), out_dir=str(cand), dpo=sections["dpo"],
                     seed=seed, min_left_s=40)
    if cand.is_dir():
        pairs = make_pairs(cand, data, w / "teacher" / "preferences" / "pairs", sft_final,
                           sections["dpo"]["max_new_tokens"])
        train("student.train.dpo.qwen05", "dpo", qwen, pairs, students / "dpo.qwen05", init=sft_final,
              method="dpo", dpo=sections["dpo"])
    if sft_final.is_dir():
        runner.stage("student.logits.qwen05", "cache_logits", role="teacher", pipeline="selfdistill",
                     teacher=str(sft_final), tokenizer=str(sft_final), dataset=str(data),
                     out_dir=str(w / "teacher" / "logits_qwen05"), kd=sections["cache"],
                     training={"max_length": training["max_length"]}, seed=seed, min_left_s=20)
    runner.stage("eval.teacher", "evaluate", role="eval", model=str(teacher), tokenizer=str(teacher),
                 dataset=str(data), out_json=str(w / "eval" / "teacher.json"), eval=sections["eval"],
                 model_id="teacher", seed=seed, min_left_s=45)


def bench_sections(plan, size: dict) -> dict:
    """The workstation experiments' own sections, with this run's bounded token budget and prompt counts."""
    import copy

    by = {(e.pipeline, e.student): e for e in plan.experiments.values()}
    kd_exp, sft_exp, dpo_exp = by[("kd", "qwen05")], by[("sft", "qwen05")], by[("dpo", "qwen05")]
    training = {**copy.deepcopy(sft_exp.training), "token_budget": size["budget"], "save_steps": 100000,
                "stale_checkpoints": "set_aside"}
    synthetic = copy.deepcopy(sft_exp.sections["synthetic"])
    synthetic.update(n_prompts=size["gen_prompts"])
    synthetic["filters"] = {**synthetic["filters"], "drop_truncated": False}   # random weights never stop
    dpo = {**copy.deepcopy(dpo_exp.sections["dpo"]), "n_prompts": size["dpo_prompts"]}
    ev = {**copy.deepcopy(sft_exp.sections["eval"]), "limit": size["eval_limit"]}
    if size["max_new_tokens"]:
        for section in (synthetic, dpo, ev):
            section["max_new_tokens"] = size["max_new_tokens"]
    if size["max_length"]:
        training["max_length"] = size["max_length"]
    if size.get("lr"):
        training["lr"] = size["lr"]
        dpo["lr"] = size["lr"]
    cache = next(a for a in plan.artifacts.values() if a.kind == "logits" and a.teacher == "teacher").params
    cache = {**copy.deepcopy(cache), "max_length": training["max_length"]}
    return {"training": training, "synthetic": synthetic, "dpo": dpo, "eval": ev, "kd": kd_exp.sections["kd"],
            "cache": cache}


# ------------------------------------------------------------------------------------------------ scaling
def scale_to_config(cfg: dict, plan, records: dict) -> dict:
    """Measured per-stage time and GPU power scaled to the full workstation config (one seed)."""
    def measured(label):
        rec = records.get(label) or {}
        return rec if rec.get("steady_tok_per_s") and not rec.get("error") else None

    syn, ev, dpo = cfg["synthetic"], cfg["eval"], cfg["dpo"]
    kd_sft_ratio = None
    if measured("student.train.kd.qwen05") and measured("student.train.sft_gt.qwen05"):
        kd_sft_ratio = (records["student.train.kd.qwen05"]["steady_tok_per_s"]
                        / records["student.train.sft_gt.qwen05"]["steady_tok_per_s"])
    rows = []

    def add(what, label, jobs, tokens_per_job, basis, rate_scale=1.0, once=False):
        """``once``: a job every seed shares (teacher artifacts, evaluations of the teacher and initial students)."""
        rec = measured(label)
        if rec is None or jobs == 0:
            rows.append({"stage": what, "jobs": jobs, "from": label, "basis": basis, "missing": True, "once": once})
            return
        rate = rec["steady_tok_per_s"] * rate_scale
        overhead = max(0.0, rec["seconds"] - rec["tokens"] / rec["steady_tok_per_s"])
        per_job = overhead + tokens_per_job / rate
        rows.append({"stage": what, "jobs": jobs, "once": once, "from": label, "basis": basis,
                     "tokens_per_job": tokens_per_job,
                     "overhead_s": overhead, "tok_per_s": rate, "s_per_job": per_job, "total_s": per_job * jobs,
                     "gpu_w": rec["gpu_avg_w"], "gpu_j": (rec["gpu_avg_w"] or 0.0) * per_job * jobs})

    first_seed = min(e.seed for e in plan.experiments.values())
    exps = [e for e in plan.experiments.values() if e.seed == first_seed]   # one seed's jobs; seeds repeat them
    per_seed_ids = {e.id for e in exps}
    n_gen = sum(1 for a in plan.artifacts.values() if a.kind == "synthetic")
    add("teacher generation", "teacher.generate", n_gen,
        GSM8K_TRAIN * syn["samples_per_prompt"] * syn["max_new_tokens"], "max_new_tokens per prompt (upper bound)",
        once=True)
    caches = [a for a in plan.artifacts.values() if a.kind == "logits"]
    add("teacher logit cache (7B)", "teacher.logits", sum(a.teacher == "teacher" for a in caches),
        GSM8K_TRAIN * GSM8K_RECORD_TOKENS, f"{GSM8K_RECORD_TOKENS} tokens per GSM8K record (assumed)", once=True)
    add("student logit caches (self-distillation)", "student.logits.qwen05", sum(a.teacher != "teacher" for a in caches),
        GSM8K_TRAIN * GSM8K_RECORD_TOKENS, "0.5B rate for both students (360M: not measured)")
    for student, sft_label in (("qwen05", "student.train.sft_gt.qwen05"), ("smol360", "student.train.sft_gt.smol360")):
        mine = [e for e in exps if e.student == student]
        add(f"train {student} sft_gt/sft/continued", sft_label, sum(e.trainer in ("sft_gt", "sft") for e in mine),
            cfg["training"]["token_budget"], "training.token_budget loss tokens")
        if student == "qwen05":
            add("train qwen05 kd/selfdistill", "student.train.kd.qwen05", sum(e.trainer == "kd" for e in mine),
                cfg["training"]["token_budget"], "training.token_budget loss tokens")
        elif kd_sft_ratio:
            add("train smol360 selfdistill (kd)", sft_label, sum(e.trainer == "kd" for e in mine),
                cfg["training"]["token_budget"], "360M sft rate x the 0.5B kd/sft ratio (derived)", kd_sft_ratio)
        dpo_rec = measured("student.train.dpo.qwen05")
        if dpo_rec:
            pairs = max(1, int(dpo_rec["metrics"].get("pairs", 1)))
            per_pair = dpo_rec["tokens"] / pairs
            scale = 1.0 if student == "qwen05" else (
                (records[sft_label]["steady_tok_per_s"] / records["student.train.sft_gt.qwen05"]["steady_tok_per_s"])
                if measured(sft_label) and measured("student.train.sft_gt.qwen05") else 1.0)
            add(f"train {student} dpo", "student.train.dpo.qwen05", sum(e.trainer == "dpo" for e in mine),
                dpo["n_prompts"] * per_pair, "dpo.n_prompts pairs at the measured tokens per pair"
                + ("" if student == "qwen05" else " (360M: derived from its sft rate)"), scale)
        add(f"sample preferences {student}", "teacher.sample.qwen05", sum(e.trainer == "dpo" for e in mine),
            dpo["n_prompts"] * dpo["samples_per_prompt"] * dpo["max_new_tokens"],
            "max_new_tokens per sample (upper bound)" + ("" if student == "qwen05" else "; 0.5B rate"))
    trained_evals = [m for m, _ in plan.eval_units if m in per_seed_ids]
    initial_evals = [m for m, _ in plan.eval_units if m.startswith("init.")]
    teacher_eval_label = "eval.teacher" if measured("eval.teacher") else "teacher.generate"
    add("eval teacher", teacher_eval_label, sum(m == "teacher" for m, _ in plan.eval_units),
        GSM8K_TEST * ev["max_new_tokens"], "eval.max_new_tokens per question (upper bound)", once=True)
    add("eval initial students", "eval.kd.qwen05", len(initial_evals), GSM8K_TEST * ev["max_new_tokens"],
        "eval.max_new_tokens per question (upper bound); 0.5B rate for both students", once=True)
    add("eval trained students", "eval.kd.qwen05", len(trained_evals), GSM8K_TEST * ev["max_new_tokens"],
        "eval.max_new_tokens per question (upper bound); 0.5B rate for both students")
    done = [r for r in rows if not r.get("missing")]
    once_s, once_j = (sum(r[k] for r in done if r["once"]) for k in ("total_s", "gpu_j"))
    seed_s, seed_j = (sum(r[k] for r in done if not r["once"]) for k in ("total_s", "gpu_j"))
    n_seeds = len(cfg["seeds"])
    return {"rows": rows, "shared_s": once_s, "shared_gpu_j": once_j, "per_seed_s": seed_s, "per_seed_gpu_j": seed_j,
            "seeds": n_seeds, "all_seeds_s": once_s + n_seeds * seed_s, "all_seeds_gpu_j": once_j + n_seeds * seed_j,
            "not_counted": ["prepare_data", "setup stages (pointers)", "merge_synthetic", "judge (verifier, CPU)",
                            "idle baseline", "roll-up"] + [r["stage"] for r in rows if r.get("missing")]}


# ------------------------------------------------------------------------------------------------ report
def fmt(v, spec=",.0f"):
    return "-" if v is None else format(v, spec)


def print_tables(records: dict, scaled: dict) -> str:
    lines = ["| stage | s | tokens | tok/s (whole) | tok/s (steady) | GPU J | J/token | loss first -> last |",
             "|---|---|---|---|---|---|---|---|"]
    for rec in records.values():
        if rec.get("skipped") or rec.get("seconds") is None:
            lines.append(f"| {rec['label']} | skipped{' / ' + rec['error'] if rec.get('error') else ''} |"
                         " | | | | | |")
            continue
        loss = (f"{rec['loss_first']:.3f} -> {rec['loss_last']:.3f}" if "loss_first" in rec else "")
        earlier = " (earlier run)" if rec.get("from_previous_run") else ""
        lines.append(f"| {rec['label']}{earlier} | {rec['seconds']:.1f} | {fmt(rec['tokens'])} {rec['token_kind'] or ''} | "
                     f"{fmt(rec['tok_per_s'])} | {fmt(rec['steady_tok_per_s'])} | {fmt(rec['gpu_j'])} | "
                     f"{fmt(rec['j_per_token'], '.4f')} | {loss} |")
    lines += ["", "Scaled to configs/workstation.yaml: measured overhead per job + full-config tokens at the measured "
              "steady rate; GPU J = measured mean GPU power x time; jobs of one seed, 'once' = shared by every seed",
              "", "| stage | jobs | once | tokens/job | overhead s | tok/s | s/job | total min | GPU kWh | basis |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in scaled["rows"]:
        if r.get("missing"):
            lines.append(f"| {r['stage']} | {r['jobs']} | {'yes' if r['once'] else ''} | not measured ({r['from']}) "
                         f"| | | | | | {r['basis']} |")
            continue
        lines.append(f"| {r['stage']} | {r['jobs']} | {'yes' if r['once'] else ''} | {fmt(r['tokens_per_job'])} | "
                     f"{r['overhead_s']:.0f} | "
                     f"{fmt(r['tok_per_s'])} | {r['s_per_job']:.0f} | {r['total_s'] / 60:.1f} | "
                     f"{r['gpu_j'] / 3.6e6:.3f} | {r['basis']} |")
    lines.append(f"\nshared by every seed: {scaled['shared_s'] / 60:.0f} min, {scaled['shared_gpu_j'] / 3.6e6:.2f} kWh "
                 f"GPU; per seed: {scaled['per_seed_s'] / 60:.0f} min, {scaled['per_seed_gpu_j'] / 3.6e6:.2f} kWh GPU; "
                 f"the config's {scaled['seeds']} seeds: {scaled['all_seeds_s'] / 3600:.1f} h, "
                 f"{scaled['all_seeds_gpu_j'] / 3.6e6:.2f} kWh GPU "
                 f"(not counted: {', '.join(scaled['not_counted'])})")
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def write_results(out: Path, payload: dict, table: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".gpu_workstation.json.tmp"
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    os.replace(tmp, out / "gpu_workstation.json")
    (out / "gpu_workstation.md").write_text(table + "\n")


def rescale(earlier: Path, out: Path) -> int:
    payload = json.loads(earlier.read_text())
    cfg, plan = workstation_plan()
    records = rescored(payload["stages"])
    scaled = scale_to_config(cfg, plan, records)
    write_results(out, {**payload, "stages": records, "scaled": scaled, "rescaled_from": str(earlier)},
                  print_tables(records, scaled))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--quick", action="store_true", help="tiny shapes on CPU: every code path in seconds")
    ap.add_argument("--budget-s", type=float, default=None, help="stop starting stages after this many seconds")
    ap.add_argument("--work", type=Path, default=None, help="where checkpoints go (default: a temporary dir)")
    ap.add_argument("--teacher", default=MODELS["teacher"], help="teacher architecture (qwen2.5-1.5b-instruct: the "
                    "24 GB option named in configs/workstation.yaml)")
    ap.add_argument("--skip", default="", help="comma-separated stage labels not to run (e.g. what an earlier call "
                    "measured); a later stage that needs a skipped one's output skips itself")
    ap.add_argument("--previous", type=Path, default=None, help="an earlier run's gpu_workstation.json: skipped "
                    "stages take their record from it (marked 'earlier run'), so the scaled table covers both calls")
    ap.add_argument("--rescale", type=Path, default=None, help="an earlier run's gpu_workstation.json: re-derive its "
                    "rates and the scaled table with this version's rules, run nothing, write to --out")
    args = ap.parse_args(argv)
    if args.rescale:
        return rescale(args.rescale, args.out)

    import torch

    size = dict(SIZES["quick" if args.quick else "gpu"])
    if args.budget_s:
        size["budget_s"] = args.budget_s
    device = "cpu" if args.quick else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --quick for the CPU path")
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    work = args.work or Path(tempfile.mkdtemp(prefix="gpu_workstation_"))
    MODELS["teacher"] = args.teacher
    cfg, plan = workstation_plan()
    sections = bench_sections(plan, size)
    log(f"device {torch.cuda.get_device_name(0) if device == 'cuda' else 'cpu'}; work dir {work}")
    data = gsm8k_shaped_records(work / "data", size["records"], max(size["eval_limit"], 8),
                                k=size["problems_per_record"])
    import datasets

    train = datasets.load_from_disk(str(data))["train"]
    ckpt = build_checkpoints(work, size, device, list(train["prompt"]) + list(train["response"]))
    if device == "cuda":
        torch.cuda.empty_cache()
    skip = frozenset(label for label in args.skip.split(",") if label)
    previous = json.loads(args.previous.read_text())["stages"] if args.previous else None
    runner = Runner(out, work, size["budget_s"], skip, previous)
    try:
        run_pipelines(runner, ckpt, data, sections, seed=int(cfg["seed"]))
        runner.keep_previous()
    finally:
        scaled = scale_to_config(cfg, plan, runner.records)
        table = print_tables(runner.records, scaled)
        payload = {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu", "quick": args.quick,
                   "sizes": {k: v for k, v in size.items()}, "sections": sections, "models": MODELS,
                   "checkpoints": {k: str(v) for k, v in ckpt.items()}, "stages": runner.records, "scaled": scaled,
                   "assumptions": {"gsm8k_record_tokens": GSM8K_RECORD_TOKENS, "gsm8k_train": GSM8K_TRAIN,
                                   "gsm8k_test": GSM8K_TEST, "problems_per_record": size["problems_per_record"]},
                   "elapsed_s": time.monotonic() - T0}
        write_results(out, payload, table)
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    errors = [r["label"] for r in runner.records.values() if r.get("error")]
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
