#!/usr/bin/env bash
# One device call (kind nvidia-h200-x2, carry [".whl", "runs/s5_long"]), ~9.5 minutes:
#   GPU 0: the Mosaic kernels' SASS/ptxas summary (benchmarks/gpu_sass.sh, small shape), then
#          mosaic_check --probe: forward ablations, forward vs CTAs per SM, the lane
#          reduce-scatter options against the defaults (fwd and fwd+bwd);
#   GPU 1: the long S5 runs (benchmarks/gpu_s5_long.sh, all three seeds) and S5_VARIANTS of
#          benchmarks/state_tracking_sweep.py side by side.
#   device:  OUT=$OUT bash benchmarks/gpu_session_kernels_s5.sh
#   here:    bash benchmarks/gpu_s5_long.sh unpack FILES_AT; tar xzf FILES_AT/logs.tgz -C DIR
# Brings back the three S5 checkpoints, s5_long_results.tgz and logs.tgz (every log).
set -u
export PYTHONPATH=. PYTHONUNBUFFERED=1
BUDGET=${BUDGET_S:-420}
LOGS=/tmp/logs && mkdir -p $LOGS
S5_VARIANTS=${S5_VARIANTS:-h32_v64_gatemid_seed1,h32_v64_gatemid_seed2}
(GPUS="1" MEM_FRACTION=0.15 OUT=$OUT bash benchmarks/gpu_s5_long.sh run $BUDGET \
  > $LOGS/s5_long.txt 2>&1) &
(XLA_PYTHON_CLIENT_MEM_FRACTION=0.15 python3 benchmarks/state_tracking_sweep.py --gpu 1 \
  --time-budget-s $BUDGET --out /tmp/sweep --variants $S5_VARIANTS > $LOGS/sweep.txt 2>&1;
  cp /tmp/sweep/*.log $LOGS/) &
CUDA_VISIBLE_DEVICES=0 SASS_TIMEOUT_S=150 OUT=$LOGS \
  MOSAIC_ARGS='--fwd= --only c32 --shapes 2x512x8 --skip-forward' \
  bash benchmarks/gpu_sass.sh > $LOGS/sass.txt 2>&1
CUDA_VISIBLE_DEVICES=0 timeout 330 python3 benchmarks/mosaic_check.py --probe \
  --fwd warp_scatter --only c32,c32_scatter > $LOGS/kernels.txt 2>&1
echo "kernels exit $?"
wait
(cd /tmp && tar czf "$OUT/logs.tgz" logs)
grep -A40 "^forward ablations" $LOGS/kernels.txt
grep -A20 "^shape " $LOGS/kernels.txt
grep "correctness" $LOGS/kernels.txt
tail -n 12 $LOGS/sweep.txt
tail -n 16 $LOGS/s5_long.txt
