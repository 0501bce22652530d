"""Training data: corpora in, token shards out, and the batches the trainer reads.

The pipeline is three `babyllama data` subcommands and one class:
  download      fetch an archive (resumable, sha256-checked) and unpack it
  train-vocab   sentencepiece BPE with llama2.c's settings -> tokN.model + tokN.bin
  pretokenize   corpus -> DIR/train_000.bin ..., DIR/val.bin, DIR/meta.json
  TokenWindows  random (x, y) windows over the shards, the batches train.py reads

This module is the `babyllama data` command line and the one import for all of it; the work
lives in corpus.py (documents, downloads), vocab.py (sentencepiece) and shards.py (pretokenized
shards and the loader).
"""

from __future__ import annotations

import argparse
import sys

from .corpus import (  # noqa: F401  (re-exported: babyllama.data is the public face)
    CORPUS_SUFFIXES, DATASETS, DEFAULT_TEXT_FIELDS, SPLIT_MODES, Dataset, download, iter_documents, sha256_file,
    split_lines,
)
from .shards import (  # noqa: F401
    DEFAULT_SHARD_TOKENS, META_FORMAT, TokenWindows, is_val_document, pretokenize, read_meta, token_dtype,
)
from .errors import BabyLlamaError, DataError
from .vocab import MIN_VOCAB, export_tokenizer, load_sentencepiece, train_vocab  # noqa: F401

# ---------------------------------------------------------------------------------------------
# command line: babyllama data ...


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="babyllama data", description="Get a corpus, train a vocabulary, pretokenize.")
    sub = p.add_subparsers(dest="command", required=True)

    def corpus_options(sp):
        sp.add_argument("--input", required=True, help="a .txt/.jsonl/.json file or a folder of them")
        sp.add_argument("--split-on", default="auto", choices=SPLIT_MODES,
                        help="how .txt files are cut into documents (default: auto = tinystories for a file, "
                             "none (file = document) inside a folder)")
        sp.add_argument("--text-field", default=None,
                        help=f"JSON field holding the text (default: the first of {', '.join(DEFAULT_TEXT_FIELDS)})")

    d = sub.add_parser("download", help="download and unpack a corpus (resumable)")
    d.add_argument("name", nargs="?", help=f"a known dataset: {', '.join(DATASETS)} (or give --url)")
    d.add_argument("--url", help="download this URL instead of the dataset's own")
    d.add_argument("--sha256", help="expected sha256 of the downloaded file")
    d.add_argument("--out", default="data", help="folder to download into (default: data)")
    d.add_argument("--no-unpack", action="store_true", help="keep the archive packed")

    v = sub.add_parser("train-vocab", help="train a sentencepiece BPE vocabulary -> tokN.model + tokN.bin")
    v.add_argument("--vocab-size", type=int, required=True)
    corpus_options(v)
    v.add_argument("--out", required=True, help="output folder")
    v.add_argument("--max-documents", type=int, default=None, help="train on the first N documents only")

    t = sub.add_parser("pretokenize", help="corpus -> train/val token shards + meta.json")
    t.add_argument("--tokenizer", required=True, help="sentencepiece .model file")
    corpus_options(t)
    t.add_argument("--out", required=True, help="output folder")
    t.add_argument("--val-fraction", type=float, default=0.01)
    t.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    t.add_argument("--dtype", default="auto", choices=("auto", "uint16", "uint32"))
    t.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS)

    e = sub.add_parser("export-tokenizer", help="sentencepiece .model -> tokenizer.bin")
    e.add_argument("model")
    e.add_argument("out")
    return p


def main(argv=None) -> int:
    """Entry point of `babyllama data`; returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "download":
            if args.url:
                url, sha = args.url, args.sha256
            elif args.name in DATASETS:
                url, sha = DATASETS[args.name].url, args.sha256 or DATASETS[args.name].sha256
            else:
                raise DataError(f"unknown dataset {args.name!r}: expected one of {', '.join(DATASETS)}, or give --url")
            print(download(url, args.out, sha, unpack=not args.no_unpack))
        elif args.command == "train-vocab":
            model, bin_ = train_vocab(args.vocab_size, args.input, args.out, args.split_on, args.text_field,
                                      args.max_documents)
            print(f"wrote {model} and {bin_}")
        elif args.command == "pretokenize":
            meta = pretokenize(args.tokenizer, args.input, args.out, args.val_fraction, args.workers,
                               args.split_on, args.text_field, args.dtype, args.shard_tokens)
            print(f"wrote {args.out}: {meta['n_train_tokens']} train tokens in {len(meta['train_shards'])} shard(s), "
                  f"{meta['n_val_tokens']} val tokens, vocab {meta['vocab_size']} ({meta['dtype']})")
        else:
            print(export_tokenizer(args.model, args.out))
    except BabyLlamaError as e:
        print(f"babyllama data: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
