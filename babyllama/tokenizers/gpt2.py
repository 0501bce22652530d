"""GPT-2's vocabularies: byte-level BPE from vocab.json + merges.txt (through the `tokenizers`
library, as transformers' GPT2TokenizerFast builds it), and llm.c's gpt2_tokenizer.bin, which
holds each token's bytes but no merges, so it decodes and cannot encode.

Both llm.c and Hugging Face's GPT-2 have one special token, <|endoftext|> (eot), and start
generation from it: here it is BOS (every prompt starts with it, an empty prompt is just eot),
EOS and the stop token. A tokenizer.json of a GPT-2 folder goes through tokenizers/hf.py as any
other; `gpt2_conventions` gives it the same eot-first rule once the model is known to be GPT-2.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import TokenizerError
from .base import Tokenizer

EOT = "<|endoftext|>"


class LlmcTokenizer(Tokenizer):
    """llm.c's gpt2_tokenizer.bin: decode only (llmc/tokenizer.h has no encoder either)."""

    def __init__(self, pieces: list[bytes], eot: int, path=None):
        self.vocab_size, self.pieces, self.path = len(pieces), pieces, path
        self.bos_id, self.eos_ids, self.stop_ids = eot, (eot,), (eot,)
        self.vocab = [p.decode("utf-8", "replace") for p in pieces]  # for comparing vocabularies (drafts)

    @classmethod
    def load(cls, path, vocab_size: int | None = None) -> "LlmcTokenizer":
        from ..formats.llmc import read_llmc_tokenizer

        pieces, eot = read_llmc_tokenizer(path)
        if vocab_size is not None and len(pieces) != vocab_size:
            raise TokenizerError(f"{path}: expected {vocab_size} tokens for this model, the llm.c tokenizer holds "
                                 f"{len(pieces)}")
        return cls(pieces, eot, Path(path))

    def encode(self, text, bos: bool = True, eos: bool = False) -> list[int]:
        if text:
            raise TokenizerError(f"{self.path or 'gpt2_tokenizer.bin'} (llm.c's tokenizer) can only decode: it holds no "
                                 "BPE merges; to encode a prompt pass -z with the model's tokenizer.json or vocab.json "
                                 "(merges.txt beside it), or run without a prompt (generation starts from "
                                 "<|endoftext|>)")
        return ([self.bos_id] if bos else []) + ([self.bos_id] if eos else [])

    def token_bytes(self, prev_token: int, token: int) -> bytes:
        return b"" if token == self.bos_id else self.pieces[token]  # <|endoftext|> prints nothing (as HF's skip)

    def token_text(self, token: int) -> str:
        return self.vocab[token] if 0 <= token < self.vocab_size else ""


def bpe_json(vocab_path, merges_path) -> str:
    """tokenizer.json text of a GPT-2 byte-level BPE from vocab.json + merges.txt: what
    transformers' GPT2Converter builds (no prefix space, ByteLevel decoder, <|endoftext|> special)."""
    from .hf import _library

    lib = _library()
    vocab_path, merges_path = Path(vocab_path), Path(merges_path)
    for p in (vocab_path, merges_path):
        if not p.is_file():
            raise TokenizerError(f"{p}: no such file (a GPT-2 BPE tokenizer needs vocab.json and merges.txt)")
    try:
        vocab = json.loads(vocab_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"{vocab_path}: cannot read it as JSON ({e})") from None
    if not isinstance(vocab, dict) or not all(isinstance(v, int) for v in vocab.values()):
        raise TokenizerError(f"{vocab_path}: expected a JSON object of token -> id")
    try:
        lines = merges_path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{merges_path}: cannot read it ({e})") from None
    merges = []
    for n, line in enumerate(lines, 1):
        if not line or (n == 1 and line.startswith("#version")):
            continue
        parts = line.split(" ")
        if len(parts) != 2:
            raise TokenizerError(f"{merges_path}, line {n}: expected two tokens separated by a space, found {line[:40]!r}")
        merges.append((parts[0], parts[1]))
    try:
        tk = lib.Tokenizer(lib.models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
        tk.pre_tokenizer = lib.pre_tokenizers.ByteLevel(add_prefix_space=False)
        tk.decoder = lib.decoders.ByteLevel()
        tk.post_processor = lib.processors.ByteLevel(trim_offsets=False)
        if EOT in vocab:
            tk.add_special_tokens([lib.AddedToken(EOT, special=True, normalized=False)])
        return tk.to_str()
    except BaseException as e:
        if isinstance(e, (KeyboardInterrupt, SystemExit, MemoryError)):
            raise
        raise TokenizerError(f"{vocab_path}: the tokenizers library cannot build a BPE from it ({str(e)[:200]})") \
            from None


def gpt2_settings(settings: dict) -> dict:
    """Folder settings with GPT-2's conventions where the folder says nothing: <|endoftext|> as
    BOS and EOS, and BOS first in every prompt (llm.c and HF GPT-2 start generating from it)."""
    out = dict(settings)
    out["bos_token"] = out.get("bos_token") or EOT
    out["eos_token"] = out.get("eos_token") or EOT
    out["add_bos"] = True
    return out


def load_bpe(vocab_path, vocab_size: int, settings: dict | None = None):
    """An HFTokenizer over vocab.json + merges.txt (merges.txt beside vocab.json)."""
    from .hf import HFTokenizer, folder_settings

    vocab_path = Path(vocab_path)
    folder = vocab_path.parent
    text = bpe_json(vocab_path, folder / "merges.txt")
    settings = gpt2_settings(folder_settings(folder) if settings is None else settings)
    return HFTokenizer.from_json(text, vocab_size, settings, vocab_path)


def gpt2_conventions(tokenizer):
    """Make a GPT-2 model's tokenizer start prompts with <|endoftext|> and stop at it, whatever its
    files said (HF GPT-2 folders add no BOS, which leaves an empty prompt without a first token)."""
    if isinstance(tokenizer, LlmcTokenizer) or not hasattr(tokenizer, "add_bos"):
        return tokenizer
    if tokenizer.bos_id is None:
        eot = tokenizer._tk.token_to_id(EOT) if hasattr(tokenizer, "_tk") else None
        if eot is None:
            return tokenizer
        tokenizer.bos_id = eot
    tokenizer.add_bos = True
    if not tokenizer.eos_ids:
        tokenizer.eos_ids = tokenizer.stop_ids = (tokenizer.bos_id,)
    return tokenizer


def llmc_pieces(tokenizer) -> tuple[list[bytes], int]:
    """(every token's bytes, eot id) of a GPT-2 tokenizer, as gpt2_tokenizer.bin stores them:
    special tokens as their text (tiktoken's decode_bytes writes <|endoftext|> so)."""
    eot = tokenizer.bos_id if tokenizer.bos_id is not None else (tokenizer.eos_ids or (None,))[0]
    if eot is None:
        raise TokenizerError("an llm.c tokenizer needs an <|endoftext|> token; this tokenizer has no BOS or EOS")
    pieces = []
    for i in range(tokenizer.vocab_size):
        b = tokenizer.token_bytes(-1, i) or tokenizer.token_text(i).encode("utf-8")
        if not b:
            raise TokenizerError(f"token {i} has no bytes; llm.c's tokenizer file needs 1..255 per token")
        pieces.append(b)
    return pieces, eot
