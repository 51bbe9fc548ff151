#!/usr/bin/env bash
# Build .whl/: every Python package the workflow needs that the lent GPU machines lack, so that
# `snakemake --configfile configs/gpu_single.yaml --cores all` runs there exactly as a user runs it (no network there).
#
# The machines (Python 3.12, x86-64) hold torch, transformers 5.17, accelerate, pandas, pyarrow, numpy, matplotlib,
# nvidia-ml-py, psutil, pyyaml, jinja2, requests, ... (DEVICE_PACKAGES below, from .library/device/KINDS.md,
# 2026-11-17) but not Snakemake, trl, datasets, jsonschema or CodeCarbon. The list to carry is resolved from this
# checkout's virtualenv (its installed versions are requirements.lock): the roots below and, recursively, each
# one's Requires-Dist for Python 3.12 on Linux x86-64, minus what the device has in a version that satisfies it.
# After downloading, every wheel's own Requires-Dist is checked against the wheelhouse and the device list.
#
# Usage: scripts/build_wheelhouse.sh            (PYTHON=path/to/python to use another environment than ./.venv)
# On the device: python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl
#                export PYTHONPATH=/tmp/site:$PWD          (scripts/gpu_workflow_check.sh does both)
set -euo pipefail
cd "$(dirname "$0")/.."
PYV=3.12
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python
  else echo "build_wheelhouse: no ./.venv here (make venv creates it); set PYTHON=/path/to/venv/bin/python" >&2; exit 2
  fi
fi
"$PYTHON" -c 'import snakemake, trl, datasets, jsonschema, codecarbon, packaging' 2>/dev/null || {
  echo "build_wheelhouse: $PYTHON lacks the workflow's packages (snakemake, trl, datasets, jsonschema, codecarbon)" >&2
  exit 2; }
# the workflow's own imports the device lacks; transformers too (5.17 there): the same trainer code on CPU and GPU
ROOTS="snakemake,trl,datasets,jsonschema,codecarbon,transformers"
DEVICE_PACKAGES="absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build
certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers
flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize
hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib
kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py
markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind
narwhals networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc
nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse
nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir
onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging
pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11
py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock
pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors
scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham
simplejson six sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore
threadpoolctl tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics
torchvision tqdm transformers treescope triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig
werkzeug wheel wrapt xarray xxhash yarl zipp"
# versions read there (KINDS.md 'pip list' row): a requirement these do not satisfy is carried instead
DEVICE_VERSIONS="accelerate==1.15.0,huggingface-hub==1.33.0,numpy==2.5.2,safetensors==0.8.0,tokenizers==0.23.2,torch==2.11.0,transformers==5.17.0"
export ROOTS DEVICE_PACKAGES DEVICE_VERSIONS PYV

grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> "$(git rev-parse --git-path info/exclude)"
mkdir -p .whl   # wheels already there are reused (pip download skips them); stale ones are removed below

"$PYTHON" - > .whl/carried.txt <<'EOF'
import importlib.metadata as md, os, re
from packaging.requirements import Requirement
from packaging.version import Version

ENV = {"python_version": os.environ["PYV"], "python_full_version": os.environ["PYV"] + ".3", "sys_platform": "linux",
       "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix", "implementation_name": "cpython",
       "platform_python_implementation": "CPython", "extra": ""}
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
device = {norm(x) for x in os.environ["DEVICE_PACKAGES"].split()}
known = {norm(k): v for k, v in (kv.split("==") for kv in os.environ["DEVICE_VERSIONS"].split(","))}
carry, todo = {}, [norm(r) for r in os.environ["ROOTS"].split(",")]
while todo:
    name = todo.pop()
    if name in carry:
        continue
    dist = md.distribution(name)
    carry[name] = dist.version
    for raw in dist.requires or []:
        req = Requirement(raw)
        if req.marker and not req.marker.evaluate(ENV):
            continue
        dep = norm(req.name)
        if dep in device and not (dep in known and Version(known[dep]) not in req.specifier):
            continue
        todo.append(dep)
for name, version in sorted(carry.items()):
    print(f"{name}=={version}")
EOF
echo "carrying $(wc -l < .whl/carried.txt) packages (versions of $PYTHON):"; tr '\n' ' ' < .whl/carried.txt; echo

PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_24_x86_64
           --platform manylinux_2_31_x86_64 --platform manylinux_2_34_x86_64 --platform manylinux_2_35_x86_64)
