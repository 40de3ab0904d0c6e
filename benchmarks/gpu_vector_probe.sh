#!/usr/bin/env bash
# The vector-state kernels' registers and the S5 train step's profile on the GPU, for one device
# call (GPU 0; meant as KERNEL_CMD of benchmarks/gpu_session_seeds.sh while S5 trains on GPU 1):
#   1. the step bench of s5_long.yaml's M2RNN at length 64 with XLA's dump on and a profile:
#      XLA's PTX of the step (vector kernels included) comes back as $OUT/xla_ptx.tgz, for
#      `python3 benchmarks/triton_registers.py --ptx ...` here (registers and spills as the GPU
#      compiles them); the trace summary (busiest kernels per stream) is in the output;
#   2. benchmarks/vector_kernel_bench.py for VECTOR_CONFIGS (default "default,unroll1_sub1,
#      split_unroll1_sub1,split_unroll1_sub1_warps4": the offline estimate's candidates without
#      spills; each configuration compiles four times, ~80 s).
#
#   device: OUT=$OUT bash benchmarks/gpu_vector_probe.sh      (about 7 minutes)
set -u
export PYTHONPATH=. PYTHONUNBUFFERED=1
DUMP=/tmp/xla_dump_vector
rm -rf "$DUMP"
XLA_FLAGS="--xla_dump_to=$DUMP" timeout 150 python3 benchmarks/state_tracking_step_bench.py \
  --variants pallas_gpu_vector --widths 64 --steps 20 --reps 3 --profile /tmp/prof_vector
ptx=$(grep -l "m2rnn_vector" "$DUMP"/*.ptx 2>/dev/null)
if [ -n "$ptx" ]; then
  tar czf "$OUT/xla_ptx.tgz" $ptx && echo "XLA PTX with the vector kernels: $ptx"
else
  echo "no PTX with m2rnn_vector under $DUMP: $(ls "$DUMP" | head -n 5)"
fi
timeout 360 python3 benchmarks/vector_kernel_bench.py \
  --configs "${VECTOR_CONFIGS:-default,unroll1_sub1,split_unroll1_sub1,split_unroll1_sub1_warps4}"
