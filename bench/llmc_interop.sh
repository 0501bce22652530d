#!/usr/bin/env bash
# llm.c interop (issue 14), both directions, against llm.c itself: its C loader and forward
# (train_gpt2.c, llmc/tokenizer.h, compiled here with bench/llmc/logits.c) and its Python writer
# (train_gpt2.py's write_model / write_tokenizer). Bench-only: needs an llm.c checkout, gcc, torch
# and tiktoken (never a babyllama dependency: put it in a separate folder on TIKTOKEN_PATH).
#
# Usage: bench/llmc_interop.sh [LLMC_DIR]       (default /tmp/llmc)
#   TIKTOKEN_PATH=/tmp/llmcvenv/site   a folder where `pip install --target` put tiktoken
# Prints max logit differences (babyllama engine vs llm.c's C forward, vs train_gpt2.py's torch)
# and the tokenizer checks, then PASS or FAIL (exit status 0 or 1).
set -euo pipefail
cd "$(dirname "$0")/.."
llmc=$(cd "${1:-/tmp/llmc}" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
gcc -Ofast -march=native -fopenmp -I"$llmc" bench/llmc/logits.c -lm -o "$work/logits"
PYTHONPATH="${TIKTOKEN_PATH:-/tmp/llmcvenv/site}${PYTHONPATH:+:$PYTHONPATH}" \
    python bench/llmc/interop.py "$llmc" "$work/logits" "$work"
