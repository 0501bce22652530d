#!/usr/bin/env bash
# fp32 decode speed at llama2.c's model shapes (issue: "run llama2.c models at C speed").
# Usage: bench/fp32.sh [path/to/stories260K.bin]   (default: ../shared/data/stories260K.bin)
# Prints one table: tok/s next to GB/s of weights streamed, time to first token, peak RSS.
# LLAMA2C_RUN="/path/to/run [/path/to/runomp]" adds llama2.c's own tok/s and ours/theirs for each
# model, timed in turns with ours (build run.c from llama2.c: gcc -Ofast -march=native [-fopenmp]).
set -euo pipefail
cd "$(dirname "$0")/.."
real=${1:-../shared/data/stories260K.bin}
models=()
[ -f "$real" ] && models+=("$real")
peers=()
for p in ${LLAMA2C_RUN:-}; do peers+=(--peer "$p"); done
exec babyllama bench "${models[@]}" --shape 15M --shape 42M --shape 110M --repeats 3 --steps 256 "${peers[@]}"
