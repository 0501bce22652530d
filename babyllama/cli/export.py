"""`babyllama export`: convert a model between torch ckpt.pt, llama2.c .bin (v0-v3), Hugging Face
and Meta folders, GGUF, and llm.c's GPT-2 .bin (the work is babyllama.convert's).

    babyllama export out/ckpt.pt model.bin --tokenizer tok512.model   # v0, what run.c reads
    babyllama export out/ckpt.pt model_q80.bin --version 2            # int8
    babyllama export model.bin hf_folder --to hf --tokenizer tok512.model
    babyllama export llama3_hf_folder llama3.bin --version 1          # v0 cannot hold theta/eps
    babyllama export stories15M.bin stories15M.gguf --to gguf --gguf-type Q8_0   # for llama.cpp
    babyllama export out/ckpt.pt gpt2.bin --to llmc --tokenizer tokenizer.json   # GPT-2, for llm.c
    babyllama export gpt2_124M.bin gpt2_hf --to hf --tokenizer vocab.json        # GPT2LMHeadModel
"""

from __future__ import annotations

import sys
from pathlib import Path

from ..convert import TARGETS, convert
from . import OneLineParser


def _parser() -> OneLineParser:
    p = OneLineParser(
        prog="babyllama export",
        description="Convert a model: torch .pt, llama2.c .bin, Hugging Face folder, Meta folder, GGUF or llm.c "
                    ".bin in; .bin, HF folder, .pt, GGUF or llm.c .bin (GPT-2) out.",
    )
    p.add_argument("input", help="a torch .pt (babyllama train's ckpt.pt), a llama2.c .bin, an HF folder, a "
                                 "Meta folder, a GGUF file or an llm.c GPT-2 .bin")
    p.add_argument("output", help="a .bin/.pt/.gguf file, or a folder for --to hf")
    p.add_argument("--to", default="bin", help=f"output format: {', '.join(TARGETS)} (default: bin)")
    p.add_argument("--version", type=int, default=0,
                   help=".bin format version: 0 (run.c's, llama2.c's hyperparameters only), 1 (fp32), 2 (int8), "
                        "3 (int4) (default: 0)")
    p.add_argument("--tokenizer", help="sentencepiece .model or tokenizer.bin to write next to the model; for GPT-2: "
                                       "tokenizer.json, vocab.json (merges.txt beside) or gpt2_tokenizer.bin")
    p.add_argument("--seq-len", type=int, default=None, help="context length for Meta checkpoints (default 2048)")
    p.add_argument("--gguf-type", default="F32", choices=["F32", "F16", "Q8_0"],
                   help="with --to gguf: how matrices are stored (default F32; norms are always F32)")
    return p


def main(argv=None) -> int:
    """`babyllama export INPUT OUTPUT ...`; raises BabyLlamaError on bad input."""
    args = _parser().parse_args(argv)
    out = convert(args.input, args.output, args.to, args.version, args.tokenizer, args.seq_len, args.gguf_type)
    print(f"wrote {out}")
    if args.to == "hf" and args.tokenizer and Path(args.tokenizer).suffix not in (".model", ".json") \
            and not Path(args.tokenizer).is_dir() and (Path(args.output) / "tokenizer.bin").is_file():
        print("note: transformers' AutoTokenizer needs the sentencepiece .model; only tokenizer.bin was written",
              file=sys.stderr)
    return 0
