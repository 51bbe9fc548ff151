#!/usr/bin/env bash
# Build .whl/: exactly the Python packages our code needs that the lent GPU machines lack (they have torch,
# transformers, accelerate, pandas, pyarrow, numpy, nvidia-ml-py, but no trl, datasets, jsonschema; no network).
# transformers is carried too (device has 5.17): the same trainer code on CPU and GPU.
# Versions follow this checkout's venv (requirements.lock) so CPU and GPU runs use the same trainer code.
# Usage: scripts/build_wheelhouse.sh [PYTHON_VERSION]   (device python is 3.12; see .library/device/KINDS.md)
# On the device: python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
set -euo pipefail
cd "$(dirname "$0")/.."
PYV="${1:-3.12}"
PIP="${PIP:-/work/venv/bin/python -m pip}"
grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl && mkdir -p .whl
PKGS=(
  transformers==5.24.0 trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19           # trainer + dataset stack
  jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1  # stage JSON check
)
$PIP download -q --no-deps --only-binary=:all: --python-version "$PYV" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${PKGS[@]}"
du -sh .whl; ls .whl
total=$(du -sb .whl | cut -f1)
if [ "$total" -gt $((64 * 1024 * 1024)) ]; then echo "wheelhouse is $total bytes > 64 MiB" >&2; exit 1; fi
