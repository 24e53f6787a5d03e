#!/usr/bin/env bash
# The study's 11 models (see README.md here): real MNIST, SmallCNN, 1 epoch of training with a 10-step attack
# (step 0.04) instead of 100 epochs of 40 steps (step 0.01), evaluation on the first 1000 test points (PGD
# 10/40/100 of step 0.01, an eps sweep to 0.5) and AutoAttack standard on the first 100.
# Two processes at a time, one thread each.  Output: runs/mnist_pilot/<name>/ and runs/mnist_pilot/summary.md
#
#     bash studies/mnist_1epoch/pilot.sh          # about 85 min on 2 CPU cores
set -euo pipefail
cd "$(dirname "$0")/../.."
source studies/mnist_1epoch/runs.sh

# In priority order, so that an interrupted pilot still has the main comparison.  GOT uses beta = 1 (as the
# main job): with the paper's beta = 10, GOT-TRADES-LM from scratch sat at 10-13% accuracy after 50 steps
# where TRADES had 66% clean; one beta = 10 run is kept to show it on the full epoch.
G="--got-beta 1"
pair "trades-s0 train_trades --seed 0"                 "got-trades-lm-s0 train_trades --seed 0 --got lm $G"
pair "trades-s1 train_trades --seed 1"                 "got-trades-lm-s1 train_trades --seed 1 --got lm $G"
pair "trades-s2 train_trades --seed 2"                 "got-trades-lm-s2 train_trades --seed 2 --got lm $G"
pair "pgd-at-s0 train_pgd --seed 0"                    "got-pgd-lm-s0 train_pgd --seed 0 --got lm $G"
pair "got-trades-s-s0 train_trades --seed 0 --got s $G" "got-trades-lm-b10-s0 train_trades --seed 0 --got lm --got-beta 10"
pair "got-trades-lm-dual-s0 train_trades --seed 0 --got lm --got-solver dual $G" ""
$PY -m studies.mnist_1epoch.pilot_summary "$OUT"
