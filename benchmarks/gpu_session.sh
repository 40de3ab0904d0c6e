#!/usr/bin/env bash
# The open GPU measurements of issues 4 and 6, as two plans, each one `run` call of at most
# 9 minutes wall (every step under `timeout`, against one deadline for the whole plan):
#
#   single  (kind nvidia-h200, 1 GPU):  OUT=runs/gpu_single bash benchmarks/gpu_session.sh single
#     1. train_bench.py: attention-only 400M (cuDNN flash attention, else XLA + remat), the
#        per-component time shares, the 400M hybrid (tokens/s, MFU)        ~3-5.5 min
#     2. decode_bench.py: the missing 4K and 64K contexts, both models, batch 1 and 32  ~1-2 min
#   dual    (kind nvidia-h200-x2, 2 GPUs): OUT=runs/gpu_dual bash benchmarks/gpu_session.sh dual
#     train_bench.py --two-gpu: the hybrid on a 1-device mesh (reference loss curve), then
#     data-parallel and FSDP on both GPUs from the same initial state and batches, 8 steps;
#     rerun once for what is missing if the first call stopped early       ~3-4 min
#
# Files written under $OUT (at most 6): env.log, train_1gpu.{log,json}, decode.{log,jsonl}
# (single); train_2gpu.{log,json} (dual). A summary table ends the output. The GPU image has no
# `grain` package; neither benchmark imports it. CPU smoke test (extra arguments appended):
#   PATH=.venv/bin:$PATH JAX_PLATFORMS=cpu BENCH_ARGS=--tiny DECODE_ARGS="--tiny --contexts 64" \
#     OUT=/tmp/s bash benchmarks/gpu_session.sh single
#   ... XLA_FLAGS=--xla_force_host_platform_device_count=2 ... gpu_session.sh dual
set -u
PLAN=${1:-}
case "$PLAN" in single|dual) ;; *) echo "usage: OUT=dir bash $0 single|dual" >&2; exit 2 ;; esac
export PYTHONPATH=. PYTHONUNBUFFERED=1
# Keep NVLink multicast off (shared hosts).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-runs/gpu_$PLAN}
DEADLINE=$((SECONDS + ${PLAN_BUDGET_S:-510}))  # whole plan, leaving ~30 s of the 9 minutes
mkdir -p "$OUT"

left() { echo $((DEADLINE - SECONDS)); }
cap() {  # the smaller of $1 and the time left minus $2 seconds of reserve
  local t=$(( $(left) - $2 )); [ "$t" -gt "$1" ] && t=$1; [ "$t" -lt 1 ] && t=1; echo "$t"
}
step() {  # log name, timeout seconds, command...
  local log=$1 limit=$2; shift 2
  echo "[$(date +%T)] $log: timeout ${limit}s: $*" | tee -a "$OUT/$log.log"
  timeout "$limit" "$@" >> "$OUT/$log.log" 2>&1
  local rc=$?
  echo "[$(date +%T)] $log exit $rc$([ $rc = 124 ] && echo ' (timed out)')" | tee -a "$OUT/$log.log"
}

{ nvidia-smi --query-gpu=index,name,driver_version,memory.total,clocks.sm --format=csv
  python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"
} > "$OUT/env.log" 2>&1
cat "$OUT/env.log"

if [ "$PLAN" = single ]; then
  export CUDA_VISIBLE_DEVICES=0 XLA_PYTHON_CLIENT_MEM_FRACTION=0.92
  # --hybrid-step-ms: the hybrid's step of 2026-11-29, for the shares table if the hybrid run
  # itself does not finish.
  step train_1gpu "$(cap 330 100)" python3 benchmarks/train_bench.py --json "$OUT/train_1gpu.json" \
    --hybrid-step-ms 900 ${BENCH_ARGS:-}
  step decode "$(cap 150 5)" python3 benchmarks/decode_bench.py --contexts 4096 65536 \
    --out "$OUT/decode.jsonl" ${DECODE_ARGS:-}
  echo; echo "================ summary (single)"
  if grep -q '^== one device' "$OUT/train_1gpu.log"; then
    sed -n '/^== one device/,$p' "$OUT/train_1gpu.log"
  else
    echo "train_bench did not finish; its last lines:"; tail -n 25 "$OUT/train_1gpu.log"
  fi
  echo
  if grep -q '^model .*batch' "$OUT/decode.log"; then
    sed -n '/^model .*batch/,$p' "$OUT/decode.log"
  else
    echo "decode_bench did not finish; rows so far:"; cat "$OUT/decode.jsonl" 2>/dev/null
    tail -n 5 "$OUT/decode.log"
  fi
else
  step train_2gpu "$(cap 420 10)" python3 benchmarks/train_bench.py --two-gpu \
    --json "$OUT/train_2gpu.json" ${BENCH_ARGS:-}
  # A layout missing (timeout, failure): once more for just what is missing, if time allows.
  if ! grep -q '^2-device losses match 1 device' "$OUT/train_2gpu.log" && [ "$(left)" -gt 100 ]; then
    step train_2gpu "$(cap 420 5)" python3 benchmarks/train_bench.py --two-gpu \
      --json "$OUT/train_2gpu.json" ${BENCH_ARGS:-}
  fi
  echo; echo "================ summary (dual)"
  if grep -q '^== hybrid on 1 vs 2' "$OUT/train_2gpu.log"; then
    awk '/^== hybrid on 1 vs 2/{buf=""; keep=1} keep{buf=buf $0 "\n"} END{printf "%s", buf}' \
      "$OUT/train_2gpu.log"
  else
    echo "train_bench --two-gpu did not finish; its last lines:"; tail -n 25 "$OUT/train_2gpu.log"
  fi
fi
echo "plan $PLAN: $SECONDS s wall; files: $(ls "$OUT" | tr '\n' ' ')"
