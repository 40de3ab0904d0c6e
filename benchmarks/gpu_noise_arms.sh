#!/usr/bin/env bash
# One device call (kind nvidia-h200-x2, carry ["runs/s5_long", "runs/a5_36k"]): does noise on the
# M²RNN states in training make the code contract, so that accuracy holds past the training
# length? (RESULTS, state tracking, fifth session.)
#   GPU 0: A5 continuation arms (benchmarks/state_tracking_sweep.py A5_VARIANTS, each from
#          runs/a5_36k/m2rnn_seed0.msgpack = the CPU A5 run at 36,000 steps), side by side;
#   GPU 1: S5 seed 0 (runs/s5_long/seed0) continued at a constant 1e-4 with state noise
#          S5_NOISES, one run per noise level in runs/s5_noise<σ>/seed0 (copied from
#          runs/s5_long/seed0 when absent, so a later call carrying runs/s5_noise<σ> continues it).
#   device:  OUT=$OUT bash benchmarks/gpu_noise_arms.sh [BUDGET_S, default 420]
#   here:    tar xzf FILES_AT/noise_logs.tgz -C DIR; the S5 checkpoints come back as
#            FILES_AT/s5_noise<σ>_m2rnn_seed0.msgpack (copy to runs/s5_noise<σ>/seed0/checkpoints/
#            as m2rnn_seed0.msgpack to continue).
set -u
export PYTHONPATH=. PYTHONUNBUFFERED=1
BUDGET=${1:-420}
A5_VARIANTS=${A5_VARIANTS:-cont_lr2e-4,cont_lr5e-5,cont_lr2e-4_noise0.02,cont_lr2e-4_noise0.05,cont_lr1e-3_noise0.05,cont_lr2e-4_noise0.1}
S5_NOISES=${S5_NOISES:-0.01 0.03}
python3 benchmarks/state_tracking_sweep.py --gpu 0 --variants "$A5_VARIANTS" \
  --time-budget-s "$BUDGET" --out runs/a5_sweep --start-from runs/a5_36k/m2rnn_seed0.msgpack \
  -- --group A5 --eval-lens 16,64,128,256 > runs/a5_sweep.txt 2>&1 &
for noise in $S5_NOISES; do
  dir=runs/s5_noise$noise
  if [ ! -d $dir/seed0 ]; then
    mkdir -p $dir && cp -r runs/s5_long/seed0 $dir/seed0
  fi
  RUNS_DIR=$dir SEEDS=0 GPUS=1 MEM_FRACTION=0.4 EXTRA_ARGS_SEED0="--lr 1e-4 --set \
train.min_lr_ratio=1.0 --set train.steps=400000 --set train.state_noise_std=$noise" \
    bash benchmarks/gpu_s5_long.sh train "$BUDGET" &
done
wait
cat runs/a5_sweep.txt
for noise in $S5_NOISES; do
  echo "== S5 seed 0, state noise $noise"
  grep -E "resumed|schedule" runs/s5_noise$noise/seed0/log.txt | tail -n 2
  grep -E "^  seed " runs/s5_noise$noise/seed0/log.txt | tail -n 1
  cp runs/s5_noise$noise/seed0/checkpoints/m2rnn_seed0.msgpack "$OUT/s5_noise${noise}_m2rnn_seed0.msgpack"
done
tar czf "$OUT/noise_logs.tgz" runs/a5_sweep.txt runs/a5_sweep/*.log runs/a5_sweep/*/results.* \
  runs/s5_noise*/seed0/log.txt runs/s5_noise*/seed0/results.* 2>/dev/null
ls -la "$OUT"
