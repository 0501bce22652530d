#!/usr/bin/env bash
# fp32 decode speed at llama2.c's model shapes (issue: "run llama2.c models at C speed").
# Usage: bench/fp32.sh [path/to/stories260K.bin]   (default: ../shared/data/stories260K.bin)
# Prints one table: tok/s next to GB/s of weights streamed, time to first token, peak RSS.
set -euo pipefail
cd "$(dirname "$0")/.."
real=${1:-../shared/data/stories260K.bin}
models=()
[ -f "$real" ] && models+=("$real")
exec babyllama bench "${models[@]}" --shape 15M --shape 42M --shape 110M --repeats 3 --steps 256
