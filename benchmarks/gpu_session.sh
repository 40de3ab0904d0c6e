#!/usr/bin/env bash
# The GPU measurements of issues 4, 5 and 6 in one call on a 2×H200 machine (kind nvidia-h200-x2):
# GPU 1 runs the S5 state-tracking experiment while GPU 0 runs the training and decode benchmarks;
# then both GPUs run the data-parallel / FSDP check. Logs and results go to $OUT.
# Usage, from the repository root:  OUT=runs/gpu_session bash benchmarks/gpu_session.sh
set -u
export PYTHONPATH=. PYTHONUNBUFFERED=1
# Keep NVLink multicast off (shared hosts).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-runs/gpu_session}
mkdir -p "$OUT"
nvidia-smi --query-gpu=index,name,driver_version,clocks.sm --format=csv
python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"

(CUDA_VISIBLE_DEVICES=1 timeout "${ST_TIMEOUT:-400}" python3 -m train.state_tracking.cli \
    --group S5 --seeds 3 --time-budget-s "${ST_BUDGET:-320}" --no-progress --out "$OUT/s5" \
    > "$OUT/s5.log" 2>&1; echo "state tracking exit $?" >> "$OUT/s5.log") &

CUDA_VISIBLE_DEVICES=0 timeout 240 python3 benchmarks/train_bench.py --quick \
    > "$OUT/train_1gpu.log" 2>&1; echo "train_bench exit $?" >> "$OUT/train_1gpu.log"
CUDA_VISIBLE_DEVICES=0 timeout 150 python3 benchmarks/decode_bench.py --quick \
    --out "$OUT/decode.jsonl" > "$OUT/decode.log" 2>&1; echo "decode_bench exit $?" >> "$OUT/decode.log"
wait
timeout 150 python3 benchmarks/train_bench.py --two-gpu --quick \
    > "$OUT/train_2gpu.log" 2>&1; echo "train_bench --two-gpu exit $?" >> "$OUT/train_2gpu.log"

for log in train_1gpu decode train_2gpu s5; do
  echo "=== $log"; tail -n 25 "$OUT/$log.log"
done
