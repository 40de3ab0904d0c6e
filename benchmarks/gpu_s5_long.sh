#!/usr/bin/env bash
# The long S5 runs (configs/state_tracking/s5_long.yaml, M2RNN, seeds 0-2), continued call after
# call and session after session: each `run` call trains every seed for BUDGET seconds from its
# checkpoint and brings the checkpoints back (13.9 MB each: under the 16 MiB a file may have).
#
#   device (kind nvidia-h200-x2, carry ["runs/s5_long"]):
#       OUT=$OUT bash benchmarks/gpu_s5_long.sh run [BUDGET_S, default 480]
#       (run = train, then collect: several `train` calls with their own SEEDS, GPUS and
#       EXTRA_ARGS may run side by side before one `collect`)
#   here, after the call (FILES = the call's files_at folder):
#       bash benchmarks/gpu_s5_long.sh unpack FILES
#
# runs/s5_long/seed<k>/ holds each seed's checkpoint, log, results.{csv,json} and plot; `train`
# starts a seed from scratch when it has no checkpoint. SEEDS (default "0 1 2") are the seeds
# trained; seed k runs on GPU ${GPUS[k % len]}: by default seeds 0 and 2 share GPU 0, seed 1
# has GPU 1 (GPUS="1" puts every seed on GPU 1; MEM_FRACTION sets each process's share of its
# GPU's memory, default 0.4; EXTRA_ARGS are cli flags for every seed, EXTRA_ARGS_SEED<k> for
# seed k only, e.g. EXTRA_ARGS_SEED0="--set train.learning_rate=5e-4": a run may continue
# under a new schedule; seeds 0-2 predate s5_long.yaml's length decay and were continued by
# hand: give them `--set train.length_decay_steps=0` with their own --lr, or the decay starts
# from the step they resume at). The last lines printed are each seed's latest progress line
# and evaluation.
# GROUP_SEEDS (consecutive, e.g. "3 4 5") also trains those seeds together in one process
# (--seeds-per-step: one vmapped step for all) on GPU ${GROUP_GPU:-0}, in $RUNS/group (its own
# checkpoints, log and results; EXTRA_ARGS_GROUP are its extra flags); their checkpoints come
# back as group_m2rnn_seed<k>.msgpack. Mind the 64 MiB a call brings back: four checkpoints.
# CPU smoke test (tiny evaluation; RUNS_DIR keeps it away from real runs):
#   RUNS_DIR=/tmp/s5l PATH=.venv/bin:$PATH EXTRA_ARGS="--eval-lens 8 --set task.eval_sequences=8" \
#     OUT=/tmp/o bash benchmarks/gpu_s5_long.sh run 20
set -u
RUNS=${RUNS_DIR:-runs/s5_long}
train() {
  BUDGET=${1:-480}
  export PYTHONPATH=. PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=${MEM_FRACTION:-0.4}
  read -r -a gpus <<< "${GPUS:-0 1}"
  for seed in ${SEEDS-0 1 2}; do
    mkdir -p $RUNS/seed$seed
    seed_args=EXTRA_ARGS_SEED$seed
    CUDA_VISIBLE_DEVICES=${gpus[$((seed % ${#gpus[@]}))]} timeout $((BUDGET + 120)) python3 -m \
      m2rnn_experiments.state_tracking.cli --config configs/state_tracking/s5_long.yaml --models m2rnn \
      --seeds 1 --first-seed $seed --time-budget-s "$BUDGET" --no-progress \
      --out $RUNS/seed$seed ${EXTRA_ARGS:-} ${!seed_args:-} >> $RUNS/seed$seed/log.txt 2>&1 &
  done
  if [ -n "${GROUP_SEEDS:-}" ]; then
    # Consecutive seeds trained together in one process (train.seeds_per_step), in $RUNS/group.
    read -r -a group <<< "$GROUP_SEEDS"
    mkdir -p $RUNS/group
    CUDA_VISIBLE_DEVICES=${GROUP_GPU:-0} timeout $((BUDGET + 120)) python3 -m \
      m2rnn_experiments.state_tracking.cli --config configs/state_tracking/s5_long.yaml --models m2rnn \
      --seeds ${#group[@]} --first-seed ${group[0]} --seeds-per-step ${#group[@]} \
      --time-budget-s "$BUDGET" --no-progress --out $RUNS/group ${EXTRA_ARGS:-} \
      ${EXTRA_ARGS_GROUP:-} >> $RUNS/group/log.txt 2>&1 &
  fi
  wait
}

collect() {
  # COLLECT_SEEDS (default SEEDS): the seeds whose checkpoints come back (13.9 MB each; at
  # most 64 MiB per call, so four).
  for seed in ${COLLECT_SEEDS:-${SEEDS:-0 1 2}}; do
    cp $RUNS/seed$seed/checkpoints/m2rnn_seed$seed.msgpack "$OUT/" 2>/dev/null
    echo "== seed $seed"
    grep -E "resumed|-> length" $RUNS/seed$seed/log.txt | tail -n 4
    grep -E "^m2rnn seed .*: step" $RUNS/seed$seed/log.txt | tail -n 1
    grep -E "^  seed " $RUNS/seed$seed/log.txt | tail -n 1
  done
  if [ -d $RUNS/group ]; then
    for f in $RUNS/group/checkpoints/*.msgpack; do cp "$f" "$OUT/group_$(basename "$f")"; done
    echo "== group"
    grep -E "^m2rnn seed .*: step" $RUNS/group/log.txt | tail -n 3
    grep -E "^  seed " $RUNS/group/log.txt | tail -n 3
  fi
  (cd $RUNS && tar czf "$OUT/s5_long_results.tgz" seed*/log.txt seed*/results.* \
    seed*/accuracy_vs_length.png group/log.txt group/results.* baselines/*/log.txt \
    baselines/*/results.* 2>/dev/null)
  ls -la "$OUT"
}

case "${1:-}" in
  run) train "${2:-480}"; collect ;;
  train) train "${2:-480}" ;;
  collect) collect ;;
  unpack)
    FILES=${2:?usage: $0 unpack FILES_AT}
    for seed in 0 1 2 3 4 5 6 7; do
      [ -f "$FILES/m2rnn_seed$seed.msgpack" ] || continue
      mkdir -p $RUNS/seed$seed/checkpoints
      cp "$FILES/m2rnn_seed$seed.msgpack" $RUNS/seed$seed/checkpoints/
    done
    for f in "$FILES"/group_*.msgpack; do
      [ -f "$f" ] || continue
      mkdir -p $RUNS/group/checkpoints
      cp "$f" "$RUNS/group/checkpoints/$(basename "$f" | sed 's/^group_//')"
    done
    [ -f "$FILES/s5_long_results.tgz" ] && tar xzf "$FILES/s5_long_results.tgz" -C $RUNS
    ls -la $RUNS/seed*/checkpoints
    ;;
  *) echo "usage: OUT=dir bash $0 run|train [BUDGET_S] | OUT=dir bash $0 collect |" \
       "bash $0 unpack FILES_AT" >&2; exit 2 ;;
esac
