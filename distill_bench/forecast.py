"""Energy forecast of a run before anything is queued: each planned stage's time and kWh on a named card.

    distill-bench forecast --configfile configs/olmo2_cluster.yaml --hardware h100 [--json F] [--markdown F]
    distill-bench forecast --configfile configs/olmo2_cluster.yaml --hardware h100 --study   # vs the study's kWh

Why: a grid of 32B-teacher experiments is days of GPU time; its bill should be known stage by stage before it is
queued, and the roll-up of a finished run compares it with what was measured (``forecast_vs_measured.md``), so the
calibration improves with every run.

How: the plan (``distill_bench.config.plan``) names every stage; the config gives each stage's token count (dataset
sizes, token budget, prompts x samples x max_new_tokens, cached positions, eval items); the calibration shipped with
the package (``forecast_calibration.yaml``) gives tokens/s and GPU J/token per (card, operation, model shape), each
entry dated, with its source benchmark, ``measured`` or ``derived``. A (card, operation, shape) without an entry is
derived from the nearest measured one and labelled: training, caching and forward passes scale with FLOPs per token
(same MFU), generation with weight bytes per token (same fraction of the HBM roofline), another card by its measured
matmul peak or HBM bandwidth. Planning layer: no torch import.

Token counts are exact where the config fixes them (token budget; prompts x samples x max_new_tokens, every sample
run to max_new_tokens, i.e. an upper bound) and assumed elsewhere (mean example length, input tokens per trained
token); every assumption a forecast used is listed with it.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from distill_bench.atomic import atomic_write_text
from distill_bench.config import ConfigError, load_config
from distill_bench.config.plan import build_plan, eval_stage_id, reference_stage_id, stage_id

CALIBRATION_PATH = Path(__file__).with_name("forecast_calibration.yaml")
ASSUMED_LENGTH_FRACTION = 0.5     # mean example length / max_length, until the data stage has measured it
ASSUMED_INPUT_PER_TRAINED = 2.0   # input tokens per loss-bearing token (the completion is about half an example)
CPU_STAGE_S = 5.0                 # a CPU-side stage (data, tokenizer, merge, verifier judge): seconds, assumed
DEFAULT_VOCAB = 100352            # a pretrained model's vocabulary when its shape is guessed from its name
COMPUTE_OPS = ("train_sft", "train_kd", "train_dpo", "cache_logits", "forward")
ASSUMPTIONS = {
    "length": f"mean example length = {ASSUMED_LENGTH_FRACTION} x max_length (the data stage measures it later)",
    "input_per_trained": f"input tokens = {ASSUMED_INPUT_PER_TRAINED} x loss-bearing tokens (completion ~ half)",
    "max_new": "every generated sample runs to max_new_tokens (an upper bound: EOS ends most earlier)",
    "cpu_stage": f"CPU-side stages (data, tokenizer, merge, verifier judge) take {CPU_STAGE_S:g} s each",
    "host_w": "host (CPU + RAM) power = the card's host_w for the whole stage: an estimate, not a measurement",
    "multi_gpu": "several GPUs per stage scale tokens/s linearly (no multi-GPU measurement at these shapes yet)",
    "dpo_pairs": "DPO: every prompt yields one pair; prompt = half a mean example, each response max_new_tokens",
}


class ForecastError(ValueError):
    """The forecast cannot be made (unknown card, model of unknown size, no calibration); the message says which."""


def load_calibration(path: str | Path | None = None) -> dict:
    with open(path or CALIBRATION_PATH) as fh:
        return yaml.safe_load(fh)


# ------------------------------------------------------------------------------------------------ shapes
@dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied: bool = False
    guessed_from: str | None = None   # set when the shape was inferred from a model name, not known

    @property
    def body_params(self) -> int:
        head_dim = self.hidden // self.heads
        per_layer = 2 * self.hidden * self.hidden + 2 * self.hidden * self.kv_heads * head_dim \
            + 3 * self.hidden * self.intermediate
        return per_layer * self.layers

    @property
    def params(self) -> int:
        return self.body_params + self.vocab * self.hidden * (1 if self.tied else 2)

    @property
    def matmul_params(self) -> int:
        """Parameters in matmuls: the body and the LM head (the input embedding is a row gather)."""
        return self.body_params + self.vocab * self.hidden

    def train_flops(self, seq: float) -> float:
        return 6 * self.matmul_params + 12 * self.layers * self.hidden * seq

    def forward_flops(self, seq: float) -> float:
        return 2 * self.matmul_params + 4 * self.layers * self.hidden * seq

    def weight_bytes(self) -> int:
        return 2 * self.matmul_params   # bf16 weights read per decode step


def shape_from_arch(arch: Mapping[str, Any], vocab: int, name: str,
                    cal: Mapping[str, Any] | None = None) -> Shape:
    """A configured arch; named after a calibration shape with the same dimensions, so its entries apply."""
    shape = Shape(name=name, hidden=int(arch["hidden_size"]), layers=int(arch["num_layers"]),
                  heads=int(arch["num_heads"]), kv_heads=int(arch.get("num_kv_heads") or arch["num_heads"]),
                  intermediate=int(arch["intermediate_size"]), vocab=int(vocab), tied=False)
    for known in (cal or {}).get("shapes", {}):
        twin = named_shape(cal, known)
        if (twin.hidden, twin.layers, twin.heads, twin.kv_heads, twin.intermediate, twin.vocab) == \
                (shape.hidden, shape.layers, shape.heads, shape.kv_heads, shape.intermediate, shape.vocab):
            return twin
    return shape


def named_shape(cal: Mapping[str, Any], name: str, guessed_from: str | None = None) -> Shape:
    s = cal["shapes"][name]
    return Shape(name=name, hidden=s["hidden"], layers=s["layers"], heads=s["heads"], kv_heads=s["kv_heads"],
                 intermediate=s["intermediate"], vocab=s["vocab"], tied=bool(s.get("tied", False)),
                 guessed_from=guessed_from)


def resolve_shape(cal: Mapping[str, Any], spec: Mapping[str, Any], vocab: int, key: str) -> Shape:
    """The shape of a configured model: its arch, a known HF id, or (labelled) the size in its name."""
    if spec.get("arch"):
        return shape_from_arch(spec["arch"], vocab, f"arch:{key}", cal)
    ref = str(spec.get("name_or_path") or "")
    known = cal.get("models") or {}
    if ref in known:
        return named_shape(cal, known[ref])
    m = re.search(r"(\d+(?:\.\d+)?)\s*[bB](?![a-zA-Z])", Path(ref).name or ref)
    if m:
        size = float(m.group(1)) * 1e9
        nearest = min(cal["shapes"], key=lambda n: abs(named_shape(cal, n).params - size))
        return named_shape(cal, nearest, guessed_from=ref)
    raise ForecastError(f"config key '{key}': cannot tell the size of model {ref!r} (no arch, not a known id, no "
                        f"size like '7B' in its name); known ids: {', '.join(sorted(known))}")


# ------------------------------------------------------------------------------------------------ rates
@dataclass
class Rate:
    tokens_per_s: float
    j_per_token: float
    kind: str                         # measured | derived
    basis: list[str] = field(default_factory=list)
    entries: list[dict] = field(default_factory=list)


def known_hardware(cal: Mapping[str, Any]) -> list[str]:
    return sorted(cal["hardware"])


def hardware_spec(cal: Mapping[str, Any], hardware: str) -> dict:
    if hardware not in cal["hardware"]:
        raise ForecastError(f"unknown hardware {hardware!r}; known: {', '.join(known_hardware(cal))} "
                            f"(add a card to {CALIBRATION_PATH.name})")
    return cal["hardware"][hardware]


def _entry_rate(cal: Mapping[str, Any], e: Mapping[str, Any]) -> Rate:
    hw = cal["hardware"][e["hardware"]]
    label = f"{e['hardware']} {e['operation']} {e['shape']} ({e['kind']} {e['date']})"
    if e.get("j_per_token") is not None:
        return Rate(float(e["tokens_per_s"]), float(e["j_per_token"]), e["kind"], [label], [dict(e)])
    # no energy in the entry: the card's busy power over its measured rate
    j = float(hw["busy_w"]) / float(e["tokens_per_s"]) if hw["busy_w"] else 0.0
    return Rate(float(e["tokens_per_s"]), j, "derived", [label, f"J/token = busy_w {hw['busy_w']} W / tokens/s"],
                [dict(e)])


def _shape_scale(op: str, src: Shape, dst: Shape, seq: float) -> float:
    """Factor on time per token going from ``src`` to ``dst`` (compute- or weight-bandwidth-bound)."""
    if op == "generate":
        return dst.weight_bytes() / src.weight_bytes()
    if op in ("cache_logits", "forward"):
        return dst.forward_flops(seq) / src.forward_flops(seq)
    return dst.train_flops(seq) / src.train_flops(seq)


def _card_scale(cal: Mapping[str, Any], op: str, src_hw: str, dst_hw: str) -> float:
    a, b = cal["hardware"][src_hw], cal["hardware"][dst_hw]
    key = "hbm_tb_s" if op == "generate" else "matmul_tflops"
    return float(a[key]) / float(b[key])


def _scaled(rate: Rate, time_factor: float, why: str) -> Rate:
    return Rate(rate.tokens_per_s / time_factor, rate.j_per_token * time_factor, "derived", rate.basis + [why],
                rate.entries)


def lookup_rate(cal: Mapping[str, Any], hardware: str, op: str, shape: Shape, seq: float,
                shapes_by_name: Mapping[str, Shape] | None = None, _depth: int = 0) -> Rate:
    """tokens/s and J/token of ``op`` for ``shape`` on ``hardware``: an entry, or derived (and labelled)."""
    hardware_spec(cal, hardware)
    entries = [e for e in cal["entries"] if e["operation"] == op]
    exact = [e for e in entries if e["hardware"] == hardware and e["shape"] == shape.name]
    if exact:
        return _entry_rate(cal, exact[0])
    # the same shape on another GPU card, scaled by the cards' measured peaks, before another shape on this card
    other = [e for e in entries if e["hardware"] != hardware and e["hardware"] != "cpu" and hardware != "cpu"]
    if any(e["shape"] == shape.name for e in other) and _depth < 2:
        src_hw = min(e["hardware"] for e in other if e["shape"] == shape.name)
        base = _entry_rate(cal, next(e for e in other if e["hardware"] == src_hw and e["shape"] == shape.name))
        f = _card_scale(cal, op, src_hw, hardware)
        key = "HBM bandwidth" if op == "generate" else "matmul peak"
        return _scaled(base, f, f"{src_hw} -> {hardware} by measured {key} (x{1 / f:.3g})")
    same_card = [e for e in entries if e["hardware"] == hardware]
    if same_card:
        def distance(e):   # measured first, then the same attention layout (GQA or not), then the nearest size
            src_shape = _shape_of(cal, e["shape"])
            return (e["kind"] != "measured", (src_shape.kv_heads < src_shape.heads) != (shape.kv_heads < shape.heads),
                    abs(src_shape.params - shape.params))

        src = min(same_card, key=distance)
        f = _shape_scale(op, _shape_of(cal, src["shape"]), shape, seq)
        how = "weight bytes" if op == "generate" else "FLOPs per token"
        return _scaled(_entry_rate(cal, src), f, f"scaled {src['shape']} -> {shape.name} by {how} (x{1 / f:.3g} "
                                                  f"tokens/s)")
    factors = cal.get("factors") or {}
    via = {"train_dpo": ("train_sft", "train_dpo_vs_sft"), "forward": ("cache_logits", "forward_vs_cache")}
    if op in via and _depth < 2:
        base_op, fname = via[op]
        fac = factors[fname]
        base = lookup_rate(cal, hardware, base_op, shape, seq, shapes_by_name, _depth + 1)
        return Rate(base.tokens_per_s * fac["tokens_per_s"], base.j_per_token * fac["j_per_token"], "derived",
                    base.basis + [f"{op} = {base_op} x {fac['tokens_per_s']} ({fac['kind']}: {fac['source']})"],
                    base.entries)
    if other and _depth < 2:
        src_hw = min({e["hardware"] for e in other})
        base = lookup_rate(cal, src_hw, op, shape, seq, shapes_by_name, _depth + 1)
        f = _card_scale(cal, op, src_hw, hardware)
        key = "HBM bandwidth" if op == "generate" else "matmul peak"
        return _scaled(base, f, f"{src_hw} -> {hardware} by measured {key} (x{1 / f:.3g})")
    if op == "train_kd" and _depth < 2:   # the KD/SFT ratio of a card that has both
        pairs = [(e, s) for e in cal["entries"] if e["operation"] == "train_kd"
                 for s in cal["entries"] if s["operation"] == "train_sft" and s["hardware"] == e["hardware"]
                 and s["shape"] == e["shape"]]
        if pairs:
            kd, sft = pairs[0]
            base = lookup_rate(cal, hardware, "train_sft", shape, seq, shapes_by_name, _depth + 1)
            r = kd["tokens_per_s"] / sft["tokens_per_s"]
            return Rate(base.tokens_per_s * r, base.j_per_token / r, "derived",
                        base.basis + [f"train_kd = train_sft x {r:.3f} (KD/SFT on {kd['hardware']} {kd['shape']})"],
                        base.entries)
    raise ForecastError(f"no calibration for operation {op!r} on hardware {hardware!r} (shape {shape.name}); add a "
                        f"measured entry to {CALIBRATION_PATH.name}")


def _shape_of(cal: Mapping[str, Any], name: str) -> Shape:
    if name in cal["shapes"]:
        return named_shape(cal, name)
    raise ForecastError(f"{CALIBRATION_PATH.name}: entry shape {name!r} is not under 'shapes'")


# ------------------------------------------------------------------------------------------------ stages
@dataclass
class StageForecast:
    stage_id: str
    role: str
    operation: str                 # train_sft | train_kd | train_dpo | cache_logits | generate | forward | cpu | startup
    model: str | None
    tokens: float                  # of the kind named in token_kind
    token_kind: str
    gpus: int
    tokens_per_s: float | None
    time_s: float
    gpu_kwh: float
    host_kwh: float
    kind: str                      # measured | derived | assumed
    basis: list[str] = field(default_factory=list)

    @property
    def kwh(self) -> float:
        return self.gpu_kwh + self.host_kwh


@dataclass
class Forecast:
    hardware: str
    config_name: str
    stages: list[StageForecast]
    assumptions: list[str]
    entries: list[dict]

    def totals(self) -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = {r: {"time_s": 0.0, "kwh": 0.0, "gpu_kwh": 0.0}
                                            for r in ("data", "setup", "teacher", "student", "eval")}
        for s in self.stages:
            for key in (s.role, "all"):
                t = out.setdefault(key, {"time_s": 0.0, "kwh": 0.0, "gpu_kwh": 0.0})
                t["time_s"] += s.time_s
                t["kwh"] += s.kwh
                t["gpu_kwh"] += s.gpu_kwh
        out["all"] = out.pop("all", {"time_s": 0.0, "kwh": 0.0, "gpu_kwh": 0.0})
        return out

    def to_dict(self) -> dict:
        return {"hardware": self.hardware, "config": self.config_name, "assumptions": self.assumptions,
                "calibration_entries": self.entries, "totals": self.totals(),
                "stages": [{**asdict(s), "kwh": s.kwh} for s in self.stages]}


class _Planner:
    def __init__(self, cfg: Mapping[str, Any], hardware: str, cal: Mapping[str, Any]):
        self.cfg, self.hardware, self.cal = cfg, hardware, cal
        self.hw = hardware_spec(cal, hardware)
        self.plan = build_plan(dict(cfg))
        self.used_assumptions: set[str] = set()
        self.entries: dict[str, dict] = {}
        tok = cfg["tokenizer"]   # a validated config: every key the schema defaults is present
        self.vocab = int(tok["vocab_size"]) if tok["source"] == "train" else DEFAULT_VOCAB
        self.teacher = resolve_shape(cal, cfg["teacher"], self.vocab, "teacher")
        self.students = {n: resolve_shape(cal, s, self.vocab, f"students.{n}") for n, s in cfg["students"].items()}

    # -------------------------------------------------------------- helpers
    def model_shape(self, model_id: str) -> Shape:
        """teacher | init.<student> | an experiment id -> that model's shape."""
        if model_id == "teacher":
            return self.teacher
        if model_id.startswith("init."):
            return self.students[model_id[5:]]
        return self.students[self.plan.experiments[model_id].student]

    def mean_length(self, dataset: str, max_length: int | None = None) -> float:
        self.used_assumptions.add("length")
        limit = max_length or self.cfg["datasets"][dataset]["max_length"]
        return ASSUMED_LENGTH_FRACTION * float(limit)

    def gpu_stage(self, stage_id: str, role: str, op: str, shape: Shape, tokens: float, token_kind: str,
                  seq: float, gpus: int = 1, factor: Mapping[str, Any] | None = None) -> StageForecast:
        rate = lookup_rate(self.cal, self.hardware, op, shape, seq)
        for e in rate.entries:
            self.entries[f"{e['hardware']}/{e['operation']}/{e['shape']}"] = e
        tps, jpt, basis = rate.tokens_per_s, rate.j_per_token, list(rate.basis)
        kind = rate.kind
        if factor is not None:
            tps, jpt = tps * factor["tokens_per_s"], jpt * factor["j_per_token"]
            basis.append(f"x{factor['tokens_per_s']} tokens/s ({factor['kind']}: {factor['source']})")
            kind = "derived" if factor["kind"] != "measured" else kind
        if gpus > 1:
            self.used_assumptions.add("multi_gpu")
            tps *= gpus
            basis.append(f"{gpus} GPUs: tokens/s x {gpus} (assumed linear)")
            kind = "derived"
        if shape.guessed_from:
            basis.append(f"shape {shape.name} guessed from the name {shape.guessed_from!r}")
        self.used_assumptions.add("host_w")
        startup = float(next((e["startup_s"] for e in rate.entries if "startup_s" in e), self.hw["startup_s"]))
        time_s = startup + tokens / tps
        gpu_j = tokens * jpt + startup * float(self.hw["idle_w"]) * gpus
        return StageForecast(stage_id, role, op, shape.name, tokens, token_kind, gpus, tps, time_s, gpu_j / 3.6e6,
                             time_s * float(self.hw["host_w"]) / 3.6e6, kind, basis)

    def cpu_stage(self, stage_id: str, role: str, what: str) -> StageForecast:
        self.used_assumptions.update({"cpu_stage", "host_w"})
        return StageForecast(stage_id, role, "cpu", None, 0, what, 0, None, CPU_STAGE_S, 0.0,
                             CPU_STAGE_S * float(self.hw["host_w"]) / 3.6e6, "assumed", [ASSUMPTIONS["cpu_stage"]])

    def startup_stage(self, stage_id: str, role: str) -> StageForecast:
        """A stage that builds or checks a model without processing tokens: the card's start-up alone."""
        self.used_assumptions.add("host_w")
        t = float(self.hw["startup_s"])
        return StageForecast(stage_id, role, "startup", None, 0, "-", 0, None, t, t * float(self.hw["idle_w"]) / 3.6e6,
                             t * float(self.hw["host_w"]) / 3.6e6, "measured" if self.hardware == "cpu" else "assumed",
                             [f"start-up only ({t:g} s: interpreter, imports, model build or load)"])

    # -------------------------------------------------------------- one stage each
    def stages(self) -> list[StageForecast]:
        cfg, plan = self.cfg, self.plan
        out: list[StageForecast] = []
        for d in cfg["datasets"]:
            out.append(self.cpu_stage(stage_id("prepare_data", dataset=d), "data", "examples"))
        if plan.uses_run_tokenizer():     # pretrained models with their own tokenizers need no run tokenizer
            out.append(self.cpu_stage(stage_id("prepare_tokenizer"), "setup", "-"))
        t = cfg["teacher"]
        if t.get("source") == "train":
            ds = t["train"].get("dataset") or next(iter(cfg["datasets"]))
            self.used_assumptions.add("input_per_trained")   # teacher.train.tokens counts loss-bearing tokens
            out.append(self.gpu_stage(stage_id("prepare_teacher"), "setup", "train_sft", self.teacher,
                                      float(t["train"]["tokens"]) * ASSUMED_INPUT_PER_TRAINED, "input_tokens",
                                      self.mean_length(ds)))
        else:
            out.append(self.startup_stage(stage_id("prepare_teacher"), "setup"))
        for s in plan.used_students():
            out.append(self.startup_stage(stage_id("init_student", student=s), "setup"))
        for art in plan.artifacts.values():
            out += self.artifact_stages(art)
        for exp in plan.experiments.values():
            out.append(self.train_stage(exp))
            ref = reference_stage_id(exp)
            if ref:
                pairs, _, input_tokens = self.dpo_tokens(exp)
                out.append(self.gpu_stage(ref, "student", "forward", self.model_shape(exp.init_from or "teacher"),
                                          input_tokens, "input_tokens", self.mean_length(exp.dataset)))
        for model_id, name in plan.eval_units:
            out.append(self.eval_stage(model_id, name))
        return out

    def artifact_stages(self, art) -> list[StageForecast]:
        cfg = self.cfg
        # the model producing the artifact: the teacher, or an earlier student (self-distillation)
        teacher = self.model_shape(art.teacher) if art.teacher in self.plan.experiments else self.teacher
        n_train = cfg["datasets"][art.dataset].get("n_train") or 0
        if art.kind in ("logits", "logit_tail"):
            # the top-k cache: a teacher pass writing top-k rows; a tail: a teacher pass computing one temperature's
            # full-vocabulary tail mass (a forward)
            seq = self.mean_length(art.dataset, art.params.get("max_length"))
            op = "cache_logits" if art.kind == "logits" else "forward"
            return [self.gpu_stage(sid, "teacher", op, teacher, n_train * seq, "input_tokens", seq)
                    for sid in art.stage_ids]
        if art.kind == "synthetic":
            self.used_assumptions.add("max_new")
            # the consuming experiment's section: the artifact's params keep only what identifies it
            syn = {**self.plan.experiments[art.consumers[0]].sections["synthetic"], **art.params} \
                if art.consumers else art.params
            prompts = syn.get("n_prompts") or n_train
            shards = int(syn["shards"])
            seq = self.mean_length(art.dataset)
            gen = [stage_id("generate_synthetic", shard_key=art.shard_key, shard=i, nshards=shards)
                   for i in range(shards)]
            per_shard = prompts * int(syn["samples_per_prompt"]) * int(syn["max_new_tokens"]) / shards
            out = [self.gpu_stage(sid, "teacher", "generate", teacher, per_shard, "generated_tokens", seq)
                   for sid in gen]
            out.append(self.cpu_stage(stage_id("merge_synthetic", artifact=art.id), "teacher", "-"))
            return out
        # preferences: sample from each source, then judge
        self.used_assumptions.add("max_new")
        p = {**self.plan.experiments[art.consumers[0]].sections["dpo"], **art.params} if art.consumers else art.params
        prompts = p.get("n_prompts") or n_train
        seq = self.mean_length(art.dataset)
        per_source = prompts * int(p["samples_per_prompt"]) * int(p["max_new_tokens"])
        sample = None
        sample_id = stage_id("sample_preferences", artifact=art.id)
        for label, model_id in art.sources.items():
            st = self.gpu_stage(sample_id, "teacher", "generate", self.model_shape(model_id), per_source,
                                "generated_tokens", seq)
            if sample is None:
                sample = st
            else:   # one stage samples from both sources, one after the other
                sample.time_s += st.time_s - float(self.hw["startup_s"])
                sample.gpu_kwh += st.gpu_kwh
                sample.host_kwh += st.host_kwh
                sample.tokens += st.tokens
                sample.basis += [f"+ {label}: " + "; ".join(st.basis)]
        out = [sample] if sample else []
        judge_id = stage_id("judge_preferences", artifact=art.id)
        if p["judge"] == "verifier":
            out.append(self.cpu_stage(judge_id, "teacher", "-"))
        else:
            judge = self.teacher if art.judge_model in (None, "teacher") else resolve_shape(
                self.cal, {"name_or_path": art.judge_model}, self.vocab, "dpo.judge_model")
            tokens = prompts * int(p["samples_per_prompt"]) * len(art.sources) * (seq / 2 + int(p["max_new_tokens"]))
            out.append(self.gpu_stage(judge_id, "teacher", "forward", judge, tokens, "input_tokens", seq))
        return out

    def dpo_tokens(self, exp) -> tuple[float, float, float]:
        """(pairs, declared trained tokens, input tokens) of a DPO experiment (assumed pair sizes)."""
        self.used_assumptions.add("dpo_pairs")
        d = exp.sections["dpo"]
        pairs = float(d.get("n_prompts") or self.cfg["datasets"][exp.dataset].get("n_train") or 0)
        prompt = self.mean_length(exp.dataset) / 2
        resp = float(d["max_new_tokens"])
        epochs = int(d["epochs"])
        return pairs, pairs * (prompt + 2 * resp) * epochs, pairs * (2 * prompt + 2 * resp) * epochs

    def train_stage(self, exp) -> StageForecast:
        tr = exp.training
        shape = self.students[exp.student]
        op = {"kd": "train_kd", "dpo": "train_dpo"}.get(exp.trainer, "train_sft")
        seq = self.mean_length(exp.dataset, tr.get("max_length"))
        if op == "train_dpo":
            _, _, tokens = self.dpo_tokens(exp)
        else:
            self.used_assumptions.add("input_per_trained")
            tokens = float(tr["token_budget"]) * ASSUMED_INPUT_PER_TRAINED
        gpus = int(tr["gpus"]) * int(tr["nodes"])
        factor = (self.cal.get("factors") or {}).get("gradient_checkpointing") if tr.get("gradient_checkpointing") \
            else None
        st = self.gpu_stage(stage_id("train_student", exp=exp.id), "student", op, shape, tokens, "input_tokens", seq, gpus,
                            factor)
        memory = self.hw.get("memory_gb")
        if memory:   # fp32 weights + gradients + AdamW moments: 16 B per parameter, sharded only under FSDP
            per_gpu = 16 * shape.params / (gpus if tr.get("distributed") == "fsdp" else 1) / 1e9
            if per_gpu > float(memory):
                st.kind = "does not fit"
                st.basis.append(f"DOES NOT FIT: {per_gpu:.0f} GB of weights, gradients and AdamW state per GPU > "
                                f"{memory} GB (training.gpus: {gpus}, distributed: {tr['distributed']}); "
                                f"use training.gpus >= {int(16 * shape.params / 1e9 // float(memory)) + 1} with fsdp")
        return st

    def eval_stage(self, model_id: str, name: str) -> StageForecast:
        ev = self.cfg["eval"]
        shape = self.model_shape(model_id)
        sid = eval_stage_id(model_id, name)
        if name in self.cfg["datasets"]:   # native scoring on the dataset's held-out split
            self.used_assumptions.add("max_new")
            items = self.cfg["datasets"][name]["n_eval"]
            if ev.get("limit"):
                items = min(items, int(ev["limit"]))
            return self.gpu_stage(sid, "eval", "generate", shape, float(items) * int(ev["max_new_tokens"]),
                                  "generated_tokens", self.mean_length(name))
        task = (self.cal.get("eval_tasks") or {}).get(name)
        if task is None:
            raise ForecastError(f"config key 'eval.tasks': no item count for lm-eval task {name!r} in "
                                f"{CALIBRATION_PATH.name} (known: {', '.join(sorted(self.cal.get('eval_tasks') or {}))})")
        items = int(task["items"]) if not ev.get("limit") else min(int(task["items"]), int(ev["limit"]))
        if task["kind"] == "generate":
            self.used_assumptions.add("max_new")
            return self.gpu_stage(sid, "eval", "generate", shape, float(items) * int(ev["max_new_tokens"]),
                                  "generated_tokens", float(task.get("prompt_tokens", 128)))
        return self.gpu_stage(sid, "eval", "forward", shape, float(items) * int(task["tokens_per_item"]),
                              "input_tokens", float(task["tokens_per_item"]))


