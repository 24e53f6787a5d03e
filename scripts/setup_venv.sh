#!/usr/bin/env bash
# Creates .venv (if missing) and installs got-reg with its test and example extras.
# torch==2.13.0 goes first so that pip takes the CPU wheel on disk instead of a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[test,examples]"
