"""Optional Weights & Biases logging of a finished run directory.

Logged after the fact, from the files the workflow already wrote (plan, stage JSONs, train logs, the roll-up's
comparison table), so the measured numbers in W&B are exactly those in ``results/summary/`` and logging can never
perturb a measured stage. ``wandb`` is an optional extra (``pip install 'distill-bench[wandb]'``): it is imported
only when logging is asked for.

One W&B run per experiment (config = its plan entry, training curves by optimizer step, summary = its comparison
row) plus one run named ``stages`` (job_type ``energy``) with every stage JSON flattened into a ``wandb.Table`` and
the comparison table as a second table. All runs share the group ``run_name`` so they appear together.

``read_offline_run`` decodes an offline run's ``.wandb`` transaction log (wandb >= 0.31 no longer ships a Python
reader), which lets tests and users check what an offline run holds before ``wandb sync``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import struct
import time
import warnings
from pathlib import Path
from typing import Any, Iterator

from distill_bench.defaults import section_defaults

# the schema's `report.wandb` section
WANDB_CONFIG_DEFAULTS = section_defaults("report", "wandb")
DEFAULT_PROJECT = WANDB_CONFIG_DEFAULTS["project"]
MODES = ("offline", "online", "disabled")
MISSING_WANDB = "report.wandb.enabled is true but wandb is not installed: pip install 'distill-bench[wandb]'"

# stage table columns (names from distill_bench.report.rollup.STAGE_COLUMNS, a stable documented subset)
STAGE_TABLE_COLUMNS = [
    "stage_id", "stage", "role", "pipeline", "experiment", "artifact", "status", "attempts", "duration_s",
    "gpu_j", "cpu_j", "ram_j", "total_j", "net_j", "idle_w", "total_kwh", "policy", "gpu_source", "cpu_source",
    "ram_source", "primary_tokens", "primary_token_count", "tokens_per_s", "j_per_token", "gpu_avg_w", "gpu_peak_w",
    "co2_kg",
]

# comparison.csv columns that go into each experiment run's summary (numbers and short strings)
SUMMARY_COLUMNS = [
    "strict_acc", "strict_ci_low", "strict_ci_high", "strict_stderr", "flexible_acc", "flexible_ci_low",
    "flexible_ci_high", "flexible_stderr", "eval_n", "eval_backend",
    "teacher_kwh_oneoff", "teacher_kwh_amortised", "upstream_kwh_oneoff", "upstream_kwh_amortised",
    "student_train_kwh", "eval_kwh", "total_kwh_oneoff", "total_kwh_amortised", "net_total_kwh_oneoff",
    "net_total_kwh_amortised", "kwh_per_quality_point", "break_even_reuse", "trained_tokens", "train_tokens_per_s",
    "train_j_per_token", "teacher_tokens", "co2_kg_oneoff", "duration_s_oneoff", "energy_sources", "status",
    "artifact_consumers", "seed", "group", "missing", "processed_tokens",
    # the experiment's (all seeds') paired comparison with the baseline
    "verdict", "delta_vs_baseline", "delta_ci_low", "delta_ci_high", "p_value", "break_even_status",
]
# per-experiment columns of comparison.csv joined onto each seeded run's row of comparison_by_seed.csv
GROUP_COLUMNS = ["verdict", "delta_vs_baseline", "delta_ci_low", "delta_ci_high", "p_value", "break_even_reuse",
                 "break_even_status"]

# train_log.json curve keys -> W&B history keys; other "<name>_curve" keys become "train/<name>"
CURVE_KEYS = {"loss_curve": "train/loss", "lr_curve": "train/lr"}
TRAIN_LOG_SCALARS = ["final_loss", "mean_loss", "steps", "max_steps", "trained_tokens", "input_tokens",
                     "train_runtime_s", "data_wait_fraction", "reward_accuracy_final", "reward_margin_final",
                     "interrupted_by_signal"]


class WandbNotInstalledError(ImportError):
    """W&B logging was asked for but the optional ``wandb`` extra is not installed."""


def import_wandb():
    """Import wandb lazily so the package works without the extra; fail with the install hint only when asked."""
    try:
        import wandb
    except ImportError as err:
        raise WandbNotInstalledError(MISSING_WANDB) from err
    return wandb


def _clean(value: Any) -> Any:
    """JSON-safe scalar: NaN/inf/pandas NA -> None, numpy scalars -> Python."""
    if value is None:
        return None
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        try:
            value = value.item()
        except (ValueError, AttributeError):
            pass
    if isinstance(value, float) and not math.isfinite(value):
        return None
    try:
        import pandas as pd

        if value is pd.NA or value is pd.NaT:
            return None
    except ImportError:  # pragma: no cover - pandas is a core dependency
        pass
    return value


def n_star_text(value: Any) -> str:
    """N* as the report prints it: an integer, 'never' (infinite) or 'n/a' (no plain-SFT baseline)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return "n/a"
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    if math.isnan(number):
        return "n/a"
    if math.isinf(number):
        return "never"
    return str(int(number))


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} not found: {path}") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{what} {path} is not valid JSON: {err}") from err


