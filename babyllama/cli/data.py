"""`babyllama data`: get a corpus, train a vocabulary, pretokenize (the work is babyllama.data's).

    babyllama data download tinystories --out data
    babyllama data train-vocab --vocab-size 512 --input stories.txt --out data/tok512
    babyllama data pretokenize --tokenizer data/tok512/tok512.model --input stories.txt --out data/tok
    babyllama data export-tokenizer data/tok512/tok512.model tokenizer.bin
"""

from __future__ import annotations

from ..data import (
    DATASETS, DEFAULT_SHARD_TOKENS, DEFAULT_TEXT_FIELDS, SPLIT_MODES, download, export_tokenizer, pretokenize,
    train_vocab,
)
from ..errors import DataError
from . import OneLineParser


def _parser() -> OneLineParser:
    p = OneLineParser(prog="babyllama data", description="Get a corpus, train a vocabulary, pretokenize.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=OneLineParser)

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
    v.add_argument("--vocab-size", type=int, required=True,
                   help="tokens in the vocabulary, the 3 special and 256 byte tokens included (llama2.c: 512 or 4096)")
    corpus_options(v)
    v.add_argument("--out", required=True, help="output folder (created if its parent exists)")
    v.add_argument("--max-documents", type=int, default=None,
                   help="train on the first N documents only (default: all)")

    t = sub.add_parser("pretokenize", help="corpus -> train/val token shards + meta.json")
    t.add_argument("--tokenizer", required=True, help="sentencepiece .model file")
    corpus_options(t)
    t.add_argument("--out", required=True, help="output folder (created if its parent exists)")
    t.add_argument("--val-fraction", type=float, default=0.01,
                   help="share of the documents held out for validation, in [0, 1) (default: 0.01)")
    t.add_argument("--workers", type=int, default=None,
                   help="tokenizer processes (default: all cores)")
    t.add_argument("--dtype", default="auto", choices=("auto", "uint16", "uint32"),
                   help="token id type in the shards (default: auto = uint16 when the vocabulary fits)")
    t.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS,
                   help=f"start a new training shard after this many tokens; 0: one train.bin "
                        f"(default: {DEFAULT_SHARD_TOKENS:,})")

    e = sub.add_parser("export-tokenizer", help="sentencepiece .model -> tokenizer.bin")
    e.add_argument("model", help="sentencepiece .model file")
    e.add_argument("out", help="tokenizer.bin to write")
    return p


def main(argv=None) -> int:
    """`babyllama data COMMAND ...`; raises BabyLlamaError on bad input."""
    args = _parser().parse_args(argv)
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
    return 0
