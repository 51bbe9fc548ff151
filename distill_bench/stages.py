"""Stage registry: one name -> one package function, run inside the energy meter.

Snakemake scripts and the CLI both go through :func:`run_named_stage`, so a stage behaves the same whether the
workflow or a user launches it. Stage functions take keyword arguments only: their inputs, outputs and params (named
as in the rule) plus ``meter``.
"""
from __future__ import annotations

import functools
import importlib
import inspect
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping

from distill_bench.config.plan import stage_id_from_energy_json
from distill_bench.config.preflight import METER_SETTINGS_KEY
from distill_bench.energy import EnergySettings, run_stage

# stage name -> ("module:function", role)
STAGES: dict[str, tuple[str, str]] = {
    "prepare_data": ("distill_bench.data.stage:prepare_data", "data"),
    "prepare_tokenizer": ("distill_bench.models.stage:prepare_tokenizer", "setup"),
    "prepare_teacher": ("distill_bench.models.stage:prepare_teacher", "setup"),
    "init_student": ("distill_bench.models.stage:init_student", "setup"),
    "train_student": ("distill_bench.train.stage:train_student", "student"),
    "cache_logits": ("distill_bench.kd.stage:cache_logits", "teacher"),
    "cache_tail": ("distill_bench.kd.stage:cache_tail", "teacher"),
    "generate_synthetic": ("distill_bench.synthetic.stage:generate_shard", "teacher"),
    "merge_synthetic": ("distill_bench.synthetic.stage:merge_shards", "teacher"),
    "sample_preferences": ("distill_bench.dpo.stage:sample_candidates", "teacher"),
    "judge_preferences": ("distill_bench.dpo.stage:judge_candidates", "teacher"),
    "precompute_reference": ("distill_bench.dpo.stage:precompute_reference", "student"),
    "evaluate": ("distill_bench.eval.stage:evaluate", "eval"),
}

# inputs that only order the DAG or feed the meter, never stage arguments
ADAPTER_ONLY_INPUTS = ("idle", "environment", "model_dirs", "judge_inputs")
# meter inputs -> the energy setting that points the meter at them (the rule declares each path once, as an input)
METER_INPUT_SETTINGS = {"idle": "idle_json", "environment": "environment_json"}

# keys of a rule's params that configure the meter rather than the stage function
METER_KEYS = ("stage_id", "role", "pipeline", "experiment", "artifact", "energy")


def resolve(name: str) -> Callable[..., Any]:
    try:
        target, _ = STAGES[name]
    except KeyError:
        raise SystemExit(f"unknown stage {name!r}; known stages: {', '.join(sorted(STAGES))}") from None
    module, func = target.split(":")
    return getattr(importlib.import_module(module), func)


def snakemake_metadata(output: str, persistence_dir: str | Path = ".snakemake") -> dict | None:
    """Snakemake's metadata record of one output (file persistence backend), None when there is none."""
    import base64
    import json

    root = Path(persistence_dir) / "metadata"
    try:
        max_len = os.pathconf(root, "PC_NAME_MAX") or 255
    except (OSError, ValueError):
        max_len = 255
    b64 = base64.urlsafe_b64encode(str(output).encode()).decode()
    parts = [b64[i:i + max_len - 1] for i in range(0, len(b64), max_len - 1)]
    path = root.joinpath(*(["@" + p for p in parts[:-1]] + [parts[-1]]))
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def snakemake_output_accepted(output: str, persistence_dir: str | Path = ".snakemake"):
    """For the meter: did Snakemake record (accept) the output a previous complete stage record describes?

    Snakemake writes an output's metadata when it accepts the finished job, with ``endtime`` = the file's mtime. A
    record that finished later than that (or with no metadata at all) was never accepted -- e.g. SIGINT reached
    Snakemake right after the stage finished -- and its rerun redoes the same work. None when we cannot tell.
    """
    import datetime as dt

    def accepted(record: Mapping[str, Any]) -> bool | None:
        if not (Path(persistence_dir) / "metadata").is_dir():
            return None
        meta = snakemake_metadata(output, persistence_dir)
        if meta is None:
            return False
        try:
            finished = dt.datetime.fromisoformat(str(record["end_time"]).replace("Z", "+00:00")).timestamp()
            return float(meta["endtime"]) >= finished - 2.0
        except (KeyError, TypeError, ValueError):
            return None

    return accepted