def _load_comparison(results_dir: Path):
    """One row per seeded run (comparison_by_seed.csv, the W&B runs' unit) with its experiment's paired
    comparison (verdict, delta, N*) from comparison.csv."""
    import pandas as pd

    frames = {}
    for name in ("comparison_by_seed.csv", "comparison.csv"):
        path = results_dir / "summary" / name
        if not path.exists():
            raise FileNotFoundError(f"comparison table not found: {path} (run `distill-bench rollup {results_dir}` "
                                    f"first; W&B logging reads the roll-up, it does not recompute it)")
        frames[name] = pd.read_csv(path)
        if "experiment" not in frames[name].columns:
            raise ValueError(f"{path} has no 'experiment' column; columns are {list(frames[name].columns)}")
    by_seed, groups = frames["comparison_by_seed.csv"], frames["comparison.csv"]
    joined = groups[["experiment"] + [c for c in GROUP_COLUMNS if c in groups.columns]].rename(
        columns={"experiment": "group"})
    return by_seed.merge(joined, on="group", how="left")


def _curves(train_log: dict, path: Path) -> dict[int, dict[str, float]]:
    """Merge every ``*_curve`` ([[step, value], ...]) of a train log into rows keyed by optimizer step."""
    rows: dict[int, dict[str, float]] = {}
    for key, curve in train_log.items():
        if not key.endswith("_curve") or curve is None:
            continue
        name = CURVE_KEYS.get(key, f"train/{key[:-len('_curve')]}")
        if not isinstance(curve, list):
            raise ValueError(f"{path}: {key} must be a list of [step, value] pairs, got {type(curve).__name__}")
        for i, point in enumerate(curve):
            if not isinstance(point, (list, tuple)) or len(point) != 2:
                raise ValueError(f"{path}: {key}[{i}] must be a [step, value] pair, got {point!r}")
            step, value = point
            if value is None:
                continue
            rows.setdefault(int(step), {})[name] = float(value)
    return rows


def _experiment_config(plan: dict, exp_id: str, config: dict) -> dict:
    exp = plan["experiments"][exp_id]
    out = {k: exp.get(k) for k in ("pipeline", "student", "dataset", "variant", "trainer", "artifact", "init_from",
                                   "lineage")}
    out.update(exp.get("sections") or {})
    out["experiment"] = exp_id
    out["run_name"] = plan.get("run_name")
    out["student_spec"] = (config.get("students") or {}).get(exp.get("student"))
    out["dataset_spec"] = (config.get("datasets") or {}).get(exp.get("dataset"))
    out["energy_settings"] = config.get("energy")
    return out


def _table(wandb, frame, columns: list[str]):
    cols = [c for c in columns if c in frame.columns]
    data = [[_clean(v) for v in row] for row in frame[cols].itertuples(index=False, name=None)]
    return wandb.Table(columns=cols, data=data)


