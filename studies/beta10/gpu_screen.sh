#!/usr/bin/env bash
# The GPU screen of issue 11: every variant of studies/beta10/screen_gpu.txt for STEPS TRADES steps on MNIST,
# JOBS processes at a time, with the torch solver path (Triton off: the kernels are checked separately).
#     bash studies/beta10/gpu_screen.sh OUTDIR [--device cuda] [--steps 500] [--jobs 8] [--data-dir DIR]
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=$1; shift
DEVICE=cuda STEPS=500 JOBS=8 DATA=.gpu_data/mnist
while [ $# -gt 0 ]; do
    case $1 in --device) DEVICE=$2;; --steps) STEPS=$2;; --jobs) JOBS=$2;; --data-dir) DATA=$2;; esac; shift 2
done
mkdir -p "$OUT/screen"
export GOT_REG_DISABLE_TRITON=1 PYTHONUNBUFFERED=1
PY=${PY:-python3}
start=$(date +%s)
$PY -m studies.beta10.run_list "${LIST:-studies/beta10/screen_gpu.txt}" --out "$OUT/screen" --jobs "$JOBS" \
    --device "$DEVICE" --steps "$STEPS" --eval-every 100 --data-dir "$DATA"
echo "screen: $(( $(date +%s) - start )) s"
tar -czf "$OUT/screen.tar.gz" -C "$OUT" screen && rm -rf "$OUT/screen"
