"""Vocabularies behind one interface (base.Tokenizer): tokenizer.bin (llama2c.py), Hugging Face
tokenizer.json (hf.py), sentencepiece .model (spm.py), a GGUF file's embedded vocabulary
(gguf.py), GPT-2's vocab.json + merges.txt and llm.c's gpt2_tokenizer.bin (gpt2.py); chat
templates (chat.py). `load_tokenizer` picks the implementation from the file."""

from __future__ import annotations

from pathlib import Path

from .base import StreamDecoder, Tokenizer
from .llama2c import Llama2cTokenizer


def load_tokenizer(path, vocab_size: int) -> Tokenizer:
    """The tokenizer in `path`, for a model of `vocab_size` tokens: an HF model folder or its
    tokenizer.json, GPT-2's vocab.json (merges.txt beside it), a sentencepiece .model, a GGUF
    file's vocabulary, llm.c's gpt2_tokenizer.bin, else a tokenizer.bin (which must hold exactly
    vocab_size tokens)."""
    path = Path(path)
    if path.name == "vocab.json" or (path.suffix == ".json" and (path.parent / "merges.txt").is_file()
                                     and path.name != "tokenizer.json"):
        from .gpt2 import load_bpe

        return load_bpe(path, vocab_size)
    if path.is_dir():
        from .hf import load_folder_tokenizer

        return load_folder_tokenizer(path, vocab_size)
    if path.suffix == ".json":
        from .hf import HFTokenizer

        return HFTokenizer.from_file(path, vocab_size)
    if path.suffix == ".model":
        from .spm import SentencePieceTokenizer

        return SentencePieceTokenizer.load(path, vocab_size)
    if _is_gguf(path):
        from ..errors import CheckpointError, TokenizerError
        from ..formats.gguf import read_header
        from .gguf import gguf_tokenizer

        try:
            header, _ = read_header(path)
        except CheckpointError as e:
            raise TokenizerError(str(e)) from None
        tok = gguf_tokenizer(header.metadata, vocab_size, path)
        if tok is None:
            raise TokenizerError(f"{path}: the GGUF file holds no vocabulary (no tokenizer.ggml.model)")
        return tok
    from ..formats.llmc import magic_of

    if magic_of(path) == "tokenizer":
        from .gpt2 import LlmcTokenizer

        return LlmcTokenizer.load(path, vocab_size)
    return Llama2cTokenizer.load(path, vocab_size)


def _is_gguf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


__all__ = ["Tokenizer", "StreamDecoder", "Llama2cTokenizer", "load_tokenizer"]
