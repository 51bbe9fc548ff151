"""`distill-bench stage`: a stage runs without Snakemake, with the arguments in the README's order."""
from __future__ import annotations

import json

from distill_bench.cli import main

ENERGY = json.dumps({"policy": "measured", "sample_interval_s": 0.2, "codecarbon": False})
SPEC = json.dumps({"source": "embedded", "n_train": 12, "n_eval": 4, "max_length": 96,
                   "task": {"min_steps": 2, "max_steps": 2, "max_operand": 9}})


def _run(tmp_path, argv_tail):
    out = tmp_path / "data"
    energy_json = tmp_path / "energy" / "data.prepare.arith.json"
    rc = main(["stage", "prepare_data", *argv_tail(str(energy_json), str(out))])
    assert rc == 0
    record = json.loads(energy_json.read_text())
    assert record["status"] == "complete" and record["stage_id"] == "data.prepare.arith"
    assert (out / "dataset_dict.json").exists() or any(out.iterdir())


def test_readme_order_options_first_then_key_value(tmp_path):
    _run(tmp_path, lambda ej, out: ["--energy-json", ej, "--stage-id", "data.prepare.arith", "--energy", ENERGY,
                                    "dataset_name=arith", f"spec={SPEC}", "seed=3", f"out_dir={out}"])


def test_key_value_pairs_between_options(tmp_path):
    _run(tmp_path, lambda ej, out: ["dataset_name=arith", "--energy-json", ej, f"spec={SPEC}", "--stage-id",
                                    "data.prepare.arith", "seed=3", "--energy", ENERGY, f"out_dir={out}"])


def test_workflow_adapter_takes_the_meter_settings_from_the_config_not_the_params(monkeypatch, tmp_path):
    """Energy settings are not rule params (changing them must rerun no stage): the adapter reads them from the
    config the Snakefile annotated, lease lock directory included."""
    from types import SimpleNamespace

    import distill_bench.energy.lease as lease_mod
    import distill_bench.stages as stages

    seen = {}
    monkeypatch.setattr(lease_mod, "lease_for_job", lambda gpus, **kw: seen.setdefault("lock_dir", kw["lock_dir"]))
    monkeypatch.setattr(stages, "run_named_stage", lambda name, **kw: seen.update(kw))

    class Named(dict):
        def items(self):
            return super().items()

    settings = {"policy": "measured", "sample_interval_s": 0.3, "lock_dir": str(tmp_path / "locks")}
    smk = SimpleNamespace(log=[], rule="prepare_data", threads=1, resources={},
                          input=Named(), output=Named(out_dir=str(tmp_path / "d"), energy_json=str(tmp_path / "e.json")),
                          params=Named(stage_id="data.prepare.arith", role="data", dataset_name="arith"),
                          config={stages.METER_SETTINGS_KEY: settings})
    stages.run_from_snakemake(smk, "prepare_data")
    assert seen["lock_dir"] == str(tmp_path / "locks")
    assert seen["meter_args"]["energy"] == settings and seen["meter_args"]["stage_id"] == "data.prepare.arith"
    assert "energy" not in seen["kwargs"]
