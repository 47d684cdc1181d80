#!/usr/bin/env bash
# The GPU checks of issues #3 and #10, in one run on the lent machine (5-8 minutes):
#   run(command="bash scripts/gpu-check.sh", carry=[".whl"], timeout_s=540)
# after scripts/gpu-wheels.sh here. Prints the GPU, checks that the bundle path gives the
# same labels on CUDA (bf16 too) as on the CPU, and runs benchmarks/inference.py on a
# 320-slice volume (its last table: the spleen Model Zoo config by the fast path and by
# the bundle's own chain on CUDA, against monai.bundle's own run); copies of the figures
# land in $OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
OUT="${OUT:-/tmp/gpu-check}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
python3 benchmarks/gpu_agreement.py 2>&1 | tee "$OUT/agreement.txt"
python3 benchmarks/inference.py --slices 320 --repeat 3 --unet-precision bf16 2>&1 \
    | tee "$OUT/inference.txt"
if [ -x /usr/bin/storescu ] && [ -x /usr/bin/storescp ]; then
    export TCP_NODELAY=1
    python3 benchmarks/e2e.py --slices 300 --repeat 2 2>&1 | tee "$OUT/e2e.txt"
    python3 benchmarks/throughput.py --studies 20 --slices 150 --models standin 2>&1 \
        | tee "$OUT/throughput.txt"
else
    echo "no dcmtk here: end-to-end latency and throughput not measured" | tee "$OUT/e2e.txt"
fi
