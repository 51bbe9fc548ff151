"""Packaging promises: the version has one source and the CLI prints it, the licence file matches the SPDX string,
test-only helpers do not ship in the package, the conda environment pins exactly what requirements.lock pins, and
`make setup` installs the CPU build of torch unless told otherwise, and the GPU wheelhouse drops executables no
x86-64 Linux machine runs."""
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


def _wheel(path: Path, files: dict[str, bytes]) -> Path:
    """A minimal valid wheel holding ``files`` (with METADATA, WHEEL and a RECORD listing every file)."""
    import zipfile

    info = "pulp-3.3.2.dist-info"
    files = {**files, f"{info}/METADATA": b"Metadata-Version: 2.1\nName: pulp\nVersion: 3.3.2\n",
             f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = "".join(f"{name},,\n" for name in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
        zf.writestr(f"{info}/RECORD", record)
    return path


def test_wheelhouse_drops_pulps_foreign_solvers_and_pip_installs_the_slim_wheel(tmp_path):
    import zipfile

    cbc = "pulp/solverdir/cbc"
    wheel = _wheel(tmp_path / "pulp-3.3.2-py3-none-any.whl", {
        "pulp/__init__.py": b"", f"{cbc}/linux/i64/cbc": b"x86-64 linux" * 100, f"{cbc}/linux/arm64/cbc": b"arm" * 100,
        f"{cbc}/linux/i32/cbc": b"i32" * 100, f"{cbc}/win/i64/cbc.exe": b"win" * 100, f"{cbc}/osx/i64/cbc": b"mac" * 100})
    run = [sys.executable, str(ROOT / "scripts" / "slim_wheels.py"), str(tmp_path)]
    assert "foreign executables dropped" in subprocess.run(run, capture_output=True, text=True, check=True).stdout
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        record = {line.split(",")[0] for line in zf.read("pulp-3.3.2.dist-info/RECORD").decode().splitlines()}
    assert {"pulp/__init__.py", f"{cbc}/linux/i64/cbc"} <= names
    assert not any(n.startswith((f"{cbc}/win", f"{cbc}/osx", f"{cbc}/linux/arm64", f"{cbc}/linux/i32")) for n in names)
    assert record == names                                  # RECORD lists exactly what the wheel holds
    assert subprocess.run(run, capture_output=True, text=True, check=True).stdout == ""   # a second pass: no change
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", str(target),
                    str(wheel)], check=True, capture_output=True)
    assert (target / cbc / "linux" / "i64" / "cbc").read_bytes() == b"x86-64 linux" * 100


def test_build_wheelhouse_slims_the_wheels_before_it_sizes_them():
    script = (ROOT / "scripts" / "build_wheelhouse.sh").read_text()
    assert script.index("scripts/slim_wheels.py") < script.index("wheels + repository exceed")
