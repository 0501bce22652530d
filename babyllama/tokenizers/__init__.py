"""Vocabularies behind one interface (base.Tokenizer): tokenizer.bin (llama2c.py); chat templates
(chat.py). `load_tokenizer` picks the implementation from the file."""

from __future__ import annotations

from pathlib import Path

from .base import StreamDecoder, Tokenizer
from .llama2c import Llama2cTokenizer


def load_tokenizer(path, vocab_size: int) -> Tokenizer:
    """The tokenizer in `path`, which must hold exactly `vocab_size` tokens (the model's)."""
    return Llama2cTokenizer.load(Path(path), vocab_size)


__all__ = ["Tokenizer", "StreamDecoder", "Llama2cTokenizer", "load_tokenizer"]
