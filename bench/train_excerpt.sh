#!/usr/bin/env bash
# Train a baby Llama end to end on a text file, in minutes on 2 CPU cores
# (issue "Train a baby Llama end to end": learning on the TinyStories excerpt).
#
# Usage: bench/train_excerpt.sh [excerpt.txt] [out_dir]
#   excerpt.txt  default ../shared/data/tinystories_excerpt.txt
#   out_dir      default runs/excerpt
#
# Steps: a 512-token BPE vocabulary -> train/val token shards -> the stories260K shape
# (dim 64, 5 layers, 8 heads, 4 kv heads, hidden 172, context 256) -> llama2.c .bin v0 +
# tokenizer.bin -> a sample. Prints validation loss against wall time at the end.
# Knobs (environment): MAX_ITERS, BATCH_SIZE, LR, BABYLLAMA (the babyllama command), BACKEND
# (torch, the default here because the bundled model is this run on torch; numba: the hand-written
# trainer, faster on a CPU, see README "Training without autograd"), and THREADS (torch's or the
# hand-written trainer's threads; on a machine shared with other busy processes THREADS=1 can be
# many times faster than 2 for torch, because idle-waiting OpenMP threads fight the other load).
set -euo pipefail
cd "$(dirname "$0")/.."
src=${1:-../shared/data/tinystories_excerpt.txt}
out=${2:-runs/excerpt}
if [ -z "${BABYLLAMA:-}" ]; then
    if command -v babyllama >/dev/null; then BABYLLAMA=babyllama; else BABYLLAMA=.venv/bin/babyllama; fi
fi
bl() { "$BABYLLAMA" "$@"; }
max_iters=${MAX_ITERS:-1000}
batch_size=${BATCH_SIZE:-16}
lr=${LR:-5e-3}
mkdir -p "$out"

# 1. vocabulary: sentencepiece BPE, 512 tokens -> tok512.model + tok512.bin
bl data train-vocab --vocab-size 512 --input "$src" --out "$out/tok512"

# 2. token shards, 5% of the stories held out for validation
bl data pretokenize --tokenizer "$out/tok512/tok512.model" --input "$src" \
    --out "$out/data" --val-fraction 0.05

# 3. train the stories260K shape; every log line gets the wall time since the start
if [ -n "${THREADS:-}" ]; then export OMP_NUM_THREADS=$THREADS NUMBA_NUM_THREADS=$THREADS; fi
start=${EPOCHREALTIME/./}
bl train --data_dir "$out/data" --out_dir "$out/train" \
    --dim 64 --n_layers 5 --n_heads 8 --n_kv_heads 4 --multiple_of 4 --seq_len 256 \
    --batch_size "$batch_size" --max_iters "$max_iters" --lr "$lr" --min_lr 5e-4 \
    --warmup_iters 50 --weight_decay 0.1 --dropout 0.0 \
    --eval_interval 100 --eval_iters 6 --log_interval 50 --device cpu --seed 1337 \
    --backend "${BACKEND:-torch}" 2>&1 |
    while IFS= read -r line; do
        now=${EPOCHREALTIME/./}
        printf '[%ds] %s\n' $(((now - start) / 1000000)) "$line"
    done | tee "$out/train.log"

# 4. llama2.c .bin (version 0, what run.c reads) with tokenizer.bin beside it
bl export "$out/train/ckpt.pt" "$out/model.bin" --tokenizer "$out/tok512/tok512.model"

# 5. validation loss against wall time, and training speed
echo
echo "iter | elapsed s | train loss | val loss"
awk '/\| loss / { split($3, a, "/"); train[a[1]] = $6 }
     /: val loss / { it = $3; sub(":", "", it); t = $1; gsub(/[][s]/, "", t)
                     printf "%4d | %9d | %10s | %.4f\n", it, t, (it in train ? train[it] : "-"), $6 }' "$out/train.log"
awk '/ tok\/s / { for (i = 1; i <= NF; i++) if ($(i + 1) == "tok/s") { gsub(",", "", $i); s += $i; n++ } }
     END { if (n) printf "mean training speed: %.0f tokens/s over %d log intervals\n", s / n, n }' "$out/train.log"

# 6. a story from the model just trained
echo
bl run "$out/model.bin" -z "$out/tokenizer.bin" -t 0.8 -s 1 -n 200 -i "Once upon a time"
