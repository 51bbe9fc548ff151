#!/usr/bin/env bash
# The single-GPU workflow run, checked against the GPU's own counters read outside the workflow.
#
#   scripts/gpu_workflow_check.sh            on a GPU machine with no network: installs .whl/ (scripts/build_wheelhouse.sh)
#                                            into /tmp/site, reads every GPU's energy counter with pynvml, runs
#                                            `snakemake --configfile configs/gpu_single.yaml --cores all` through the
#                                            default profile, reads the counters again, prints the stages' GPU energy
#                                            against the independent delta, the unattributed share, the wall time and
#                                            the quality ordering, and packs the results into $OUT (default ./gpu_check_out)
#   scripts/gpu_workflow_check.sh --dry      here (CPU): the same steps with `snakemake -n`, the environment's own
#                                            snakemake, no wheels installed
#
#   CONFIGS="configs/gpu_single.yaml configs/gpu_single_shared.yaml" scripts/gpu_workflow_check.sh
#                                            the same run from several config files, later ones overriding earlier
#                                            ones (here: without exclusive GPU leases, for the price of exclusivity)
#
# Extra arguments go to snakemake.
set -euo pipefail
cd "$(dirname "$0")/.."
DRY=0
if [ "${1:-}" = "--dry" ]; then DRY=1; shift; fi
CONFIGS="${CONFIGS:-configs/gpu_single.yaml}"
OUT="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$OUT"
WORK=$(mktemp -d)
PY=python3
if [ "$DRY" = 0 ] && ls .whl/*.whl >/dev/null 2>&1; then   # the wheels are for the device's Python 3.12
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH
elif [ "$DRY" = 0 ] && ! python3 -c 'import snakemake' 2>/dev/null; then
  echo "gpu_workflow_check: no .whl/ here and no snakemake: run scripts/build_wheelhouse.sh first" >&2; exit 2
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=disabled PYTHONUNBUFFERED=1
# the results directory: the last of the config files that names one (Snakemake merges them in that order)
RESULTS=$($PY -c "import sys, yaml
print([c['results_dir'] for c in map(lambda p: yaml.safe_load(open(p)) or {}, sys.argv[1:]) if 'results_dir' in c][-1])" $CONFIGS)

read_counters() {   # independent of distill_bench: a few lines of pynvml
  $PY - "$1" <<'EOF'
import datetime, json, sys
out = {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(), "devices": {}}
try:
    import pynvml
    pynvml.nvmlInit()
    for i in range(pynvml.nvmlDeviceGetCount()):
        handle = pynvml.nvmlDeviceGetHandleByIndex(i)
        out["devices"][f"gpu{i}"] = pynvml.nvmlDeviceGetTotalEnergyConsumption(handle) / 1000.0
    pynvml.nvmlShutdown()
except Exception as exc:
    out["error"] = f"{type(exc).__name__}: {exc}"
json.dump(out, open(sys.argv[1], "w"))
print("counters:", out)
EOF
}

$PY -c 'import torch, snakemake; print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
"gpus", torch.cuda.device_count(), "| snakemake", snakemake.__version__)' 2>&1 || true
read_counters "$WORK/before.json"
set +e
if [ "$DRY" = 1 ]; then
  snakemake -n --configfile $CONFIGS --cores all "$@" 2>&1 | tee "$OUT/snakemake.log" | tail -25
else
  # SNAKEMAKE_TIMEOUT (seconds) stops the run with SIGINT so the counters, the check and the partial results still
  # come back when the caller's own limit is near
  ${SNAKEMAKE_TIMEOUT:+timeout --signal=INT --kill-after=30 "$SNAKEMAKE_TIMEOUT"} \
    snakemake --configfile $CONFIGS --cores all "$@" 2>&1 | tee "$OUT/snakemake.log" | tail -40
fi
status=${PIPESTATUS[0]}
set -e
read_counters "$WORK/after.json"
echo "snakemake exit status: $status"
check=0
if [ "$DRY" = 0 ]; then
  $PY -m distill_bench.report.run_check "$RESULTS" --before "$WORK/before.json" --after "$WORK/after.json" \
    | tee "$OUT/check.txt" || check=$?
  for f in run_timeline.png reconciliation.md comparison.md; do
    [ -f "$RESULTS/summary/$f" ] && cp "$RESULTS/summary/$f" "$OUT/"
  done
  # everything else in one archive (the summary, stage JSONs with their timelines, run snapshots, logs)
  tar -czf "$OUT/gpu_check.tar.gz" -C "$WORK" before.json after.json -C "$PWD" \
    $(cd "$PWD" && ls -d "$RESULTS"/summary "$RESULTS"/energy "$RESULTS"/logs "$RESULTS"/env 2>/dev/null) \
    --exclude='*.codecarbon' 2>/dev/null || true
  ls -la "$OUT"
else
  cp "$WORK/before.json" "$WORK/after.json" "$OUT/"
  echo "dry mode: planned the run above; counters read (or their error recorded) in $OUT/before.json, after.json"
fi
rm -rf "$WORK"
[ "$status" = 0 ] || exit "$status"
exit "$check"
