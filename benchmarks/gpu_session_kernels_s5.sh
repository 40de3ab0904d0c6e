#!/usr/bin/env bash
# One device call (kind nvidia-h200-x2, carry [".whl", "runs/s5_long"]), ~9.5 minutes:
#   GPU 0: with SASS=1 the Mosaic kernels' SASS/ptxas summary (benchmarks/gpu_sass.sh, small
#          shape), with STEP_BENCH_ARGS the S5 train step's timings
#          (benchmarks/state_tracking_step_bench.py), an optional correctness check (CHECK_ARGS
#          for mosaic_check, CHECK_TIMEOUT_S), the kernel timings (KERNEL_CMD), then for the rest of the call
#          the S5 seeds S5_GPU0_SEEDS (if any) and AFTER_KERNELS: s3 = S3 for every model
#          (configs/state_tracking/s3.yaml, 3 seeds, 6000 steps, one process per model), or
#          train_bench = the 400M hybrid's train step (benchmarks/train_bench.py);
#   GPU 1: the long S5 runs (benchmarks/gpu_s5_long.sh, the seeds S5_GPU1_SEEDS, default all
#          three, BUDGET_S seconds; EXTRA_ARGS_SEED<k> are seed k's cli flags),
#          S5_VARIANTS of benchmarks/state_tracking_sweep.py and, with S5_BASELINES=1, the
#          baselines of configs/state_tracking/s5_long.yaml (seed 0, one process per model,
#          from scratch: not carried between calls), side by side.
#   device:  OUT=$OUT bash benchmarks/gpu_session_kernels_s5.sh
#   here:    bash benchmarks/gpu_s5_long.sh unpack FILES_AT; tar xzf FILES_AT/logs.tgz -C DIR
# Brings back the three S5 checkpoints, s5_long_results.tgz and logs.tgz (every log and result
# file, no checkpoints).
# 2026-11-30, third session (calls 1 and 2 ran commits 082d3b8 and fccaea6, whose variant names they use):
#   call 1: S5_BASELINES=0 S5_VARIANTS=h32_v64_gatemid_seed1,h32_v64_gatemid_seed2
#           KERNEL_CMD="python3 benchmarks/mosaic_check.py --probe --fwd warp_scatter --only c32,c32_scatter"
#   call 2: S5_BASELINES=0 AFTER_KERNELS=s3 CHECK_ARGS="--no-timing --check-shape 2x2048x4 --fwd f16_state,
#           f16_state_tanh_scatter --only c32,c32_scatter_f16,c32_scatter_f16_tanh"
#           KERNEL_CMD="python3 benchmarks/mosaic_check.py --fwd warp_scatter,f16_state,f16_tanh,
#           f16_state_scatter,f16_state_tanh_scatter --only c32,c32_scatter,c32_scatter_f16,c32_scatter_f16_tanh"
#   call 3: AFTER_KERNELS=train_bench (the rest: the defaults below).
# 2026-11-30, fourth session (calls 1 and 2; call 3 ran gpu_s5_long.sh alone, see RESULTS.md):
#   call 1 (dd351b2): BUDGET_S=420 S5_BASELINES=0 EXTRA_ARGS_SEED0="--set train.steps=100000"
#           EXTRA_ARGS_SEED1="--lr 1e-3" EXTRA_ARGS_SEED2="--lr 1e-3" STEP_BENCH_ARGS="--widths 8,64
#           --variants scan,unroll_full,command_buffer_while,pallas_gpu --reps 5 --steps 50"
#           KERNEL_CMD="python3 benchmarks/mosaic_check.py --fwd hi_lo_bits --only c32,c32_hi_lo_bits"
#   call 2 (f780236's tree): BUDGET_S=420 S5_BASELINES=0 S5_GPU1_SEEDS=0 S5_GPU0_SEEDS=2
#           EXTRA_ARGS_SEED0="--lr 1e-3 --set train.steps=140000"
#           EXTRA_ARGS_SEED2="--lr 1e-3 --set train.steps=180000" CHECK_TIMEOUT_S=220
#           CHECK_ARGS="--fwd hi_lo_cvt --only c32,c32_hi_lo_cvt" (KERNEL_CMD: the default)
set -u
export PYTHONPATH=. PYTHONUNBUFFERED=1
START=$(date +%s)
BUDGET=${BUDGET_S:-420}
LOGS=/tmp/logs && mkdir -p $LOGS
S5_VARIANTS=${S5_VARIANTS:-}
KERNEL_CMD=${KERNEL_CMD:-python3 benchmarks/kernel_bench.py --variants none --reps 10 --workers 16}
AFTER_KERNELS=${AFTER_KERNELS:-}
ST="python3 -m m2rnn_experiments.state_tracking.cli --no-progress"
S5="bash benchmarks/gpu_s5_long.sh"
(SEEDS="${S5_GPU1_SEEDS:-0 1 2}" GPUS="1" MEM_FRACTION=0.15 OUT=$OUT $S5 train $BUDGET \
  > $LOGS/s5_long.txt 2>&1) &