def _own_service(wandb) -> None:
    """Make this process start its own wandb service instead of attaching to one whose token it inherited.

    wandb passes its service token to child processes in the environment, so a workflow job started from a Python
    process that had used wandb (a notebook, a test session) attaches to that parent's service. With wandb 0.31, a
    job attached so from another working directory (Snakemake's ``-d``) never got its offline logs written out.
    A process that already set wandb up keeps the service it has.
    """
    os.environ.pop(wandb.env.SERVICE, None)


def _run_dir(run, timeout_s: float) -> str | None:
    """The run's local directory once its transaction log is complete (None for a run with no local files).

    ``run.finish()`` returns before wandb-core has written the log out (wandb 0.31, offline: the file can still
    hold only its header), so the returned directory is only handed on once the log ends in its exit record.
    """
    sync_dir = getattr(getattr(run, "settings", None), "sync_dir", None)
    if not sync_dir or not Path(sync_dir).is_dir():
        return None
    wait_for_complete_log(sync_dir, timeout_s=timeout_s)
    return str(sync_dir)


def offline_log_complete(run_dir: str | Path) -> bool:
    """Whether the run's ``.wandb`` transaction log has been written out up to its final exit record."""
    from wandb.proto import wandb_internal_pb2 as pb

    logs = sorted(Path(run_dir).glob("*.wandb"))
    if not logs:
        return False
    try:
        for raw in _records(logs[0]):
            record = pb.Record()
            record.ParseFromString(raw)
            if record.WhichOneof("record_type") == "exit":
                return True
    except Exception:  # a log caught mid-write (truncated record): not complete yet
        return False
    return False


def wait_for_complete_log(run_dir: str | Path, *, timeout_s: float = 120.0, poll_s: float = 0.05) -> None:
    deadline = time.monotonic() + timeout_s
    while not offline_log_complete(run_dir):
        if time.monotonic() > deadline:
            raise TimeoutError(f"W&B run {run_dir}: its transaction log has no exit record {timeout_s:.0f} s after "
                               f"run.finish() (wandb-core did not write it out; is the wandb service alive?)")
        time.sleep(poll_s)


