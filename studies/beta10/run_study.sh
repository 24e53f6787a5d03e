#!/usr/bin/env bash
# The MNIST study of issue 11: TRADES against GOT-TRADES-LM with the shipped defaults (beta 3, anchor "clean",
# debias), EPOCHS epochs (default 2), seeds 0-2; on seed 0 also the paper's exact form (beta 10, no anchor, no
# debias) and PGD-AT against GOT-PGD-LM. RESULTS.md says which of these were run.
#
# Schedule: SmallCNN, TRADES/PGD training with a 10-step attack of step 0.04 at eps 0.3, SGD lr 0.01 (x0.1 from
# epoch 4), momentum 0.9, batch 128; per-epoch test clean / PGD-10 on the first 2000 test points (the learning
# curves). Evaluation per model (python -m examples.evaluate):
#   test10k  clean and PGD-40 (step 0.01, random start) on all 10 000 test points
#   aa1000   standard AutoAttack (pyautoattack 0.2.0) on the first 1000 test points, with its stages
#   sanity   eps sweep to 0.5 (PGD-20) on the first 1000, and AutoAttack with Square alone on the first 200
#            (black-box not above white-box): seed-0 models only
# Jobs run JOBS (default 2) at a time, one thread each; training resumes from checkpoints and finished parts are
# skipped, so the script restarts where it stopped. One epoch of one run took 60-75 min on one thread of the
# 2-core development machine (both cores busy).
#
#     bash studies/beta10/run_study.sh                            # everything
#     bash studies/beta10/run_study.sh trades-s0 got-trades-lm-s0  # some runs only
#
# Environment: OUT (runs/study), JOBS (2), EPOCHS (2), PAPER_EPOCHS (1), PY (.venv/bin/python, else python3),
# THREADS (1), DEVICE (the library's choice), DATA_DIR (the examples' default), TRAIN_FLAGS (more training
# flags, e.g. --no-deterministic), DEADLINE (a `date +%s` time after which no run or evaluation starts:
# gpu_study.sh ends inside the device's time limit with it), QUICK=1 (a smoke test of the whole pipeline: 256
# training points, evaluations on 100 test points, AutoAttack on 20).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-runs/study}
JOBS=${JOBS:-2}
EPOCHS=${EPOCHS:-2}   # the CPU study ran 2 (epochs 1-2 run at lr 0.01 either way); gpu_study.sh runs 5
PAPER_EPOCHS=${PAPER_EPOCHS:-1}
THREADS=${THREADS:-1}
DEADLINE=${DEADLINE:-0}
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
PLACE=()
[ -n "${DEVICE:-}" ] && PLACE+=(--device "$DEVICE")
[ -n "${DATA_DIR:-}" ] && PLACE+=(--data-dir "$DATA_DIR")
COMMON=(--dataset mnist --epochs "$EPOCHS" --lr-schedule 4 --num-steps 10 --step-size 0.04 --test-subset 2000
        --threads "$THREADS" --quiet "${PLACE[@]}" ${TRAIN_FLAGS:-})
QUICK_EVAL=()
[ "${QUICK:-0}" = 1 ] && COMMON+=(--train-subset 256 --test-subset 200) && QUICK_EVAL=(--n 100 --aa-n 20)
declare -A RUN
for s in 0 1 2; do
    RUN[trades-s$s]="train_trades.py --got none --seed $s"
    RUN[got-trades-lm-s$s]="train_trades.py --got lm --seed $s"
done
# The paper's form runs PAPER_EPOCHS (on a CPU 1: it is at chance from the first steps on; the GPU screen,
# studies/beta10/results/screen_gpu, has it and the defaults at beta 10 with both solvers).
RUN[paper-trades-lm-s0]="train_trades.py --got lm --got-beta 10 --got-anchor none --no-got-debias --seed 0 --epochs $PAPER_EPOCHS"
RUN[pgd-at-s0]="train_pgd.py --got none --seed 0"
RUN[got-pgd-lm-s0]="train_pgd.py --got lm --seed 0"
ORDER=(got-trades-lm-s0 trades-s0 got-trades-lm-s1 trades-s1 got-trades-lm-s2 trades-s2 got-pgd-lm-s0 pgd-at-s0
       paper-trades-lm-s0)
late() { [ "$DEADLINE" -gt 0 ] && [ "$(date +%s)" -ge "$DEADLINE" ]; }
GOT_FLAGS=${GOT_FLAGS:-}   # extra flags for the GOT runs (the chosen variant), e.g. "--got-beta 10"

job() {  # name
    local name=$1 spec=(${RUN[$1]}) dir="$OUT/$1"
    local script=${spec[0]} flags=("${spec[@]:1}")
    [[ $name == got-* ]] && flags+=($GOT_FLAGS)
    mkdir -p "$OUT"
    late && { echo "$name: not started (deadline)" >&2; return 0; }
    [ -f "$dir/model_final.pt" ] || $PY -m "examples.${script%.py}" "${COMMON[@]}" --out "$dir" --resume "${flags[@]}" \
        > "$OUT/$name.train.log" 2>&1 || { echo "$name: training failed" >&2; return 1; }
    # AutoAttack for the main arms; the paper's form (at chance) gets clean / PGD-40 only.
    local parts=(test10k)
    [[ $name == paper-* ]] || parts+=(aa1000)
    [[ $name == *-s0 && $name != paper-* ]] && parts+=(sanity)
    for part in "${parts[@]}"; do
        [ ! -f "$dir/eval-$part.json" ] || continue
        late && { echo "$name: eval $part not started (deadline)" >&2; continue; }
        case $part in
            test10k) f=(--test-subset 0 --step-size 0.01 --pgd-steps 40 --aa-n 0 --eps-sweep) ;;
            aa1000)  f=(--test-subset 0 --n 1000 --step-size 0.01 --pgd-steps 40 --aa-n 1000 --aa-breakdown none --eps-sweep) ;;
            sanity)  f=(--test-subset 0 --n 1000 --step-size 0.01 --pgd-steps 20 --aa-n 200 --aa-breakdown stages) ;;
        esac
        [[ $part == test10k ]] && [ ${#QUICK_EVAL[@]} -gt 0 ] && f+=(--n 100)
        [[ $part != test10k ]] && f+=("${QUICK_EVAL[@]}")
        $PY -m examples.evaluate "$dir" --tag "$part" "${f[@]}" --threads "$THREADS" --quiet "${PLACE[@]}" \
            > "$OUT/$name.eval-$part.log" 2>&1 \
            || echo "$name: eval $part failed" >&2
    done
}
NAMES=("$@")
[ ${#NAMES[@]} -gt 0 ] || NAMES=("${ORDER[@]}")
for name in "${NAMES[@]}"; do
    [ -n "${RUN[$name]:-}" ] || { echo "run_study.sh: unknown run '$name'; the runs are: ${ORDER[*]}" >&2; exit 2; }
done
for name in "${NAMES[@]}"; do
    while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n; done
    job "$name" &
done
wait