def run_named_stage(name: str, *, out_json: str | Path, meter_args: Mapping[str, Any],
                    kwargs: Mapping[str, Any], lease: Any = None, output_accepted: Any = None) -> Any:
    """Run stage ``name`` with ``kwargs`` inside a StageMeter that writes ``out_json`` (``lease``: the GPU lease
    this process holds, recorded in the stage JSON)."""
    fn = resolve(name)
    accepted = inspect.signature(fn).parameters
    kwargs = {k: v for k, v in kwargs.items() if not (k == "pipeline" and k not in accepted)}
    has_var_kw = any(p.kind is p.VAR_KEYWORD for p in accepted.values())
    unknown = [k for k in kwargs if k not in accepted and not has_var_kw]
    if unknown:
        raise TypeError(f"stage {name!r} does not take {unknown}; it takes {sorted(p for p in accepted if p != 'meter')}")
    if "pipeline" in accepted and "pipeline" not in kwargs and meter_args.get("pipeline"):
        kwargs = {**kwargs, "pipeline": meter_args["pipeline"]}
    energy = dict(meter_args.get("energy") or {})
    settings = EnergySettings.from_dict(energy)
    role = meter_args.get("role") or STAGES[name][1]
    fn = functools.partial(fn, **kwargs)   # bound here: stage arguments may share names with run_stage's own
    overhead = harness_overhead_s()
    if overhead is not None and lease is not None:   # waiting for a free GPU is queueing (the lease block has it)
        overhead = max(0.0, overhead - float(getattr(lease, "waited_s", 0.0) or 0.0))

    def with_overhead(meter):
        if overhead is not None:
            meter.record("harness_overhead_s", round(overhead, 3))
        return fn(meter=meter)

    return run_stage(
        stage=name,
        stage_id=meter_args["stage_id"],
        role=role,
        pipeline=meter_args.get("pipeline") or "shared",
        experiment=meter_args.get("experiment"),
        artifact=meter_args.get("artifact"),
        out_json=Path(out_json),
        settings=settings,
        lease=lease.describe() if lease is not None else None,
        output_accepted=output_accepted,
        fn=with_overhead,
    )


def harness_overhead_s() -> float | None:
    """Seconds from this process's start (interpreter start, imports, Snakemake's unpickling) to now, just before
    the stage is handed to its meter: time the stage costs but no meter sees. None where the start is unknown."""
    try:
        import psutil  # optional: the /proc fallback below covers Linux without it

        return max(0.0, time.time() - psutil.Process().create_time())
    except Exception:  # noqa: BLE001 - psutil missing or no /proc: an unknown overhead, never a failed stage
        pass
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime"))
        return max(0.0, time.time() - (boot + ticks / os.sysconf("SC_CLK_TCK")))
    except Exception:  # noqa: BLE001
        return None


def log_to_rule_log(snakemake: Any) -> logging.Logger:
    """Send this job's logging to the rule's declared ``log:`` file (and stderr); returns the rule's logger."""
    if snakemake.log:
        log_path = Path(str(snakemake.log[0]))
        log_path.parent.mkdir(parents=True, exist_ok=True)
        handlers = [logging.FileHandler(log_path), logging.StreamHandler(sys.stderr)]
        logging.basicConfig(level=logging.INFO, handlers=handlers, force=True,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return logging.getLogger(f"rule.{snakemake.rule}")


def run_from_snakemake(snakemake: Any, name: str) -> Any:
    """Adapter used by scripts/*.py: named inputs/outputs/params -> keyword arguments; the stage id is the energy
    JSON's name and the role the registry's."""
    log_to_rule_log(snakemake)
    out_json = str(dict(snakemake.output.items())["energy_json"])
    sid = stage_id_from_energy_json(out_json)
    # lease the job's GPUs before the stage module (and torch, CUDA) is imported: one stage per device
    from distill_bench.energy.lease import job_gpus, lease_for_job
    from distill_bench.hardware import GPU_CAPABLE_RULES

    params = dict(snakemake.params.items())
    # the meter's settings: a rule's own params (prerun, idle baseline), else what the Snakefile left in the config
    energy = dict(params.pop("energy", None) or (getattr(snakemake, "config", None) or {}).get(METER_SETTINGS_KEY)
                  or {})
    lease = lease_for_job(job_gpus(snakemake.resources), stage_id=params.get("stage_id", sid), rule=snakemake.rule,
                          lock_dir=energy.get("lock_dir"))
    if lease is None and snakemake.rule not in GPU_CAPABLE_RULES:
        # a CPU stage neither uses a GPU nor bills one: metering the device would charge it the power of whatever
        # GPU stage runs beside it
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    kwargs: dict[str, Any] = {}
    for section in (snakemake.input, snakemake.output):
        for key, value in section.items():
            if key in ADAPTER_ONLY_INPUTS:
                continue
            kwargs[key] = value if isinstance(value, str) else list(map(str, value))
    meter_args = {k: params.pop(k) for k in METER_KEYS if k in params}
    kwargs.pop("energy_json")
    meter_args.setdefault("stage_id", sid)
    for key, setting in METER_INPUT_SETTINGS.items():
        if key in snakemake.input.keys():
            energy[setting] = str(snakemake.input[key])
    meter_args["energy"] = energy
    kwargs.update(params)
    os.environ.setdefault("OMP_NUM_THREADS", str(snakemake.threads))
    return run_named_stage(name, out_json=out_json, meter_args=meter_args, kwargs=kwargs, lease=lease,
                           output_accepted=snakemake_output_accepted(out_json))
