#!/usr/bin/env bash
# Issue #5: the study's evaluation of the MNIST models of pilot.sh (this folder), in two parts per run:
#   test10k  clean and PGD-40 (step 0.01, random start) on all 10 000 test points        -> eval-test10k.{json,md}
#   aa1000   AutoAttack standard (pyautoattack) on the first 1000 test points, with the accuracy after each of
#            its stages (and clean / PGD-40 on those 1000)                                 -> eval-aa1000.{json,md}
# beside each run's eval.json, which keeps the pilot's PGD-10/40/100, eps sweep (first 1000) and Square alone
# (first 100): Square alone on 1000 points would cost another 9 min per model here.  A part already written is
# skipped.  Two runs at a time, one thread each; on 2 CPU cores test10k takes about 6 min per pair of runs,
# aa1000 about 11.
#
#     bash studies/mnist_1epoch/full_eval.sh [run names...]          # default: the 8 main runs
#     PARTS=test10k bash studies/mnist_1epoch/full_eval.sh ...       # one part only
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-runs/mnist_pilot}
PARTS=${PARTS:-"test10k aa1000"}
PY=.venv/bin/python
RUNS=("$@")
[ ${#RUNS[@]} -gt 0 ] || RUNS=(trades-s0 got-trades-lm-s0 trades-s1 got-trades-lm-s1 trades-s2 got-trades-lm-s2
                              pgd-at-s0 got-pgd-lm-s0)
full_eval() {  # run
    local part
    for part in $PARTS; do
        [ ! -f "$OUT/$1/eval-$part.json" ] || continue
        case $part in
            test10k) flags=(--test-subset 0 --aa-n 0) ;;
            aa1000)  flags=(--n 1000 --aa-n 1000 --aa-breakdown none) ;;
            *) echo "unknown part $part (test10k, aa1000)" >&2; return 2 ;;
        esac
        $PY -m examples.evaluate "$OUT/$1" --tag "$part" --step-size 0.01 --pgd-steps 40 --eps-sweep "${flags[@]}" \
            --threads 1 --quiet > "$OUT/$1.eval-$part.log" 2>&1
    done
}
for ((i = 0; i < ${#RUNS[@]}; i += 2)); do
    full_eval "${RUNS[i]}" &
    [ $((i + 1)) -ge ${#RUNS[@]} ] || full_eval "${RUNS[i+1]}" &
    wait
done