def log_run_to_wandb(results_dir: str | Path, *, project: str = DEFAULT_PROJECT, entity: str | None = None,
                     mode: str = "offline", group: str | None = None, dir: str | Path | None = None,
                     flush_timeout_s: float = 120.0) -> list[str]:
    """Log a finished (rolled-up) run directory to W&B; returns the local W&B run directories written, each with
    a complete transaction log (waited for up to ``flush_timeout_s`` per run).

    ``dir`` is where W&B keeps its local files (default: the results directory, so ``results/wandb/``);
    ``group`` defaults to the run name so all of one run's experiments appear together.
    """
    if mode not in MODES:
        raise ValueError(f"report.wandb.mode must be one of {', '.join(MODES)}, got {mode!r}")
    results_dir = Path(results_dir)
    plan_path = results_dir / "config" / "plan.json"
    plan = _read_json(plan_path, "plan")
    for key in ("experiments", "stage_ids"):
        if key not in plan:
            raise ValueError(f"{plan_path} has no {key!r} key; is it a distill-bench plan?")
    config_path = results_dir / "config" / "merged_config.yaml"
    config: dict = {}
    if config_path.exists():
        import yaml

        config = yaml.safe_load(config_path.read_text()) or {}
    from distill_bench.report.rollup import load_stages, seed_only_stages, stages_frame

    # validated; a missing declared stage is named (unless it belongs to a seed the roll-up reports as missing)
    stages = load_stages(results_dir, plan["stage_ids"], seed_only_stages(plan))
    stage_frame = stages_frame(stages)
    comparison = _load_comparison(results_dir)
    unknown = sorted(set(comparison.experiment) - set(plan["experiments"]))
    if unknown:
        raise ValueError(f"{results_dir / 'summary' / 'comparison.csv'} lists experiment(s) not in {plan_path}: "
                         f"{', '.join(unknown)} (stale roll-up? rerun `distill-bench rollup`)")

    wandb = import_wandb()
    _own_service(wandb)
    run_name = plan.get("run_name") or config.get("run_name") or results_dir.resolve().name
    group = group or run_name
    wandb_dir = Path(dir) if dir is not None else results_dir
    wandb_dir.mkdir(parents=True, exist_ok=True)
    settings = wandb.Settings(silent=True, x_disable_stats=True, disable_code=True, disable_git=True,
                              console="off")
    common = dict(project=project, entity=entity, mode=mode, dir=str(wandb_dir), group=group,
                  reinit="create_new", settings=settings)
    written: list[str] = []

    rows = {row["experiment"]: row for row in comparison.to_dict(orient="records")}
    for exp_id, exp in plan["experiments"].items():
        run = wandb.init(name=exp_id, job_type=exp.get("pipeline") or "train",
                         tags=[t for t in (exp.get("pipeline"), exp.get("student"), exp.get("dataset")) if t],
                         config=_experiment_config(plan, exp_id, config), **common)
        try:
            log_path = results_dir / "models" / "students" / exp_id / "train_log.json"
            if log_path.exists():
                train_log = _read_json(log_path, "train log")
                for step, values in sorted(_curves(train_log, log_path).items()):
                    run.log(values, step=step)
                for key in TRAIN_LOG_SCALARS:
                    if train_log.get(key) is not None:
                        run.summary[f"train/{key}"] = _clean(train_log[key])
            else:
                warnings.warn(f"no train log for experiment {exp_id} ({log_path}); its W&B run has no curves",
                              stacklevel=2)
            row = rows.get(exp_id)
            if row is None:
                warnings.warn(f"experiment {exp_id} has no row in comparison.csv; its W&B run has no summary "
                              f"metrics (rerun `distill-bench rollup`)", stacklevel=2)
            else:
                for key in SUMMARY_COLUMNS:
                    if key in row:
                        run.summary[key] = _clean(row[key])
                status = row.get("break_even_status")
                run.summary["break_even_reuse_text"] = (status if isinstance(status, str) and status not in ("", "ok")
                                                        else n_star_text(row.get("break_even_reuse")))
        finally:
            run.finish()
        if (path := _run_dir(run, flush_timeout_s)) is not None:
            written.append(path)

    run = wandb.init(name="stages", job_type="energy", config={"run_name": run_name, "energy": config.get("energy"),
                                                              "n_stages": len(stage_frame)}, **common)
    try:
        comparison_table = comparison.copy()
        if "break_even_reuse" in comparison_table.columns:
            comparison_table["break_even_reuse_text"] = [n_star_text(v) for v in comparison_table.break_even_reuse]
        run.log({"stages": _table(wandb, stage_frame, STAGE_TABLE_COLUMNS),
                 "comparison": _table(wandb, comparison_table, list(comparison_table.columns))})
        by_role = stage_frame.groupby("role")[["total_j", "net_j", "co2_kg"]].sum(min_count=1)
        for role, sums in by_role.iterrows():
            run.summary[f"energy/{role}_kwh"] = _clean(sums.total_j / 3.6e6)
            run.summary[f"energy/{role}_net_kwh"] = _clean(sums.net_j / 3.6e6)
            run.summary[f"energy/{role}_co2_kg"] = _clean(sums.co2_kg)
        run.summary["energy/total_kwh"] = _clean(stage_frame.total_j.sum() / 3.6e6)
        run.summary["n_stages"] = len(stage_frame)
    finally:
        run.finish()
    if (path := _run_dir(run, flush_timeout_s)) is not None:
        written.append(path)
    return written


