#!/usr/bin/env bash
# The MNIST study of issue 11 on one GPU, in one command that ends inside the device's limit: run_study.sh's
# runs (TRADES and GOT-TRADES-LM with the defaults on seeds 0-2, PGD-AT and GOT-PGD-LM on seed 0, the paper's
# exact form on seed 0) for EPOCHS epochs, JOBS processes at a time, each followed by its evaluations (PGD-40 on
# the 10 000 test points, AutoAttack on the first 1000, the sanity checks on seed 0). No run or evaluation
# starts after BUDGET - 60 s, and everything is stopped at BUDGET, so a slow machine loses the last parts only.
#
#     bash studies/beta10/gpu_study.sh OUTDIR [--device cuda] [--epochs 5] [--jobs 4] [--budget 430]
#                                             [--data-dir DIR] [--wheels DIR] [--quick] [--runs "NAME ..."]
#
#   --wheels   install every DIR/*.whl first (POT and GeomLoss on a machine without a registry), and put DIR/site on
#              PYTHONPATH if it exists (pyautoattack unpacked without its 45 MB example model)
#   --quick    run_study.sh's QUICK=1 smoke test (check it on a CPU with --device cpu --quick first)
#   --runs     some of run_study.sh's runs only (default: all, in its order)
#
# Writes to OUTDIR (no checkpoints, so it stays small): study.tar.gz, the run folders without weights (config,
# per-epoch metrics, evaluations, logs) and the report of `python -m studies.beta10.report` (summary.md/json,
# curves.png), rewritten every 20 s while the runs go on, and gpu_study.log.
set -uo pipefail
cd "$(dirname "$0")/../.."
[ $# -ge 1 ] || { echo "usage: bash studies/beta10/gpu_study.sh OUTDIR [--device cuda] [--epochs 5] ..." >&2; exit 2; }
OUTDIR=$(mkdir -p "$1" && cd "$1" && pwd); shift
DEVICE=cuda EPOCHS=5 JOBS=4 BUDGET=430 DATA=.gpu_data/mnist WHEELS="" QUICK=0 NAMES=""
while [ $# -gt 0 ]; do
    case $1 in
        --device) DEVICE=$2; shift 2 ;; --epochs) EPOCHS=$2; shift 2 ;; --jobs) JOBS=$2; shift 2 ;;
        --budget) BUDGET=$2; shift 2 ;; --data-dir) DATA=$2; shift 2 ;; --wheels) WHEELS=$2; shift 2 ;;
        --quick) QUICK=1; shift ;; --runs) NAMES=$2; shift 2 ;;
        *) echo "gpu_study.sh: unknown option $1" >&2; exit 2 ;;
    esac
done
start=$(date +%s)
exec > >(tee "$OUTDIR/gpu_study.log") 2>&1
if [ -n "$WHEELS" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gotreg_site \
        "$WHEELS"/*.whl || exit 1
    export PYTHONPATH=/tmp/gotreg_site${PYTHONPATH:+:$PYTHONPATH}
    [ -d "$WHEELS/site" ] && export PYTHONPATH=$(cd "$WHEELS/site" && pwd):$PYTHONPATH
fi
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
export PYTHONUNBUFFERED=1 GOT_REG_DISABLE_TRITON=1  # the torch solver path, as in the screen
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null
$PY -c "import torch, pyautoattack, geomloss; print('torch', torch.__version__)" || exit 1

RUNS=${RUNS:-$(mktemp -d)/study}  # RUNS: continue an earlier call's runs on a machine still warm
REPORT=$(dirname "$RUNS")/report
snapshot() {  # everything small: no weights
    $PY -m studies.beta10.report "$RUNS" --out "$REPORT" > /dev/null 2>&1
    tar -czf "$OUTDIR/study.tar.gz.part" --exclude='*.pt' -C "$(dirname "$RUNS")" study report 2>/dev/null \
        && mv "$OUTDIR/study.tar.gz.part" "$OUTDIR/study.tar.gz"
}
mkdir -p "$RUNS" "$REPORT"
( while sleep 20; do snapshot; done ) &
SNAPSHOTS=$!
left=$(( start + BUDGET - $(date +%s) ))
# cuDNN's deterministic kernels are slower, and GPU runs are not bit-reproducible anyway.
OUT=$RUNS JOBS=$JOBS EPOCHS=$EPOCHS PAPER_EPOCHS=$EPOCHS THREADS=2 DEVICE=$DEVICE DATA_DIR=$DATA QUICK=$QUICK \
    TRAIN_FLAGS=--no-deterministic \
    DEADLINE=$(( start + BUDGET - 60 )) PY=$PY timeout -k 5 "$left" bash studies/beta10/run_study.sh $NAMES
echo "run_study.sh exit $? after $(( $(date +%s) - start )) s"
kill "$SNAPSHOTS" 2>/dev/null; wait "$SNAPSHOTS" 2>/dev/null
for f in "$RUNS"/*.log; do echo "== $(basename "$f")"; tail -n 3 "$f"; done
snapshot
cat "$REPORT/summary.md" 2>/dev/null
echo "gpu_study.sh: $(( $(date +%s) - start )) s"
