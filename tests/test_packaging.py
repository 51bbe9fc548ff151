"""Packaging promises: the version has one source and the CLI prints it, the licence file matches the SPDX string,
test-only helpers do not ship in the package, the conda environment pins exactly what requirements.lock pins, and
`make setup` installs the CPU build of torch unless told otherwise."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

import distill_bench

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]


def lock_pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "-")):
            name, _, version = line.partition("==")
            pins[name.lower().replace("_", "-")] = version
    return pins


def test_version_flag_prints_the_package_version():
    out = subprocess.run([sys.executable, "-m", "distill_bench", "--version"], capture_output=True, text=True,
                         check=True, cwd=ROOT).stdout
    assert out.strip() == f"distill-bench {distill_bench.__version__}"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["dynamic"] == ["version"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "distill_bench.__version__"}


def test_license_file_matches_the_spdx_string():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "Apache-2.0" and project["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text


def test_no_test_only_helpers_ship_in_the_package():
    shipped = [p.relative_to(ROOT).as_posix() for p in (ROOT / "distill_bench").rglob("*.py")]
    assert not [p for p in shipped if "toy" in Path(p).stem], shipped
    for path in [*(ROOT / "distill_bench").rglob("*.py"), *(ROOT / "benchmarks").glob("*.py")]:
        text = path.read_text()
        assert "from toy_" not in text and "import tests" not in text and "from tests" not in text, path


def test_conda_environment_pins_exactly_the_lock():
    env = yaml.safe_load((ROOT / "envs" / "distill-bench.yaml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    pins = {}
    for item in pip_section:
        if item.startswith("-"):
            continue
        name, _, version = item.partition("==")
        pins[name.lower().replace("_", "-")] = version
    lock = lock_pins()
    assert pins.pop("torch") == lock.pop("torch") + "+cpu"
    assert pins == lock
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in pip_section


def test_make_setup_installs_the_cpu_torch_build_by_default():
    def dry(*args):
        return subprocess.run(["make", "-n", "-B", "setup", *args], capture_output=True, text=True, cwd=ROOT)

    version = lock_pins()["torch"]
    cpu = dry().stdout
    # pip's own indexes and find-links first (an offline mirror or wheel dir); PyTorch's CPU index only if they fail
    local, _, fallback = cpu.partition(f'"torch=={version}+cpu" || ')
    assert local.rstrip().endswith("pip install -q"), cpu
    assert fallback.startswith(".venv/bin/python -m pip install -q "
                               f'"torch=={version}+cpu" --extra-index-url https://download.pytorch.org/whl/cpu'), cpu
    assert cpu.index("+cpu") < cpu.index("-r requirements.lock"), "the variant must be installed before the lock"
    cuda = dry("TORCH_VARIANT=cuda").stdout
    assert f'"torch=={version}"' in cuda and "+cpu" not in cuda
    bad = dry("TORCH_VARIANT=rocm")
    assert bad.returncode != 0 and "TORCH_VARIANT must be cpu or cuda" in bad.stderr


def test_make_test_runs_ruff_snakefmt_and_snakemake_lint_before_the_tests():
    plan = subprocess.run(["make", "-n", "-B", "test"], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    steps = ["ruff check .", "snakefmt --check Snakefile rules/", "snakemake --lint", "pytest"]
    positions = [plan.find(s) for s in steps]
    assert -1 not in positions and positions == sorted(positions), plan
    pins = lock_pins()
    assert "ruff" in pins and "snakefmt" in pins