def log_from_config(results_dir: str | Path, config: dict) -> list[str]:
    """The workflow's hook: log when ``report.wandb.enabled`` is true, else do nothing (and never import wandb)."""
    section = ((config or {}).get("report") or {}).get("wandb") or {}
    unknown = sorted(set(section) - set(WANDB_CONFIG_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown key(s) under report.wandb: {', '.join(unknown)} "
                         f"(known: {', '.join(WANDB_CONFIG_DEFAULTS)})")
    opts = {**WANDB_CONFIG_DEFAULTS, **section}
    if not opts.pop("enabled"):
        return []
    return log_run_to_wandb(results_dir, **opts)


# --- reading an offline run back (wandb's LevelDB-style record log of protobuf Records) ---------------------

_BLOCK = 32768
_HEADER = b":W&B"


def _records(path: Path) -> Iterator[bytes]:
    data = path.read_bytes()
    if data[:4] != _HEADER:
        raise ValueError(f"{path} is not a W&B transaction log (header {data[:7]!r})")
    pos, chunks = 7, b""
    while pos + 7 <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < 7:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:  # zero padding up to the block end
            pos += left
            continue
        payload = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 1:      # full
            yield payload
        elif kind == 2:    # first
            chunks = payload
        elif kind == 3:    # middle
            chunks += payload
        elif kind == 4:    # last
            yield chunks + payload
            chunks = b""
        else:
            raise ValueError(f"{path}: unknown record type {kind} at byte {pos}")


def _item_key(item) -> str:
    return item.key if item.key else "/".join(item.nested_key)


def read_offline_run(run_dir: str | Path) -> dict:
    """Decode an offline run directory: name, group, job_type, config, history rows, summary, table files."""
    from wandb.proto import wandb_internal_pb2 as pb

    run_dir = Path(run_dir)
    logs = sorted(run_dir.glob("*.wandb"))
    if not logs:
        raise FileNotFoundError(f"no .wandb transaction log in {run_dir}")
    out: dict[str, Any] = {"name": None, "group": None, "job_type": None, "project": None, "config": {},
                           "history": [], "summary": {}, "tables": {}}
    for raw in _records(logs[0]):
        record = pb.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            r = record.run
            out.update(name=r.display_name, group=r.run_group, job_type=r.job_type, project=r.project)
            out["config"].update({_item_key(i): json.loads(i.value_json) for i in r.config.update})
        elif kind == "config":
            out["config"].update({_item_key(i): json.loads(i.value_json) for i in record.config.update})
        elif kind == "history":
            out["history"].append({_item_key(i): json.loads(i.value_json) for i in record.history.item})
        elif kind == "summary":
            out["summary"].update({_item_key(i): json.loads(i.value_json) for i in record.summary.update})
    for key, value in out["summary"].items():  # a logged table's summary entry points at its file
        if key.endswith("/path") and isinstance(value, str) and value.endswith(".table.json"):
            out["tables"][key[:-len("/path")]] = json.loads((run_dir / "files" / value).read_text())
    out["config"].pop("_wandb", None)
    return out


def wandb_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="distill-bench wandb",
                                     description="Log a finished, rolled-up run directory to Weights & Biases.")
    parser.add_argument("results_dir", nargs="?", default="results")
    parser.add_argument("--project", default=DEFAULT_PROJECT)
    parser.add_argument("--entity", default=None)
    parser.add_argument("--mode", choices=MODES, default="offline",
                        help="offline (default): write local runs to `wandb sync` later; online: needs `wandb login`")
    parser.add_argument("--group", default=None, help="W&B group (default: the run name)")
    parser.add_argument("--dir", default=None, help="where W&B writes its files (default: RESULTS_DIR)")
    ns = parser.parse_args(argv)
    from distill_bench.report.rollup import RollupError

    try:
        dirs = log_run_to_wandb(ns.results_dir, project=ns.project, entity=ns.entity, mode=ns.mode,
                                group=ns.group, dir=ns.dir)
    except (WandbNotInstalledError, RollupError, FileNotFoundError, ValueError) as err:
        parser.exit(2, f"distill-bench wandb: {err}\n")
    for path in dirs:
        print(path)
    if ns.mode == "offline" and dirs:
        print(f"{len(dirs)} offline W&B run(s) written; upload with: wandb sync {' '.join(dirs)}")
    return 0
