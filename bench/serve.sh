#!/usr/bin/env bash
# The serve benchmark (README's serve table): 32 concurrent streaming clients x 2 requests of 64
# tokens at the 15M and 110M shapes (random weights), `babyllama serve` next to the offline
# generate_batch rate for the same work. LCPP_PYTHON=/path/bin/python (a venv with
# llama-cpp-python[server] and gguf; never a babyllama dependency) adds llama-cpp-python's server
# on the same weights. Extra arguments go to `python -m babyllama.serve.bench`.
set -euo pipefail
cd "$(dirname "$0")/.."
peer=()
if [ -n "${LCPP_PYTHON:-}" ]; then peer=(--peer-python "$LCPP_PYTHON"); fi
exec python -m babyllama.serve.bench --shape 15M --shape 110M --clients 32 --requests 2 --max-tokens 64 "${peer[@]}" "$@"
