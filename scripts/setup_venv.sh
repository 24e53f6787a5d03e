#!/usr/bin/env bash
# Makes .venv (if missing) and installs got-reg editable with its `dev` extra (= `test` = `examples` + pytest and
# hypothesis, plus ruff and mypy), which is what CI uses.
#
# torch==$TORCH_VERSION is installed first and on its own, from an explicit source, so that the package install
# after it finds torch already satisfied and adds nothing:
#   TORCH_INDEX_URL set   -> torch from that index only (e.g. https://download.pytorch.org/whl/cu128 for a GPU,
#                            https://download.pytorch.org/whl/cpu for the CPU build).
#   nvidia-smi sees a GPU -> torch from pip's usual index: on Linux x86_64, PyPI's torch is the CUDA build.
#   no GPU (CI)           -> the CPU build, never a CUDA one: first a torch wheel pip finds without an index
#                            (its find-links, e.g. PIP_FIND_LINKS=/dir/with/the/wheel), else PyTorch's CPU index
#                            https://download.pytorch.org/whl/cpu. If neither answers, the script stops and says what
#                            to set, instead of letting pip fall back to a several-GB CUDA build.
#   (macOS and Windows: PyPI's torch is the CPU build there; it is used as is.)
# Other settings: PYTHON (the interpreter that makes .venv, default python3), EXTRAS (default dev).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
EXTRAS=${EXTRAS:-dev}

"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))' || {
    echo "setup_venv.sh: got-reg needs Python 3.10 or newer (torch==$TORCH_VERSION has no wheels for older ones);" \
         "$PY is $("$PY" -c 'import platform; print(platform.python_version())'). Set PYTHON=python3.11, say." >&2
    exit 1
}
# The dev install takes about 2.6 GB (torch 0.75, Triton 1.0, POT 0.18); pip's "No space left on device" comes
# part-way through, so say beforehand what is missing.
free_kb=$(df -Pk . 2>/dev/null | awk 'NR == 2 {print $4}')
if [ -n "$free_kb" ] && [ "$free_kb" -lt 3000000 ] && ! [ -x .venv/bin/python ]; then
    echo "setup_venv.sh: warning: $((free_kb / 1024)) MB free in $(pwd); the install needs about 2.6 GB" \
         "(EXTRAS=examples, enough for the main job but not the tests, skips Triton: about 1.5 GB)" >&2
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip() { .venv/bin/python -m pip "$@"; }
pip install -q --upgrade pip

have_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; }
torch_version() { .venv/bin/python -c 'from importlib.metadata import version; print(version("torch"))' 2>/dev/null; }
torch_ok() { [ "$(torch_version | cut -d+ -f1)" = "$TORCH_VERSION" ]; }

if torch_ok; then
    echo "setup_venv.sh: torch $(torch_version) already in .venv"
elif [ -n "${TORCH_INDEX_URL:-}" ]; then
    echo "setup_venv.sh: torch==$TORCH_VERSION from TORCH_INDEX_URL=$TORCH_INDEX_URL"
    pip install -q "torch==$TORCH_VERSION" --index-url "$TORCH_INDEX_URL"
elif have_gpu || [ "$(uname -s)" != Linux ]; then
    echo "setup_venv.sh: torch==$TORCH_VERSION from the default index (GPU seen by nvidia-smi, or not Linux)"
    pip install -q "torch==$TORCH_VERSION"
elif pip install -q --no-index --no-deps "torch==$TORCH_VERSION" 2>/dev/null; then
    # A local wheel (find-links); its dependencies (filelock, sympy, ...) come from the usual index.
    echo "setup_venv.sh: torch==$TORCH_VERSION from a local wheel (no GPU)"
    pip install -q "torch==$TORCH_VERSION"
elif pip install -q --retries 1 "torch==$TORCH_VERSION" --index-url "$TORCH_CPU_INDEX"; then
    echo "setup_venv.sh: torch==$TORCH_VERSION from $TORCH_CPU_INDEX (no GPU)"
else
    cat >&2 <<MSG
setup_venv.sh: no CPU build of torch==$TORCH_VERSION for this Python: no local wheel, and $TORCH_CPU_INDEX did
not answer. Without a GPU, pip's default index on Linux would download the CUDA build (about 2.7 GB of wheels),
so the script stops here. Either
  - put the CPU wheel where pip looks without an index: PIP_FIND_LINKS=/dir/with/torch-$TORCH_VERSION+cpu-*.whl,
  - name an index that has it: TORCH_INDEX_URL=https://your.mirror/whl/cpu bash scripts/setup_venv.sh,
  - or take the CUDA build on purpose: TORCH_INDEX_URL=https://pypi.org/simple bash scripts/setup_venv.sh,
  - or use a Python for which a CPU wheel is at hand (PYTHON=python3.11 ...; remove .venv first).
MSG
    exit 1
fi
echo "setup_venv.sh: torch $(torch_version) installed"
pip install -q -e ".[$EXTRAS]"
