"""Pre-flight: the Snakefile and `distill-bench validate-config` share one path (distill_bench.config.preflight), and
every check runs before any job starts, naming the key."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from distill_bench.cli import main
from distill_bench.config import ConfigError
from distill_bench.config.preflight import coerce_to_schema, preflight
from test_workflow import TINY, planned_jobs, snakemake


@pytest.fixture()
def tiny() -> dict:
    return yaml.safe_load(TINY.read_text())


def _write(tmp_path: Path, cfg: dict, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_config_without_experiments_is_an_error_in_snakemake_and_validate_config(tmp_path, tiny, capsys):
    del tiny["experiments"]
    path = _write(tmp_path, tiny)
    proc = snakemake("-n", "--configfile", str(path), cwd=tmp_path, check=False)
    assert proc.returncode != 0
    assert "config key 'experiments'" in proc.stdout + proc.stderr
    assert "rule train_student" not in proc.stdout, "the embedded default's experiments must not be planned"
    with pytest.raises(SystemExit) as exc:
        main(["validate-config", str(path)])
    assert exc.value.code == 2 and "config key 'experiments'" in capsys.readouterr().err


def test_plain_snakemake_still_plans_the_embedded_default_through_the_profile(tmp_path):
    default = yaml.safe_load((Path(__file__).resolve().parents[1] / "workflow_config.yaml").read_text())
    jobs = planned_jobs(snakemake("-n", cwd=tmp_path).stdout)
    trained = {w["exp"] for r, w in jobs if r == "train_student"}
    assert trained and all(e.split(".")[2] in default["datasets"] for e in trained)


def test_nested_config_override_is_coerced_through_the_schema(tmp_path):
    proc = snakemake("-n", "--configfile", str(TINY), "--config", "training={token_budget: 20000}", cwd=tmp_path)
    assert "rule train_student" in proc.stdout
    cfg = coerce_to_schema({"training": {"token_budget": "20000", "lr": "1e-3", "precision": "fp32"},
                            "kd": {"tail_approximation": "true"}})
    assert cfg["training"] == {"token_budget": 20000, "lr": 1e-3, "precision": "fp32"}
    assert cfg["kd"]["tail_approximation"] is True


def test_nested_config_override_of_the_wrong_type_names_the_key(tmp_path):
    proc = snakemake("-n", "--configfile", str(TINY), "--config", "training={token_budget: lots}", cwd=tmp_path,
                     check=False)
    assert proc.returncode != 0 and "training.token_budget" in proc.stdout + proc.stderr


@pytest.mark.parametrize("where", ["overrides", "grid"])
def test_top_k_above_the_vocabulary_through_an_override_or_grid_is_refused_at_planning(tmp_path, tiny, where):
    kd = next(e for e in tiny["experiments"] if e["pipeline"] == "kd")
    if where == "overrides":
        kd["overrides"] = {"kd": {"top_k": 500}}
    else:
        kd["grid"] = {"kd.top_k": [8, 500]}
    # named by the key it was written under (the raw-config check runs before the experiments are resolved)
    with pytest.raises(ConfigError, match=rf"experiments\[\d+\]\.{where}\.kd\.top_k'?: 500 exceeds tokenizer\.vocab_size 96"):
        preflight(tiny)
    proc = snakemake("-n", "--configfile", str(_write(tmp_path, tiny)), cwd=tmp_path, check=False)
    assert proc.returncode != 0 and "kd.top_k" in proc.stdout + proc.stderr


def test_top_k_above_the_real_tokenizer_vocabulary_fails_at_stage_start(tmp_path):
    """Once the tokenizer exists its real size is checked, before the dataset or the teacher is loaded."""
    from conftest import train_arith_tokenizer
    from distill_bench.kd.stage import cache_logits

    tok_dir = train_arith_tokenizer(tmp_path / "tok", 40, 64)
    with pytest.raises(ValueError, match=r"kd\.top_k.*1000 exceeds the \d+ tokens of tokenizer"):
        cache_logits(meter=None, teacher=str(tmp_path / "no_teacher"), tokenizer=str(tok_dir),
                     dataset=str(tmp_path / "no_data"), out_dir=str(tmp_path / "cache"), kd={"top_k": 1000},
                     training={"max_length": 64}, seed=0)


@pytest.mark.parametrize("ref, ok", [
    ("allenai/OLMo-2-0425-1B", True),     # hub id shape, not on disk: a hub id
    ("gpt2", True),
    ("models/teacher", True),             # exists on disk (created below): local, never a hub lookup
    ("./missing", False),
    ("/abs/missing", False),
    ("models/nested/missing", False),     # more than owner/name: a path, and it does not exist
])
def test_local_paths_and_hub_ids_are_told_apart(tmp_path, tiny, monkeypatch, ref, ok):
    from distill_bench.refs import is_local_ref

    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "teacher").mkdir(parents=True)
    assert is_local_ref("models/teacher") and not is_local_ref("allenai/OLMo-2-0425-1B")
    cfg = copy.deepcopy(tiny)
    cfg["students"]["tiny"] = {"init": "pretrained", "name_or_path": ref}
    if ok:
        preflight(cfg)
    else:
        with pytest.raises(ConfigError, match=r"students\.tiny\.name_or_path.*does not exist"):
            preflight(cfg)


def test_missing_relative_dataset_file_is_refused_at_planning_not_looked_up_on_the_hub(tiny):
    cfg = copy.deepcopy(tiny)
    cfg["datasets"]["arith"] = {"source": "tulu3", "path": "data/tulu/train.parquet"}
    with pytest.raises(ConfigError, match=r"datasets\.arith\.path.*does not exist"):
        preflight(cfg)
