#!/usr/bin/env bash
# One `run` call on an nvidia-h200-x2 (used 2026-11-30, second session), about 9 minutes:
#   OUT=dir bash benchmarks/gpu_session_tracking.sh
#   GPU 0: the op table (kernel_bench, backend auto), then S5 sweep variants on what is left;
#   GPU 1: the S3 experiment (5 models x 3 seeds) and the S5 gated experiment (one process per
#          model, 3 seeds each), side by side.
# Everything lands in $OUT/runs.tgz; summaries print last.
set -u
export PYTHONPATH=. PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
R=/tmp/r; mkdir -p $R
ST="python3 -m m2rnn_experiments.state_tracking.cli --no-progress"
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.12
CUDA_VISIBLE_DEVICES=1 timeout 530 $ST --config configs/state_tracking/s3.yaml --seeds 3 \
  --steps 6000 --batch-size 256 --time-budget-s 450 --out $R/s3 > $R/s3.log 2>&1 &
for m in m2rnn attention attention_rope mamba2 gated_deltanet; do
  CUDA_VISIBLE_DEVICES=1 timeout 530 $ST --config configs/state_tracking/s5_gated.yaml \
    --models $m --seeds 3 --time-budget-s 440 --set models.m2rnn.m2rnn.backend=scan \
    --out $R/s5_$m > $R/s5_$m.log 2>&1 &
done
unset XLA_PYTHON_CLIENT_MEM_FRACTION
CUDA_VISIBLE_DEVICES=0 timeout 240 python3 benchmarks/kernel_bench.py --variants none --reps 10 \
  --workers 16 > $R/kernel_bench.log 2>&1
echo "kernel_bench exit $? at ${SECONDS}s"
BUDGET=$((470 - SECONDS))
CUDA_VISIBLE_DEVICES=0 timeout $((BUDGET + 60)) python3 benchmarks/state_tracking_sweep.py \
  --variants h32_v16,h32_v16_gatemid,h64_v8_gatemid,h32_v16_k4_kheads_gatemid,h16_v64_gatemid,h32_v16_gatemid_lr5e-3 \
  --time-budget-s $BUDGET --out $R/sweep2 > $R/sweep2.log 2>&1
wait
(cd /tmp && tar czf $OUT/runs.tgz r)
cp $R/kernel_bench.log $OUT/
tail -n 30 $R/kernel_bench.log
cat $R/sweep2/sweep.txt
for f in $R/s3.log $R/s5_*.log; do echo "== $f"; grep -A12 "^model " $f | head -14; done