def forecast_config(cfg: Mapping[str, Any], hardware: str, cal: Mapping[str, Any] | None = None) -> Forecast:
    """Forecast every planned stage of a *validated* config on ``hardware``."""
    cal = cal or load_calibration()
    planner = _Planner(cfg, hardware, cal)
    stages = planner.stages()
    return Forecast(hardware=hardware, config_name=str(cfg["run_name"]), stages=stages,
                    assumptions=[ASSUMPTIONS[k] for k in sorted(planner.used_assumptions)],
                    entries=sorted(planner.entries.values(), key=lambda e: (e["operation"], e["shape"])))


# ------------------------------------------------------------------------------------------------ output
def _h(seconds: float) -> str:
    return f"{seconds / 3600:.2f} h" if seconds >= 3600 else f"{seconds:.0f} s"


def _kwh(x: float) -> str:
    return f"{x:.3f}" if x >= 0.001 or x == 0 else f"{x:.2e}"


def _n(x: float) -> str:
    return f"{x / 1e6:.2f} M" if x >= 1e6 else f"{x:,.0f}"


def forecast_markdown(fc: Forecast) -> str:
    lines = [f"# Energy forecast: {fc.config_name} on {fc.hardware}", "",
             "| stage | operation | model | tokens | tok/s | time | GPU kWh | host kWh | kWh | basis |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for s in fc.stages:
        tps = f"{s.tokens_per_s:,.0f}" if s.tokens_per_s else "-"
        tokens = f"{_n(s.tokens)} {s.token_kind}" if s.tokens else "-"
        lines.append(f"| {s.stage_id} | {s.operation} | {s.model or '-'} | {tokens} | {tps} | {_h(s.time_s)} | "
                     f"{_kwh(s.gpu_kwh)} | {_kwh(s.host_kwh)} | {_kwh(s.kwh)} | {s.kind} |")
    lines += ["", "| role | time (serial) | GPU kWh | kWh |", "|---|---|---|---|"]
    for role, t in fc.totals().items():
        lines.append(f"| {role} | {_h(t['time_s'])} | {_kwh(t['gpu_kwh'])} | {_kwh(t['kwh'])} |")
    lines += ["", "Assumptions:"] + [f"- {a}" for a in fc.assumptions]
    lines += ["", "Calibration entries used:"]
    lines += [f"- {e['hardware']} {e['operation']} {e['shape']}: {e['tokens_per_s']:,} tok/s, "
              f"{e['j_per_token'] if e.get('j_per_token') is not None else '-'} J/token, {e['kind']} {e['date']} "
              f"({e['source']})" for e in fc.entries]
    derived = sorted({b for s in fc.stages if s.kind == "derived" for b in s.basis[1:]})
    if derived:
        lines += ["", "Derivations:"] + [f"- {d}" for d in derived]
    return "\n".join(lines) + "\n"


def study_comparison(hardware: str = "h100", cal: Mapping[str, Any] | None = None) -> list[dict]:
    """The study's reported stages beside our forecast for the same operation, shape and token count."""
    cal = cal or load_calibration()
    hw = hardware_spec(cal, hardware)
    rows = []
    for ref in cal.get("study") or []:
        shape = named_shape(cal, ref["shape"])
        rate = lookup_rate(cal, hardware, ref["operation"], shape, 512.0)
        tokens = float(ref["tokens"])
        time_s = tokens / rate.tokens_per_s
        kwh = (tokens * rate.j_per_token + time_s * float(hw["host_w"])) / 3.6e6
        note = ref.get("note")
        if ref["operation"] in ("train_sft", "train_kd", "train_dpo") and hw.get("memory_gb") and \
                16 * shape.params / 1e9 > float(hw["memory_gb"]):
            note = "; ".join(filter(None, [note, f"our trainer (fp32 weights + AdamW, 16 B/parameter: "
                                                 f"{16 * shape.params / 1e9:.0f} GB) does not fit one "
                                                 f"{hw['memory_gb']} GB card: FSDP over >= 3 cards"]))
        rows.append({"stage": ref["stage"], "study_duration_s": ref["duration_s"], "study_kwh": ref["kwh"],
                     "study_j_per_token": ref["kwh"] * 3.6e6 / tokens, "tokens": tokens,
                     "forecast_time_s": time_s, "forecast_kwh": kwh, "forecast_j_per_token": kwh * 3.6e6 / tokens,
                     "study_over_forecast": ref["kwh"] / kwh if kwh else None, "kind": rate.kind,
                     "basis": rate.basis, "note": note})
    return rows


def study_markdown(rows: list[dict], hardware: str) -> str:
    lines = [f"| study stage (1 x H100) | tokens | study time | study kWh | study J/token | forecast time ({hardware}) "
             f"| forecast kWh | forecast J/token | study / forecast | forecast basis | note |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['stage']} | {_n(r['tokens'])} | {_h(r['study_duration_s'])} | {r['study_kwh']:.2f} | "
                     f"{r['study_j_per_token']:.3f} | {_h(r['forecast_time_s'])} | {r['forecast_kwh']:.3f} | "
                     f"{r['forecast_j_per_token']:.3f} | {r['study_over_forecast']:.1f}x | {r['kind']}: "
                     f"{'; '.join(r['basis'])} | {r['note'] or ''} |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ vs measured
def hardware_of(stages: Mapping[str, Mapping[str, Any]], cal: Mapping[str, Any] | None = None) -> str:
    """The card the stage JSONs were measured on (by GPU name), or cpu when none saw a GPU."""
    cal = cal or load_calibration()
    for st in stages.values():
        gpu = (st.get("devices") or {}).get("gpu") or {}
        for dev in (gpu.get("devices") if isinstance(gpu, dict) else gpu) or []:
            name = str((dev or {}).get("name", "")).upper()
            for key in known_hardware(cal):
                if key != "cpu" and key.upper() in name:
                    return key
    return "cpu"


def forecast_vs_measured(cfg: Mapping[str, Any], stages: Mapping[str, Mapping[str, Any]],
                         hardware: str | None = None) -> str:
    """Markdown: per stage, forecast vs measured time and kWh (ratios > 1: the run cost more than forecast)."""
    cal = load_calibration()
    hardware = hardware or hardware_of(stages, cal)
    fc = forecast_config(cfg, hardware, cal)
    lines = [f"# Forecast vs measured ({hardware}; forecast from {CALIBRATION_PATH.name})", "",
             "| stage | operation | forecast s | measured s | measured / forecast | forecast kWh | measured kWh | "
             "measured / forecast | basis |", "|---|---|---|---|---|---|---|---|---|"]
    tot = [0.0, 0.0, 0.0, 0.0]
    for s in fc.stages:
        st = stages.get(s.stage_id)
        if st is None:
            continue
        dur = float(st.get("duration_s") or 0.0)
        kwh = (st.get("energy") or {}).get("total_kwh")
        kwh = float(kwh) if kwh is not None else None
        r_t = f"{dur / s.time_s:.2f}" if s.time_s else "-"
        r_e = f"{kwh / s.kwh:.2f}" if kwh is not None and s.kwh else "-"
        lines.append(f"| {s.stage_id} | {s.operation} | {s.time_s:.1f} | {dur:.1f} | {r_t} | {s.kwh:.3g} | "
                     f"{kwh if kwh is None else f'{kwh:.3g}'} | {r_e} | {s.kind} |")
        tot[0] += s.time_s
        tot[1] += dur
        tot[2] += s.kwh
        tot[3] += kwh or 0.0
    lines.append(f"| **all** | | {tot[0]:.1f} | {tot[1]:.1f} | {tot[1] / tot[0] if tot[0] else 0:.2f} | "
                 f"{tot[2]:.3g} | {tot[3]:.3g} | {tot[3] / tot[2] if tot[2] else 0:.2f} | |")
    lines += ["", "Assumptions of the forecast:"] + [f"- {a}" for a in fc.assumptions]
    return "\n".join(lines) + "\n"


def write_forecast_vs_measured(cfg: Mapping[str, Any], stages: Mapping[str, Mapping[str, Any]],
                               summary_dir: str | Path) -> Path | None:
    """The roll-up's hook: ``summary_dir/forecast_vs_measured.md``. A forecast that cannot be made (e.g. a card
    without calibration) is written as that reason, never a failed roll-up."""
    path = Path(summary_dir) / "forecast_vs_measured.md"
    try:
        text = forecast_vs_measured(cfg, stages)
    except (ForecastError, KeyError) as err:
        text = f"# Forecast vs measured\n\nNo forecast: {err}\n"
    atomic_write_text(path, text)
    return path


# ------------------------------------------------------------------------------------------------ CLI
def forecast_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="distill-bench forecast", description=__doc__.splitlines()[0])
    ap.add_argument("--configfile", default="workflow_config.yaml")
    ap.add_argument("--hardware", default="cpu", help="card to forecast for (see forecast_calibration.yaml)")
    ap.add_argument("--json", default=None, help="write the forecast as JSON here")
    ap.add_argument("--markdown", default=None, help="write the markdown table here (it is printed either way)")
    ap.add_argument("--study", action="store_true", help="also compare with the original study's reported stages")
    ns = ap.parse_args(argv)
    cal = load_calibration()
    try:
        hardware_spec(cal, ns.hardware)
        cfg = load_config(ns.configfile)
        fc = forecast_config(cfg, ns.hardware, cal)
    except (ConfigError, ForecastError) as err:
        print(f"distill-bench forecast: {err}", file=sys.stderr)
        return 2
    md = forecast_markdown(fc)
    payload = fc.to_dict()
    if ns.study:
        rows = study_comparison(ns.hardware, cal)
        md += "\n## The original study's stages vs this forecast (same operation, shape and tokens)\n\n"
        md += study_markdown(rows, ns.hardware)
        payload["study"] = rows
    print(md)
    if ns.markdown:
        Path(ns.markdown).write_text(md)
    if ns.json:
        Path(ns.json).write_text(json.dumps(payload, indent=2, default=str))
    return 0
