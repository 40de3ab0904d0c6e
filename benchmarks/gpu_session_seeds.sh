#!/usr/bin/env bash
# One device call (kind nvidia-h200-x2, carry the runs/s5_long/seed<k> folders of GPU1_SEEDS and
# GPU0_SEEDS, and runs/s5_long/group when GROUP_SEEDS is set; at most 64 MiB: four checkpoints
# with the tree): the long S5 runs go on, GPU1_SEEDS alone on GPU 1, GPU0_SEEDS alone and
# GROUP_SEEDS trained together on GPU 0, after the state-tracking step bench (seeds trained
# together) and KERNEL_CMD (if any) ran on GPU 0.
#
#   device: OUT=$OUT bash benchmarks/gpu_session_seeds.sh [BUDGET_S, default 420]
#
# Every seed runs s5_long.yaml's schedule (label smoothing 0.01 included since the tenth
# session) unless EXTRA_ARGS_SEED<k> says otherwise. Seeds 0, 5 and 2 are past 99 % at 8x and
# are not trained by default. Seed 0's hand-run schedule, when GPU1_SEEDS or GPU0_SEEDS name it:
# SEED0_ARGS (default a constant 1e-5, the rate at which label smoothing lifted it from 97.9 to
# 99.7 % at 8x in the tenth session). GPU 1: GPU1_SEEDS (default "6": at length 64 since step
# 102,300, at the end of the config's rate decay).
# GPU 0: benchmarks/state_tracking_step_bench.py for BENCH_SEEDS_PER_STEP (default "1 3"; 0 skips
# it), then KERNEL_CMD (e.g. "python3 benchmarks/mosaic_check.py ..." or "bash
# benchmarks/gpu_vector_probe.sh"; output in
# $OUT/kernels.txt, KERNEL_TIMEOUT_S default 240), then for what is left of BUDGET_S GPU0_SEEDS
# (default "7": at length 64 since step 204,900, out of the group since the eleventh session)
# alone and GROUP_SEEDS (default none) together, s5_long.yaml as it is
# (EXTRA_ARGS_GROUP adds flags; seeds 3 and 4, which found a fixed-depth solution at length 8,
# are archived in runs/s5_long/group_seeds34: RESULTS.md, eighth session). A seed that
# reaches the training length can leave the group: move its checkpoint from
# runs/s5_long/group/checkpoints to runs/s5_long/seed<k>/checkpoints (one step of a group runs
# at its widest seed's width, and at width 64 K seeds cost K times one: RESULTS.md).
# BASELINE_SEEDS (e.g. "1 2"; default none): on GPU 0 instead, s5_long.yaml's baselines
# BASELINE_MODELS (default "attention attention_rope mamba2 gated_deltanet"; the size-matched
# ones: "attention_1m attention_rope_1m mamba2_1m gated_deltanet_1m") for those consecutive
# seeds, from scratch for what is left of BUDGET_S: one process per model, its seeds in one
# vmapped step, in runs/s5_long/baselines/<model> (their logs and results come back, not their
# checkpoints); seed 0 of each ran ≈ 42k steps in the third session.
# Checkpoints, logs and results come back in $OUT (gpu_s5_long.sh collect).
set -u
export PYTHONPATH=. PYTHONUNBUFFERED=1
BUDGET=${1:-420}
start=$(date +%s)
SEED0_ARGS=${SEED0_ARGS:---lr 1e-5 --set train.min_lr_ratio=1.0 --set train.steps=1000000 \
--set train.length_decay_steps=0}
GPU1_SEEDS=${GPU1_SEEDS-6}
GPU0_SEEDS=${GPU0_SEEDS-7}
GROUP_SEEDS=${GROUP_SEEDS-}
# GROUP_SEEDS= here: the group trains once, on GPU 0 (below), also when the caller exported it
# (the tenth session's call 2 trained seed 7 twice, beside the kernel timings on GPU 0).
GROUP_SEEDS= EXTRA_ARGS_SEED0="$SEED0_ARGS" SEEDS="$GPU1_SEEDS" GPUS=1 MEM_FRACTION=0.45 \
  bash benchmarks/gpu_s5_long.sh train "$BUDGET" &
: > "$OUT/step_bench.txt"
for k in ${BENCH_SEEDS_PER_STEP:-1 3}; do
  [ "$k" -gt 0 ] || continue
  CUDA_VISIBLE_DEVICES=0 timeout 100 python3 benchmarks/state_tracking_step_bench.py \
    --widths "${BENCH_WIDTHS:-4,64}" --variants pallas_gpu_vector --seeds-per-step "$k" \
    --steps 30 --reps 3 >> "$OUT/step_bench.txt" 2>&1
done
if [ -n "${KERNEL_CMD:-}" ]; then
  CUDA_VISIBLE_DEVICES=0 timeout "${KERNEL_TIMEOUT_S:-240}" bash -c "$KERNEL_CMD" \
    > "$OUT/kernels.txt" 2>&1
  echo "kernel command exit $?"
fi
left=$((BUDGET - $(date +%s) + start))
if [ -n "${BASELINE_SEEDS:-}" ]; then
  read -r -a bseeds <<< "$BASELINE_SEEDS"
  echo "GPU 0 trains the baselines, seeds [$BASELINE_SEEDS], for ${left}s"
  for m in ${BASELINE_MODELS:-attention attention_rope mamba2 gated_deltanet}; do
    mkdir -p runs/s5_long/baselines/$m
    CUDA_VISIBLE_DEVICES=0 XLA_PYTHON_CLIENT_MEM_FRACTION=0.12 timeout $((left + 120)) \
      python3 -m m2rnn_experiments.state_tracking.cli --config configs/state_tracking/s5_long.yaml \
      --models $m --seeds ${#bseeds[@]} --first-seed ${bseeds[0]} \
      --seeds-per-step ${#bseeds[@]} --time-budget-s "$left" --no-progress \
      --out runs/s5_long/baselines/$m ${EXTRA_ARGS_BASELINES:-} \
      >> runs/s5_long/baselines/$m/log.txt 2>&1 &
  done
elif [ "$left" -gt 60 ]; then
  echo "GPU 0 trains seeds [$GPU0_SEEDS] alone and [$GROUP_SEEDS] together for ${left}s"
  EXTRA_ARGS_SEED0="$SEED0_ARGS" SEEDS="$GPU0_SEEDS" GPUS=0 GROUP_SEEDS="$GROUP_SEEDS" \
    GROUP_GPU=0 MEM_FRACTION=0.45 bash benchmarks/gpu_s5_long.sh train "$left"
fi
wait
SEEDS="$GPU1_SEEDS $GPU0_SEEDS" bash benchmarks/gpu_s5_long.sh collect
for log in runs/s5_long/baselines/*/log.txt; do
  [ -f "$log" ] && echo "== $log" && grep -E "^  seed " "$log" | tail -n 2
done
grep -E "^(pallas|scan|variant)" "$OUT/step_bench.txt"
[ ! -f "$OUT/kernels.txt" ] || grep -E "^(correctness|device|shape|[0-9]+x|CHECK|time|XLA (PTX|dump)|variant|pallas|==|1 +[0-9])" \
  "$OUT/kernels.txt" | tail -n 30
true  # the summary's greps decide nothing: the call's status is the training's
