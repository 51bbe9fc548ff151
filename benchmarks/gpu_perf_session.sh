#!/usr/bin/env bash
# One GPU session for "performance at the study's scale", on a 2 x H200 machine, in at most ~9 minutes:
#   (a) 7B student SFT and KD with FSDP on 2 GPUs through the real train stage + a 1-vs-2-GPU loss-curve check,
#   (b) DPO through the same launch, (c) 1B at batch 4: HF's fused AdamW vs the clip folded into it
#   (training.optim: adamw_fused_clip) vs foreach AdamW, SFT vs KD.
# (a)-(c) fill the ~9 minutes. SESSION_PLAN=one-gpu is the plan for one H200/H100 instead: (d) the logit cache of
# the 32B teacher shape against a bare forward of the same batches, then (c) interleaved (a throwaway run first,
# forward then backward) with fewer variants, and two micro-batches per step (grad_accum 2) beside batch 4.
# Every step is time-boxed (timeout), so one failure or hang cannot eat the call; after each step any process still
# holding a GPU (started by this session: the machine is the session's own) is killed by its pid.
#
#   bash benchmarks/gpu_perf_session.sh            # on the device; writes to $OUT (<= 8 files), table at the end
#   SESSION_PLAN=one-gpu bash benchmarks/gpu_perf_session.sh   # the one-GPU plan
#   bash benchmarks/gpu_perf_session.sh --quick    # CPU: every step's --quick path (tests/test_benchmarks.py;
#                                                  # SESSION_QUICK_RUNS / SESSION_QUICK_VARIANTS narrow it)
set -u
cd "$(dirname "$0")/.."
QUICK=""
[ "${1:-}" = "--quick" ] && QUICK="--quick"
OUT="${OUT:?set OUT to the output folder}"
mkdir -p "$OUT"
WORK="$(mktemp -d /tmp/perf_session.XXXXXX)"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1   # never NVLink multicast
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ -z "$QUICK" ] && compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PWD"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
PY="${PYTHON:-python3}"
T0=$(date +%s)
STEPS="$WORK/steps.tsv"
printf 'step\trc\tseconds\tlimit\n' > "$STEPS"

gpu_pids() {
  command -v nvidia-smi > /dev/null && nvidia-smi --query-compute-apps=pid --format=csv,noheader 2>/dev/null | tr -d ' '
}

# step NAME LIMIT_S COMMAND... : run with a wall limit, log to $WORK/NAME.log, record rc and seconds
step() {
  local name=$1 limit=$2; shift 2
  local t=$(date +%s)
  echo "[$(( t - T0 ))s] step $name (limit ${limit}s): $*"
  timeout -k 15 "$limit" "$@" > "$WORK/$name.log" 2>&1
  local rc=$?
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - t ))" "$limit" >> "$STEPS"
  echo "[$(( $(date +%s) - T0 ))s] step $name: rc $rc"; tail -n 25 "$WORK/$name.log"
  for pid in $(gpu_pids); do   # a hung worker of this step must not hold the GPUs for the next one
    echo "killing leftover GPU process $pid"; kill -9 "$pid" 2>/dev/null
  done
}

# seconds left before the ~9-minute mark; later steps shrink or are skipped by it
left() { echo $(( ${SESSION_S:-535} - ($(date +%s) - T0) )); }
OPT_VARIANTS=sft_gpu_defaults,sft_gpu_defaults_fusedclip,kd_gpu_defaults_fusedclip,kd_gpu_defaults,sft_gpu_defaults_foreach
ONE_GPU_VARIANTS=sft_gpu_defaults_fusedclip,sft_gpu_defaults,kd_gpu_defaults,sft_gpu_defaults_ga2
PLAN="${SESSION_PLAN:-two-gpu}"
case "$PLAN" in two-gpu|one-gpu) ;; *) echo "SESSION_PLAN=$PLAN: expected two-gpu or one-gpu" >&2; exit 2 ;; esac

