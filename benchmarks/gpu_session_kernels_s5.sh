#!/usr/bin/env bash
# One device call (kind nvidia-h200-x2, carry [".whl", "runs/s5_long"]), ~9.5 minutes:
#   GPU 0: the Mosaic kernels' SASS/ptxas summary (benchmarks/gpu_sass.sh, small shape), an
#          optional extra correctness check (CHECK_ARGS), mosaic_check with KERNEL_ARGS; then,
#          with S3=1, S3 for every model (configs/state_tracking/s3.yaml, 3 seeds, one process
#          per model) for the rest of the call;
#   GPU 1: the long S5 runs (benchmarks/gpu_s5_long.sh, all three seeds) and S5_VARIANTS of
#          benchmarks/state_tracking_sweep.py side by side.
#   device:  OUT=$OUT bash benchmarks/gpu_session_kernels_s5.sh
#   here:    bash benchmarks/gpu_s5_long.sh unpack FILES_AT; tar xzf FILES_AT/logs.tgz -C DIR
# Brings back the three S5 checkpoints, s5_long_results.tgz and logs.tgz (every log).
# 2026-11-30 (third session), call 1: the defaults below. Call 2:
#   S5_VARIANTS= S3=1 CHECK_ARGS="--no-timing --check-shape 2x2048x4 --fwd f16_state,f16_state_tanh_scatter
#   --only c32,c32_scatter_f16,c32_scatter_f16_tanh" KERNEL_ARGS="--fwd warp_scatter,f16_state,f16_tanh,
#   f16_state_scatter,f16_state_tanh_scatter --only c32,c32_scatter,c32_scatter_f16,c32_scatter_f16_tanh"
set -u
export PYTHONPATH=. PYTHONUNBUFFERED=1
START=$(date +%s)
BUDGET=${BUDGET_S:-420}
LOGS=/tmp/logs && mkdir -p $LOGS
S5_VARIANTS=${S5_VARIANTS-h32_v64_gatemid_seed1,h32_v64_gatemid_seed2}
KERNEL_ARGS=${KERNEL_ARGS:---probe --fwd warp_scatter --only c32,c32_scatter}
(GPUS="1" MEM_FRACTION=0.15 OUT=$OUT bash benchmarks/gpu_s5_long.sh run $BUDGET \
  > $LOGS/s5_long.txt 2>&1) &
if [ -n "$S5_VARIANTS" ]; then
  (XLA_PYTHON_CLIENT_MEM_FRACTION=0.15 python3 benchmarks/state_tracking_sweep.py --gpu 1 \
    --time-budget-s $BUDGET --out /tmp/sweep --variants $S5_VARIANTS > $LOGS/sweep.txt 2>&1;
    cp /tmp/sweep/*.log $LOGS/) &
fi
CUDA_VISIBLE_DEVICES=0 SASS_TIMEOUT_S=150 OUT=$LOGS \
  MOSAIC_ARGS='--fwd= --only c32 --shapes 2x512x8 --skip-forward' \
  bash benchmarks/gpu_sass.sh > $LOGS/sass.txt 2>&1
if [ -n "${CHECK_ARGS:-}" ]; then
  CUDA_VISIBLE_DEVICES=0 timeout 120 python3 benchmarks/mosaic_check.py $CHECK_ARGS \
    > $LOGS/check.txt 2>&1
fi
CUDA_VISIBLE_DEVICES=0 timeout 330 python3 benchmarks/mosaic_check.py $KERNEL_ARGS \
  > $LOGS/kernels.txt 2>&1
echo "kernels exit $?"
if [ "${S3:-0}" = 1 ]; then
  S3_BUDGET=$(( BUDGET + 60 - ($(date +%s) - START) ))
  [ $S3_BUDGET -lt 60 ] && S3_BUDGET=60
  for m in m2rnn attention attention_rope mamba2 gated_deltanet; do
    CUDA_VISIBLE_DEVICES=0 XLA_PYTHON_CLIENT_MEM_FRACTION=0.15 timeout $((S3_BUDGET + 90)) \
      python3 -m train.state_tracking.cli --no-progress --config configs/state_tracking/s3.yaml \
      --models $m --seeds 3 --steps 6000 --batch-size 256 --time-budget-s $S3_BUDGET \
      --out $LOGS/s3/$m > $LOGS/s3_$m.txt 2>&1 &
  done
fi
wait
(cd /tmp && tar czf "$OUT/logs.tgz" --exclude=checkpoints logs)
grep -A40 "^forward ablations" $LOGS/kernels.txt
grep -A30 "^shape " $LOGS/kernels.txt
grep "correctness" $LOGS/kernels.txt $LOGS/check.txt 2>/dev/null
head -n 40 $LOGS/summary.txt 2>/dev/null
tail -n 12 $LOGS/sweep.txt 2>/dev/null
tail -n 3 $LOGS/s3_*.txt 2>/dev/null
tail -n 16 $LOGS/s5_long.txt
