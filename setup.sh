#!/usr/bin/env bash
# Sets mell up for use and development: a virtual environment in ./.venv holding the CPU build
# of torch 2.13.0 and mell itself (editable) with its test tools. Safe to run again.
#
# Where torch comes from: PyPI's Linux wheels of torch are CUDA builds that pull several GB of
# NVIDIA packages, so this script takes, in order:
#   1. the index in $MELL_TORCH_INDEX when set (a CUDA build's index on a GPU host, say);
#   2. a torch 2.13.0 wheel that pip finds without any index (pip's find-links: a wheel
#      directory or cache set up on the machine; CI's machine has one);
#   3. PyTorch's CPU wheel index (Linux, macOS and Windows wheels).
set -euo pipefail
cd "$(dirname "$0")"
TORCH="torch==2.13.0"
CPU_INDEX="https://download.pytorch.org/whl/cpu"

python3 -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip
if [[ -n "${MELL_TORCH_INDEX:-}" ]]; then
    pip install -q "$TORCH" --index-url "$MELL_TORCH_INDEX"
elif pip install -q --no-index --no-deps "$TORCH" 2>/dev/null; then
    pip install -q "$TORCH"  # its dependencies, from the usual indexes
else
    pip install -q "$TORCH" --index-url "$CPU_INDEX"
fi
pip install -q -e '.[test]'
echo "mell is set up in $PWD/.venv: run '. .venv/bin/activate', then 'mellctl up'"