if [ -n "$S5_VARIANTS" ]; then
  (XLA_PYTHON_CLIENT_MEM_FRACTION=0.15 python3 benchmarks/state_tracking_sweep.py --gpu 1 \
    --time-budget-s $BUDGET --out /tmp/sweep --variants $S5_VARIANTS > $LOGS/sweep.txt 2>&1;
    cp /tmp/sweep/*.log $LOGS/) &
fi
if [ "${S5_BASELINES:-1}" = 1 ]; then
  for m in attention attention_rope mamba2 gated_deltanet; do
    CUDA_VISIBLE_DEVICES=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.1 timeout $((BUDGET + 120)) $ST \
      --config configs/state_tracking/s5_long.yaml --models $m --seeds 1 \
      --time-budget-s $BUDGET --out $LOGS/s5_long_$m > $LOGS/s5_long_$m.txt 2>&1 &
  done
fi
if [ "${SASS:-0}" = 1 ]; then
  CUDA_VISIBLE_DEVICES=0 SASS_TIMEOUT_S=150 OUT=$LOGS \
    MOSAIC_ARGS='--fwd= --only c32 --shapes 2x512x8 --skip-forward' \
    bash benchmarks/gpu_sass.sh > $LOGS/sass.txt 2>&1
fi
if [ -n "${STEP_BENCH_ARGS:-}" ]; then
  CUDA_VISIBLE_DEVICES=0 timeout 240 python3 benchmarks/state_tracking_step_bench.py \
    $STEP_BENCH_ARGS > $LOGS/step_bench.txt 2>&1
fi
if [ -n "${CHECK_ARGS:-}" ]; then
  CUDA_VISIBLE_DEVICES=0 timeout ${CHECK_TIMEOUT_S:-120} python3 benchmarks/mosaic_check.py $CHECK_ARGS \
    > $LOGS/check.txt 2>&1
fi
CUDA_VISIBLE_DEVICES=0 timeout 300 $KERNEL_CMD > $LOGS/kernels.txt 2>&1
echo "kernels exit $? at $(( $(date +%s) - START ))s"
REST=$(( BUDGET + 60 - ($(date +%s) - START) ))
[ $REST -lt 60 ] && REST=60
if [ -n "${S5_GPU0_SEEDS:-}" ]; then
  (SEEDS="$S5_GPU0_SEEDS" GPUS="0" MEM_FRACTION=0.3 $S5 train $REST > $LOGS/s5_long_gpu0.txt \
    2>&1) &
fi
case "$AFTER_KERNELS" in
  train_bench)
    CUDA_VISIBLE_DEVICES=0 timeout $((REST + 60)) python3 benchmarks/train_bench.py \
      --models hybrid --no-shares > $LOGS/train_bench.txt 2>&1 & ;;
  s3)
    for m in m2rnn attention attention_rope mamba2 gated_deltanet; do
      CUDA_VISIBLE_DEVICES=0 XLA_PYTHON_CLIENT_MEM_FRACTION=0.15 timeout $((REST + 90)) $ST \
        --config configs/state_tracking/s3.yaml --models $m --seeds 3 --steps 6000 \
        --batch-size 256 --time-budget-s $REST --out $LOGS/s3/$m > $LOGS/s3_$m.txt 2>&1 &
    done ;;
esac
wait
OUT=$OUT $S5 collect >> $LOGS/s5_long.txt 2>&1
(cd /tmp && tar czf "$OUT/logs.tgz" --exclude=checkpoints logs)
grep -A40 "^forward ablations" $LOGS/kernels.txt
grep -A30 "^shape " $LOGS/kernels.txt
tail -n 30 $LOGS/kernels.txt
grep "correctness" $LOGS/kernels.txt $LOGS/check.txt 2>/dev/null
head -n 30 $LOGS/summary.txt 2>/dev/null
tail -n 12 $LOGS/sweep.txt 2>/dev/null
tail -n 3 $LOGS/s3_*.txt $LOGS/s5_long_*.txt 2>/dev/null
tail -n 12 $LOGS/train_bench.txt 2>/dev/null
tail -n 14 $LOGS/step_bench.txt 2>/dev/null
tail -n 16 $LOGS/s5_long.txt
