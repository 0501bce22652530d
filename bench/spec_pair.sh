#!/usr/bin/env bash
# Speculative decoding on a real draft/target pair trained on the same data (issue "Many tokens per
# pass"): the bundled model (stories260K shape) drafts for a larger model trained here on the same
# TinyStories excerpt and vocabulary; then `babyllama bench` times the target alone, with the draft,
# and with prompt lookup, and `babyllama run` checks the tokens are the same.
#
# Usage: bench/spec_pair.sh [excerpt.txt] [out_dir]     (default ../shared/data/tinystories_excerpt.txt runs/spec)
# Knobs: MAX_ITERS (target training steps, default 1500), THREADS (torch threads), BABYLLAMA.
# The weights are not committed: rerun the script to get them (~30-60 min on 2 CPU cores).
set -euo pipefail
cd "$(dirname "$0")/.."
src=${1:-../shared/data/tinystories_excerpt.txt}
out=${2:-runs/spec}
if [ -z "${BABYLLAMA:-}" ]; then
    if command -v babyllama >/dev/null; then BABYLLAMA=babyllama; else BABYLLAMA=.venv/bin/babyllama; fi
fi
bl() { "$BABYLLAMA" "$@"; }
if [ -n "${THREADS:-}" ]; then export OMP_NUM_THREADS=$THREADS; fi
mkdir -p "$out"

# 1. the bundled model's vocabulary and data (bench/train_excerpt.sh's steps 1-2)
bl data train-vocab --vocab-size 512 --input "$src" --out "$out/tok512"
bl data pretokenize --tokenizer "$out/tok512/tok512.model" --input "$src" --out "$out/data" --val-fraction 0.05
if ! cmp -s "$out/tok512/tok512.bin" babyllama/assets/tokenizer.bin; then
    echo "the vocabulary differs from the bundled model's: the bundled model cannot draft for this target" >&2
    exit 1
fi

# 2. the target: 10x the draft's width-depth (dim 256, 8 layers, 8 heads), same context
bl train --data_dir "$out/data" --out_dir "$out/train" \
    --dim 256 --n_layers 8 --n_heads 8 --n_kv_heads 8 --seq_len 256 \
    --batch_size 16 --max_iters "${MAX_ITERS:-1500}" --lr 1e-3 --min_lr 1e-4 --warmup_iters 100 \
    --eval_interval 250 --eval_iters 6 --log_interval 50 --device cpu --seed 1337
bl export "$out/train/ckpt.pt" "$out/target.bin" --tokenizer "$out/tok512/tok512.model"
cp babyllama/assets/model.bin "$out/draft.bin"

# 3. the same tokens with and without drafting, then the speeds side by side
for flags in "" "--draft $out/draft.bin" "--lookup 4"; do
    # shellcheck disable=SC2086
    bl run "$out/target.bin" -z "$out/tokenizer.bin" -t 0.8 -s 7 -n 256 -i "Once upon a time" --json $flags |
        python3 -c "import json,sys,hashlib; j=json.load(sys.stdin); print('tokens md5', hashlib.md5(str(j['tokens']).encode()).hexdigest(), 'acceptance', j.get('acceptance'))"
done
bl bench "$out/target.bin" --draft "$out/draft.bin" --no-ttft --repeats 3
bl bench "$out/target.bin" --lookup 4 --no-ttft --repeats 3
