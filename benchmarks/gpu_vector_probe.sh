#!/usr/bin/env bash
# The vector-state kernels on the GPU, for one device call (GPU 0; meant as KERNEL_CMD of
# benchmarks/gpu_session_seeds.sh while S5 trains on GPU 1):
#   0. with EVAL_CHECKPOINT (a state-tracking checkpoint of s5_long.yaml, seed EVAL_SEED,
#      default 0): its accuracy at 64, 512 and 1024 under each of EVAL_CONFIGS (default "before
#      default": vector_kernel_bench.py CONFIGS names), to check that a new kernel default
#      evaluates as the old one did (the file is copied first: training may rewrite it);
#   1. the step bench of s5_long.yaml's M2RNN at length 64 with XLA's dump on and a profile;
#      the trace summary lists the busiest kernels with their optimized HLO
#      (trace_summary.py --hlo), and the dump's optimized HLO and PTX come back as
#      $OUT/xla_dump.tgz (`python3 benchmarks/triton_registers.py --ptx ...` reads the PTX);
#   2. benchmarks/vector_kernel_bench.py for VECTOR_CONFIGS (default "default,d_unroll2,
#      d_rows32,d_fwd_warps2"; each configuration compiles four times, ~20 s each).
#
#   device: OUT=$OUT [EVAL_CHECKPOINT=runs/s5_long/seed0/checkpoints/m2rnn_seed0.msgpack] \
#       bash benchmarks/gpu_vector_probe.sh                 (about 5-7 minutes)
set -u
export PYTHONPATH=. PYTHONUNBUFFERED=1
if [ -n "${EVAL_CHECKPOINT:-}" ] && [ -f "$EVAL_CHECKPOINT" ]; then
  cp "$EVAL_CHECKPOINT" /tmp/eval_checkpoint.msgpack
  for cfg in ${EVAL_CONFIGS:-before default}; do
    echo "== $EVAL_CHECKPOINT evaluated with the vector kernels' configuration '$cfg'"
    timeout 200 python3 benchmarks/state_tracking_interpolate.py \
      --config configs/state_tracking/s5_long.yaml --seed "${EVAL_SEED:-0}" \
      /tmp/eval_checkpoint.msgpack /tmp/eval_checkpoint.msgpack --weights 1 \
      --lengths 64,512,1024 --vector-config "$cfg"
  done
fi
DUMP=/tmp/xla_dump_vector
rm -rf "$DUMP"
XLA_FLAGS="--xla_dump_to=$DUMP" timeout 150 python3 benchmarks/state_tracking_step_bench.py \
  --variants pallas_gpu_vector --widths 64 --steps 20 --reps 3 --profile /tmp/prof_vector
python3 benchmarks/trace_summary.py /tmp/prof_vector --hlo "$DUMP" --threads 1 --top 12
(cd "$DUMP" && tar czf "$OUT/xla_dump.tgz" $(ls -S *after_optimizations.txt | head -n 2) \
  $(ls *.ptx 2>/dev/null)) && echo "XLA dump: $(tar tzf "$OUT/xla_dump.tgz" | wc -l) files"
timeout 300 python3 benchmarks/vector_kernel_bench.py \
  --configs "${VECTOR_CONFIGS:-default,d_unroll2,d_rows32,d_fwd_warps2}"
