#!/usr/bin/env bash
# The GPU measurements of issues 4, 5 and 6 in one call on a 2×H200 machine (kind nvidia-h200-x2).
# GPU 0 runs the training and decode benchmarks alone (clean timings); GPU 1 meanwhile runs the
# state-tracking experiments as four concurrent processes (small models leave an H200 mostly
# idle); then both GPUs run the data-parallel / FSDP check. Everything lands in $OUT.
# Usage, from the repository root:  OUT=runs/gpu_session bash benchmarks/gpu_session.sh
set -u
export PYTHONPATH=. PYTHONUNBUFFERED=1
# Keep NVLink multicast off (shared hosts).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-runs/gpu_session}
BUDGET=${ST_BUDGET:-330}
mkdir -p "$OUT"
nvidia-smi --query-gpu=index,name,driver_version,clocks.sm --format=csv
python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"

state_tracking() {  # name, then CLI arguments
  local name=$1; shift
  CUDA_VISIBLE_DEVICES=1 XLA_PYTHON_CLIENT_PREALLOCATE=false timeout $((BUDGET + 60)) \
    python3 -m train.state_tracking.cli --seeds 3 --time-budget-s "$BUDGET" --no-progress \
    --out "$OUT/$name" "$@" > "$OUT/$name.log" 2>&1
  echo "$name exit $?" >> "$OUT/$name.log"
}
state_tracking s5_m2rnn --config configs/state_tracking/s5.yaml --models m2rnn &
state_tracking s5_attention --config configs/state_tracking/s5.yaml --models attention,attention_rope &
state_tracking s5_linear --config configs/state_tracking/s5.yaml --models mamba2,gated_deltanet &
state_tracking s3_all --config configs/state_tracking/s3.yaml \
  --models m2rnn,attention,attention_rope,mamba2,gated_deltanet &

CUDA_VISIBLE_DEVICES=0 timeout 240 python3 benchmarks/train_bench.py --quick \
    > "$OUT/train_1gpu.log" 2>&1; echo "train_bench exit $?" >> "$OUT/train_1gpu.log"
CUDA_VISIBLE_DEVICES=0 timeout 150 python3 benchmarks/decode_bench.py --quick \
    --out "$OUT/decode.jsonl" > "$OUT/decode.log" 2>&1; echo "decode_bench exit $?" >> "$OUT/decode.log"
wait
timeout 150 python3 benchmarks/train_bench.py --two-gpu --quick \
    > "$OUT/train_2gpu.log" 2>&1; echo "train_bench --two-gpu exit $?" >> "$OUT/train_2gpu.log"

tar -czf "$OUT.tar.gz" -C "$(dirname "$OUT")" "$(basename "$OUT")"
for log in train_1gpu decode train_2gpu s5_m2rnn s5_attention s5_linear s3_all; do
  echo "=== $log"; tail -n 14 "$OUT/$log.log"
done
