# Sourced by pilot.sh and ablations.sh (this folder): the study's reduced MNIST schedule and the helpers that
# train and evaluate its runs two at a time (one thread each).  A run or evaluation already written is skipped,
# so an interrupted script can be started again.  Run from the repository root (the scripts cd there).
#   OUT           run directory root (default runs/mnist_pilot)
#   AA_BREAKDOWN  examples.evaluate --aa-breakdown (default stages: AutoAttack's stages and Square alone)
OUT=${OUT:-runs/mnist_pilot}
AA_BREAKDOWN=${AA_BREAKDOWN:-stages}
PY=.venv/bin/python
# 1 epoch with a 10-step attack of step 0.04 instead of 100 epochs of 40 steps of 0.01.
COMMON=(--dataset mnist --epochs 1 --num-steps 10 --step-size 0.04 --test-subset 1000 --threads 1 --quiet)
# GOT as the paper writes it and as this study ran it: W itself (no debiasing), gradients through both the
# clean and the adversarial side, the dual potential on the raw features.  Pinned because the library's
# defaults have moved on since; a baseline run ignores them.
COMMON+=(--got-anchor none --no-got-debias --got-dual-input raw)
mkdir -p "$OUT"

train() {  # name module flags...   (module: train_trades or train_pgd)
    local name=$1 module=$2; shift 2
    [ -f "$OUT/$name/model_final.pt" ] || $PY -m "examples.$module" "${COMMON[@]}" --out "$OUT/$name" --overwrite "$@" \
        > "$OUT/$name.train.log" 2>&1
}
evaluate() {  # name: the first 1000 test points, PGD-10/40/100 of step 0.01, eps sweep, AutoAttack on 100
    [ -f "$OUT/$1/eval.json" ] || $PY -m examples.evaluate "$OUT/$1" --n 1000 --step-size 0.01 --pgd-steps 10 40 100 \
        --aa-n 100 --aa-breakdown "$AA_BREAKDOWN" --threads 1 --quiet > "$OUT/$1.eval.log" 2>&1
}
pair() {  # two "name module flags" jobs (as strings) in parallel, then both evaluations in parallel
    local a=($1) b=($2)
    train "${a[@]}" &
    [ ${#b[@]} -eq 0 ] || train "${b[@]}" &
    wait
    evaluate "${a[0]}" &
    [ ${#b[@]} -eq 0 ] || evaluate "${b[0]}" &
    wait
}
