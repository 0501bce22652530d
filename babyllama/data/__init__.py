"""Training data: corpora in, token shards out, and the batches the trainer reads; the one import
for all of it.

  corpus.py   documents from .txt/.jsonl/.json files and folders; downloads (resumable, sha256-checked)
  vocab.py    sentencepiece BPE with llama2.c's settings -> tokN.model + tokN.bin
  shards.py   pretokenize: corpus -> DIR/train_000.bin ..., DIR/val.bin, DIR/meta.json;
              TokenWindows: random (x, y) windows over the shards, the batches the trainer reads

The `babyllama data` command line is babyllama/cli/data.py.
"""

from .corpus import (
    CORPUS_SUFFIXES, DATASETS, DEFAULT_TEXT_FIELDS, SPLIT_MODES, Dataset, download, iter_documents, sha256_file,
    split_lines,
)
from .shards import (
    DEFAULT_SHARD_TOKENS, META_FORMAT, TokenWindows, is_val_document, pretokenize, read_meta, token_dtype,
)
from .vocab import MIN_VOCAB, export_tokenizer, llama2c_pieces, load_sentencepiece, train_vocab

__all__ = [
    "CORPUS_SUFFIXES", "DATASETS", "DEFAULT_TEXT_FIELDS", "SPLIT_MODES", "Dataset", "download", "iter_documents",
    "sha256_file", "split_lines", "DEFAULT_SHARD_TOKENS", "META_FORMAT", "TokenWindows", "is_val_document",
    "pretokenize", "read_meta", "token_dtype", "MIN_VOCAB", "export_tokenizer", "llama2c_pieces",
    "load_sentencepiece", "train_vocab",
]
