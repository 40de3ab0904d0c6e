#!/usr/bin/env bash
# The Mosaic kernels' SASS and ptxas reports, summarised: one `run` call (kind nvidia-h200,
# carry [".whl"]), a few minutes. The device image has no nvdisasm, so bring the wheel:
#   here, once (.whl/ is git-ignored):
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --platform manylinux2014_x86_64 -d .whl nvidia-cuda-nvdisasm==13.5.37
#   device:
#     OUT=$OUT bash benchmarks/gpu_sass.sh
# Brings back summary.txt (benchmarks/sass_summary.py: registers, spills, ptxas warnings, SASS
# instructions per loop by kind), the mosaic_check log, and up to four SASS listings.
set -u
NVD=/tmp/nvdisasm
mkdir -p $NVD && python3 -m zipfile -e .whl/nvidia_cuda_nvdisasm-*.whl $NVD || exit 1
chmod +x $NVD/nvidia/cu13/bin/nvdisasm && export PATH=$NVD/nvidia/cu13/bin:$PATH
nvdisasm --version | tail -n 1
# Mosaic runs <CUDA root>/bin/nvdisasm, the CUDA root being jax's (PATH is not searched).
ROOT=$(python3 -c 'from jax._src import lib; print(lib.cuda_path or "/usr/local/cuda")')
mkdir -p "$ROOT/bin" && cp $NVD/nvidia/cu13/bin/nvdisasm "$ROOT/bin/" && echo "nvdisasm -> $ROOT/bin"
# Default: the default backward and the first one (for comparison), with the forwards;
# MOSAIC_ARGS replaces those mosaic_check flags, SASS_TIMEOUT_S its time limit (420 s).
PYTHONPATH=. PYTHONUNBUFFERED=1 timeout ${SASS_TIMEOUT_S:-420} python3 benchmarks/mosaic_check.py \
  --dump /tmp/dump ${MOSAIC_ARGS:---only c32,c32_previous} > "$OUT/mosaic_check.log" 2>&1
echo "mosaic_check exit $?"
cp /tmp/dump/summary.txt "$OUT/" 2>/dev/null || python3 benchmarks/sass_summary.py /tmp/dump \
  > "$OUT/summary.txt"
find /tmp/dump -type f -size -15M -print0 | xargs -0 -r grep -l -E "HGMMA|FFMA" | head -n 4 | xargs -r -I{} cp {} "$OUT/"
grep -E "^[0-9]+x[0-9]+x[0-9]+ " "$OUT/mosaic_check.log"
head -n 60 "$OUT/summary.txt"
