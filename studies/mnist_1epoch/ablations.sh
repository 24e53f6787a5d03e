#!/usr/bin/env bash
# Issue #5's investigation, after the pilot (pilot.sh here, whose schedule it shares: 1 epoch, 10-step
# training attack of step 0.04, seed 0 unless named).  Evaluated like the pilot on the first 1000 test points
# (PGD-10/40/100 of step 0.01, eps sweep to 0.5, AutoAttack standard on the first 100 with its stages), but
# without the pilot's extra run of Square alone.
#   * from scratch, seed 0: beta 0.1, theta 1, lambda 10, and the layer (the conv block's output instead of
#     the penultimate fc layer);
#   * fine-tuning: one more epoch from each TRADES pilot model (seeds 0-2), with TRADES alone or with GOT-LM
#     added (beta 1; beta 10 on seed 0): does GOT help a model that already has features, at equal budget?
# Two runs at a time, one thread each.  Output: runs/mnist_pilot/<name>/ beside the pilot's runs.
#
#     bash studies/mnist_1epoch/ablations.sh      # about 85 min on 2 CPU cores (about 13 min per pair)
set -euo pipefail
cd "$(dirname "$0")/../.."
AA_BREAKDOWN=none  # AutoAttack's stages only: no extra run of Square alone
source studies/mnist_1epoch/runs.sh

G="--got lm --got-beta 1"
# In priority order (the paper's ablation axes first), so that an interrupted run still has them.
pair "got-trades-lm-b0.1-s0 train_trades --seed 0 --got lm --got-beta 0.1" \
     "got-trades-lm-theta1-s0 train_trades --seed 0 $G --got-theta 1"
pair "got-trades-lm-lam10-s0 train_trades --seed 0 $G --got-lam 10" \
     "got-trades-lm-conv-s0 train_trades --seed 0 $G --got-layer feature_extractor.9"
for s in 0 1 2; do
    FT="--seed $s --init-weights $OUT/trades-s$s/model_final.pt"
    pair "ft-trades-s$s train_trades $FT" "ft-got-trades-lm-s$s train_trades $FT $G"
done
pair "ft-got-trades-lm-b10-s0 train_trades --seed 0 --init-weights $OUT/trades-s0/model_final.pt --got lm --got-beta 10" ""
