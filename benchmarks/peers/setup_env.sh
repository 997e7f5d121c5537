#!/usr/bin/env bash
# Create (or update) .venv-peers: llm-compressor's own environment for benchmarks/bench_pruning.py.
# Separate from losa's .venv because llmcompressor pins its own transformers. Idempotent.
#   bash benchmarks/peers/setup_env.sh            # -> .venv-peers in the repository root
#   PYTHON=python3.11 VENV=/tmp/peers bash benchmarks/peers/setup_env.sh
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
python="${PYTHON:-python3}"
venv="${VENV:-$root/.venv-peers}"

if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet -r "$root/benchmarks/peers/requirements.txt"
"$venv/bin/python" -m pip check
"$venv/bin/python" - <<'PY'
import sys
import torch, transformers, llmcompressor
from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier  # noqa: F401
print(f"{sys.prefix}: llmcompressor {llmcompressor.__version__}, torch {torch.__version__}, transformers {transformers.__version__}")
PY