if [ -n "$QUICK" ] && [ "$PLAN" = one-gpu ]; then
  step d_cache 600 "$PY" benchmarks/gpu_suite.py --out "$WORK/cache" --quick --sections caching
  step c_optimizer 600 "$PY" benchmarks/gpu_trainer.py --out "$WORK/trainer" --quick --checks sdpa --repeats 2 \
    --variants "${SESSION_QUICK_VARIANTS:-$ONE_GPU_VARIANTS}"
elif [ "$PLAN" = one-gpu ]; then
  # (d): the study's teacher shape, 64 GB of bf16: 256 sequences of 512-1024 tokens, bare / cache / cache / bare
  step d_cache 200 "$PY" benchmarks/gpu_suite.py --out "$WORK/cache" --sections caching --cache-shape olmo2-32b \
    --budget-s 185
  L=$(left)
  if [ "$L" -gt 60 ]; then
    step c_optimizer "$L" "$PY" benchmarks/gpu_trainer.py --out "$WORK/trainer" --batch 4 --fresh-shapes \
      --examples 512 --warmup-steps 30 --timed-s 6 --max-wall-s 40 --budget-s $(( L - 10 )) --fixed-cost-s 25 \
      --checks sdpa --throwaway --repeats 2 --variants "$ONE_GPU_VARIANTS"
  fi
elif [ -n "$QUICK" ]; then
  step a_multi 600 "$PY" benchmarks/gpu_multi.py --out "$WORK/multi" --quick \
    --runs "${SESSION_QUICK_RUNS:-sft,kd,losscheck,dpo}"
  step c_optimizer 600 "$PY" benchmarks/gpu_trainer.py --out "$WORK/trainer" --quick --checks sdpa \
    --variants "${SESSION_QUICK_VARIANTS:-$OPT_VARIANTS}"
else
  # (a)+(b): 134M 1-vs-2-GPU FSDP loss check first (cheap, tells whether FSDP runs at all), 7B SFT, 7B KD, 1B DPO;
  # each run is skipped when it cannot finish inside the budget
  # (MULTI_SHAPE=olmo2-13b MULTI_RUNS=sft,kd MULTI_S=520 MULTI_ARGS=--gradient-checkpointing: the 13B student)
  MULTI_S=${MULTI_S:-420}
  step a_multi "$MULTI_S" "$PY" benchmarks/gpu_multi.py --out "$WORK/multi" --runs "${MULTI_RUNS:-losscheck,sft,kd,dpo}" \
    --shape "${MULTI_SHAPE:-olmo2-7b}" --gpus 2 --distributed fsdp --per-gpu-batch 4 --steps 12 \
    --budget-s $(( MULTI_S - 20 )) ${MULTI_ARGS:-}
  # (c): OLMo-2-1B at batch 4, GPU defaults, fresh shapes: the optimizer step (HF's fused AdamW, the clip folded
  # into it, foreach AdamW), SFT vs KD; with ~100 s left the first two variants fit (the fused/folded comparison)
  L=$(left)
  if [ "$L" -gt 60 ]; then
    step c_optimizer "$L" "$PY" benchmarks/gpu_trainer.py --out "$WORK/trainer" --batch 4 --fresh-shapes \
      --examples 512 --warmup-steps 30 --timed-s 6 --max-wall-s 40 --budget-s $(( L - 10 )) --fixed-cost-s 25 \
      --checks sdpa --variants "$OPT_VARIANTS"
  fi
fi

# results: the headline JSONs, the step table and one tarball of everything (logs, stage JSONs): <= 8 files
for f in "$WORK"/multi/multi_gpu.json "$WORK"/trainer/trainer_runs.json "$WORK"/cache/caching_*.json; do
  [ -f "$f" ] && cp "$f" "$OUT/"
done
cp "$STEPS" "$OUT/steps.tsv"
"$PY" benchmarks/perf_session_summary.py "$WORK" | tee "$OUT/summary.txt"
tar -czf "$OUT/session.tar.gz" -C "$WORK" .
echo "session: $(( $(date +%s) - T0 ))s; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