while read -r spec; do
  if ! "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYV" --implementation cp \
        "${PLATFORMS[@]}" -d .whl "$spec" 2>/dev/null; then
    # no wheel on the index (sdist only): build one here; only pure-Python packages end up this way
    "$PYTHON" -m pip wheel -q --no-deps -w .whl "$spec"
  fi
done < .whl/carried.txt

"$PYTHON" scripts/slim_wheels.py .whl   # executables for other platforms out (PuLP bundles CBC for every OS)
"$PYTHON" - <<'EOF'
# drop wheels of an earlier build that this one does not carry (two versions of a package break the install)
import re
from pathlib import Path
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
wanted = {tuple(norm(x) for x in line.strip().split("==")) for line in open(".whl/carried.txt") if line.strip()}
for path in Path(".whl").glob("*.whl"):
    name, version = path.name.split("-")[:2]
    if (norm(name), norm(version)) not in wanted:
        print(f"removing stale {path.name}")
        path.unlink()
EOF

"$PYTHON" - <<'EOF'
# every carried wheel: one version per package, built for this platform, its needs met by the wheelhouse or device
import os, re, sys, zipfile
from email.parser import Parser
from pathlib import Path
from packaging.requirements import Requirement
from packaging.version import Version

ENV = {"python_version": os.environ["PYV"], "python_full_version": os.environ["PYV"] + ".3", "sys_platform": "linux",
       "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix", "implementation_name": "cpython",
       "platform_python_implementation": "CPython", "extra": ""}
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
device = {norm(x) for x in os.environ["DEVICE_PACKAGES"].split()}
known = {norm(k): v for k, v in (kv.split("==") for kv in os.environ["DEVICE_VERSIONS"].split(","))}
wheels, meta = {}, {}
for path in sorted(Path(".whl").glob("*.whl")):
    python_tag, abi, platform = path.stem.split("-")[-3:]
    minor = int(os.environ["PYV"].split(".")[1])
    pythons = python_tag.split(".")
    ok_python = (any(t in ("py3", f"py3{minor}", f"cp3{minor}") for t in pythons)
                 or (abi == "abi3" and any(t.startswith("cp3") and int(t[3:]) <= minor for t in pythons)))
    ok_platform = platform == "any" or all("linux" in p and "x86_64" in p for p in platform.split("."))
    if not (ok_python and ok_platform):
        sys.exit(f"build_wheelhouse: {path.name} is not for CPython {os.environ['PYV']} on x86-64 Linux")
    with zipfile.ZipFile(path) as zf:
        info = Parser().parsestr(zf.read(next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))).decode())
    name = norm(info["Name"])
    if name in wheels:
        sys.exit(f"build_wheelhouse: two versions of {name}: {wheels[name][1].name} and {path.name}")
    wheels[name] = (Version(info["Version"]), path)
    meta[name] = info.get_all("Requires-Dist") or []
problems = []
for name, reqs in meta.items():
    for raw in reqs:
        req = Requirement(raw)
        if req.marker and not req.marker.evaluate(ENV):
            continue
        dep = norm(req.name)
        if dep in wheels:
            if wheels[dep][0] not in req.specifier:
                problems.append(f"{name} needs {raw}; carried {dep} {wheels[dep][0]}")
        elif dep in device:
            if dep in known and Version(known[dep]) not in req.specifier:
                problems.append(f"{name} needs {raw}; the device has {dep} {known[dep]}")
        else:
            problems.append(f"{name} needs {raw}: neither carried nor on the device")
if problems:
    sys.exit("build_wheelhouse: unmet requirements:\n  " + "\n  ".join(problems))
print(f"checked {len(wheels)} wheels: every Requires-Dist met by the wheelhouse or the device")
EOF
wheels=$(du -sb .whl | cut -f1)
tree=$(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
echo "wheelhouse $((wheels / 1024 / 1024)) MiB + tracked files $((tree / 1024 / 1024)) MiB"
if [ $((wheels + tree)) -gt $((64 * 1024 * 1024)) ]; then
  echo "build_wheelhouse: wheels + repository exceed the 64 MiB a device call can carry" >&2; exit 1
elif [ $((wheels + tree)) -gt $((63 * 1024 * 1024)) ]; then
  # the device tool counts a little more than these bytes: a tree 0.2 MiB under 64 MiB by this sum was refused
  echo "build_wheelhouse: warning: within 1 MiB of the 64 MiB limit; a call that needs no workflow can leave" \
    "pulp (the scheduler's ILP solver) and pycountry (CodeCarbon's) out of .whl/" >&2
fi
