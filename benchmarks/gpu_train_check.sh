export PYTHONPATH=. PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
(CUDA_VISIBLE_DEVICES=1 XLA_FLAGS=--xla_disable_hlo_passes=constant_folding timeout 180 python3 benchmarks/train_bench.py --quick > $OUT/train_1gpu_nofold.log 2>&1; echo "exit $?" >> $OUT/train_1gpu_nofold.log) &
CUDA_VISIBLE_DEVICES=0 timeout 180 python3 benchmarks/train_bench.py --quick > $OUT/train_1gpu.log 2>&1; echo "exit $?" >> $OUT/train_1gpu.log
wait
F=""; grep -q "exit 0" $OUT/train_1gpu.log || F=--xla_disable_hlo_passes=constant_folding
XLA_FLAGS=$F timeout 150 python3 benchmarks/train_bench.py --two-gpu --quick > $OUT/train_2gpu.log 2>&1; echo "exit $? flags=$F" >> $OUT/train_2gpu.log
for f in train_1gpu train_1gpu_nofold train_2gpu; do echo "== $f"; tail -n 30 $OUT/$f.log; done
