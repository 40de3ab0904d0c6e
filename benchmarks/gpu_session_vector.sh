#!/usr/bin/env bash
# One device call (kind nvidia-h200-x2, carry ["runs/s5_long/seed0"]): the vector-state kernels
# (pallas_gpu_vector) checked and timed on GPU 0 while S5 trains on GPU 1.
#
#   device: OUT=$OUT bash benchmarks/gpu_session_vector.sh [BUDGET_S, default 400]
#
# GPU 1: benchmarks/gpu_s5_long.sh trains GPU1_SEEDS (default "0") for BUDGET_S with
# GPU1_BACKEND (default scan); EXTRA_ARGS_SEED<k> as gpu_s5_long.sh documents.
# GPU 0: the state-tracking step bench (scan against the kernels, s5_long.yaml's M2RNN at length
# 64), benchmarks/vector_kernel_bench.py (float32 check against the scan on the GPU, then op
# timings of the configurations that pass; CONFIGS picks them), then GPU0_SEEDS (default "3")
# train for what is left of BUDGET_S with the kernels if the default configuration passed its
# check, else the scan. Checkpoints and logs of both come back in $OUT.
set -u
export PYTHONPATH=. PYTHONUNBUFFERED=1
BUDGET=${1:-400}
start=$(date +%s)
EXTRA_ARGS="--set models.m2rnn.m2rnn.backend=${GPU1_BACKEND:-scan}" SEEDS=${GPU1_SEEDS:-0} \
  GPUS=1 MEM_FRACTION=0.45 bash benchmarks/gpu_s5_long.sh train "$BUDGET" &
CUDA_VISIBLE_DEVICES=0 timeout 150 python3 benchmarks/state_tracking_step_bench.py --widths 64 \
  --variants scan,pallas_gpu_vector --steps 30 --reps 3 > "$OUT/step_bench.txt" 2>&1
CUDA_VISIBLE_DEVICES=0 timeout "${BENCH_TIMEOUT_S:-170}" python3 benchmarks/vector_kernel_bench.py \
  ${CONFIGS:+--configs "$CONFIGS"} > "$OUT/vector_kernel_bench.txt" 2>&1
check_rc=$?  # 124: timed out after the checks; the timings so far are kept
if grep -qE "^CHECK default +PASS" "$OUT/vector_kernel_bench.txt"; then
  backend=pallas_gpu_vector; else backend=scan; fi
left=$((BUDGET - $(date +%s) + start))
echo "kernel bench exit $check_rc; GPU 0 seeds train with backend=$backend for ${left}s"
if [ "$left" -gt 60 ]; then
  EXTRA_ARGS="--set models.m2rnn.m2rnn.backend=$backend" SEEDS=${GPU0_SEEDS:-3} GPUS=0 \
    MEM_FRACTION=0.45 bash benchmarks/gpu_s5_long.sh train "$left"
fi
wait
COLLECT_SEEDS="${GPU1_SEEDS:-0} ${GPU0_SEEDS:-3}" bash benchmarks/gpu_s5_long.sh collect
grep -E "^(CHECK|device)" "$OUT/vector_kernel_bench.txt"
grep "^time" "$OUT/vector_kernel_bench.txt"
tail -n 3 "$OUT/step_bench.txt"
