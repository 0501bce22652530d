"""SentencePiece vocabularies with their own special tokens: a sentencepiece .model, and the
`llama` vocabulary GGUF files embed (tokenizers/gguf.py builds it from the metadata).

Encoding is run.c's (tokenizers/llama2c.py): code points looked up, unknown ones as <0xNN> byte
tokens, then merges by score, highest first and leftmost on ties, which is sentencepiece's BPE
and what transformers' converted tokenizer.json does with the same pieces. On top of it:
- special tokens written in the text (<s>, </s>, <|im_end|>, ...: control, user-defined and
  unknown pieces) become their ids, the text between them is encoded piece by piece;
- the "dummy prefix" space goes before the text only when it starts the input and does not
  start with a space already (`prefix="first"`, what transformers' Metaspace pre-tokenizer does),
  or before every text segment, at the start and after each special token (`prefix=
  "after_special"`, as llama.cpp tokenizes GGUF files and sentencepiece each call);
- BOS is the file's and is added when the file says so (add_bos).
Decoding prints a piece's text with "▁" as a space, "<0xNN>" as the byte NN, nothing for control
tokens, and drops the dummy prefix's space from the first token after the start or a special
token, as sentencepiece's decoder does.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from ..errors import TokenizerError
from .base import Tokenizer
from .llama2c import Llama2cTokenizer

# GGUF's token types (llama.cpp's llama_token_type); a .model's are mapped onto them
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
PREFIXES = ("first", "after_special")


class SentencePieceTokenizer(Llama2cTokenizer):
    """Pieces (with "▁" for spaces), scores and token types, plus the file's special ids.

    Attributes as Llama2cTokenizer's, with bos_id, eos_ids, stop_ids (= eos_ids), add_bos,
    chat_template and vocab (the pieces as bytes with spaces, like tokenizer.bin's) from the file.
    """

    def __init__(self, pieces: list[str], scores, types, vocab_size: int, bos_id: int | None, eos_ids,
                 unk_id: int | None = None, add_bos: bool = True, prefix: str = "first", add_space_prefix: bool = True,
                 chat_template=None, path=None):
        n = len(pieces)
        if n > vocab_size:
            raise TokenizerError(f"{path or 'tokenizer'}: the vocabulary has {n} tokens, the model's embedding only "
                                 f"{vocab_size} rows")
        if prefix not in PREFIXES:
            raise TokenizerError(f"prefix must be one of {PREFIXES}, got {prefix!r}")
        types = list(types) + [UNUSED] * (vocab_size - n)
        pad = [f"<babyllama-unused-{i}>" for i in range(n, vocab_size)]
        texts = list(pieces) + pad
        super().__init__([t.replace("\u2581", " ").encode("utf-8") for t in texts],
                         np.concatenate([np.asarray(scores, np.float32), np.full(vocab_size - n, -1e30, np.float32)]),
                         path=path)
        self._texts, self._types = texts, types
        # only ordinary pieces take part in merges (sentencepiece never builds <s> or <0x41> from text)
        self._lookup = {}
        for i, (piece, kind) in enumerate(zip(self.vocab, types)):
            if kind in (NORMAL, USER_DEFINED):
                self._lookup.setdefault(piece, i)
        self.bos_id, self.eos_ids = bos_id, tuple(eos_ids)
        self.stop_ids = self.eos_ids
        self.unk_id, self.add_bos = unk_id, bool(add_bos) and bos_id is not None
        self.prefix, self.add_space_prefix = prefix, add_space_prefix
        self.chat_template = chat_template
        self._bytes_of = {}
        for i, (text, kind) in enumerate(zip(texts, types)):
            m = _BYTE_PIECE.fullmatch(text) if kind == BYTE else None
            if m:
                self._bytes_of[int(m.group(1), 16)] = i
        self._silent = {i for i, k in enumerate(types) if k in (CONTROL, UNUSED, UNKNOWN)}
        specials = sorted((t for t, k in zip(texts, types) if k in (CONTROL, USER_DEFINED, UNKNOWN) and t),
                          key=len, reverse=True)
        self._special_ids = {t: i for i, (t, k) in reversed(list(enumerate(zip(texts, types))))
                             if k in (CONTROL, USER_DEFINED, UNKNOWN)}
        self._split = re.compile("(" + "|".join(map(re.escape, specials)) + ")") if specials else None
        self._printed = []
        for i, (piece, kind) in enumerate(zip(self.vocab, types)):
            if i in self._silent:
                self._printed.append(b"")
            elif kind == BYTE and _BYTE_PIECE.fullmatch(texts[i]):
                self._printed.append(bytes([int(texts[i][3:5], 16)]))
            else:
                self._printed.append(piece)

    @classmethod
    def load(cls, path, vocab_size: int, settings: dict | None = None) -> "SentencePieceTokenizer":
        """A sentencepiece .model, with an HF folder's special tokens and chat template when
        `settings` (tokenizers.hf.folder_settings) are given; else the .model's own ids."""
        from ..fileio import regular_file_size

        path = Path(path)
        regular_file_size(path, TokenizerError, "sentencepiece model")
        try:
            import sentencepiece as spm
        except ImportError:
            raise TokenizerError("a sentencepiece .model needs sentencepiece: pip install 'babyllama[hf]'") from None
        try:
            sp = spm.SentencePieceProcessor(model_file=str(path))
        except Exception as e:  # RuntimeError / OSError from the C++ parser
            raise TokenizerError(f"{path}: not a sentencepiece model ({str(e)[:200]})") from None
        n = sp.get_piece_size()
        pieces = [sp.id_to_piece(i) for i in range(n)]
        scores = [sp.get_score(i) for i in range(n)]
        types = [CONTROL if sp.is_control(i) else UNKNOWN if sp.is_unknown(i) else BYTE if sp.is_byte(i)
                 else UNUSED if sp.is_unused(i) else NORMAL for i in range(n)]
        bos = sp.bos_id() if sp.bos_id() >= 0 else None
        eos = [sp.eos_id()] if sp.eos_id() >= 0 else []
        add_bos, template = True, None
        if settings is not None:
            from .hf import special_ids, template_of

            ids = {p: i for i, p in reversed(list(enumerate(pieces)))}
            bos_s, eos_s = special_ids(settings, ids.get, vocab_size)
            bos, eos = (bos_s if bos_s is not None else bos), (list(eos_s) or eos)
            add_bos = settings["add_bos"] if settings.get("add_bos") is not None else True
            template = template_of(settings)
        first = sp.encode("a", out_type=str)
        prefix_on = bool(first) and first[0].startswith("\u2581")
        return cls(pieces, scores, types, vocab_size, bos, eos, sp.unk_id() if sp.unk_id() >= 0 else None,
                   add_bos=add_bos, prefix="first", add_space_prefix=prefix_on, chat_template=template, path=path)

    # ------------------------------------------------------------------ encoding

    def _byte_id(self, b: int) -> int:
        tid = self._bytes_of.get(b)
        if tid is not None:
            return tid
        if self.unk_id is not None:
            return self.unk_id
        raise TokenizerError(f"cannot encode byte 0x{b:02X}: the vocabulary has no byte tokens and no <unk>")

    def _segment(self, data: bytes, prefix: bool) -> list[int]:
        ids = [self._dummy_prefix_id()] if prefix else []
        return self._merge(ids + self._code_point_ids(data))

    def _dummy_prefix_id(self) -> int:
        space = self._lookup.get(b" ")
        return space if space is not None else self._byte_id(0x20)

    def encode(self, text: str | bytes, bos: bool = True, eos: bool = False) -> list[int]:
        """Ids of `text`: BOS first when `bos` and the file adds one, special tokens in the text as
        their ids, the dummy prefix as `prefix` says."""
        from .llama2c import utf8_bytes

        if isinstance(text, bytes):
            text = text.decode("utf-8", "surrogateescape")
        ids = [self.bos_id] if bos and self.add_bos else []
        parts = self._split.split(text) if self._split is not None else [text]
        for i, part in enumerate(parts):
            if i % 2:  # a special token's text
                ids.append(self._special_ids[part])
            elif part:
                part = part.replace("\u2581", " ")  # both libraries read a written "▁" as the space it stands for
                if self.prefix == "first":  # transformers: text at the very start, not already spaced
                    prefix = i == 0 and not part.startswith(" ")
                else:  # llama.cpp: at the start and after every special token
                    prefix = True
                ids += self._segment(utf8_bytes(part), self.add_space_prefix and prefix)
        if eos and self.eos_ids:
            ids.append(self.eos_ids[0])
        return ids

    # ------------------------------------------------------------------ decoding

    def token_bytes(self, prev_token: int, token: int) -> bytes:
        piece = self._printed[token]
        if self.add_space_prefix and piece[:1] == b" " and (prev_token < 0 or prev_token in self._silent):
            return piece[1:]
        return piece

    def decode(self, ids, prev_token: int = -1) -> str:
        return Tokenizer.decode(self, ids, prev_token)

    def decode_piece(self, prev_token: int, token: int) -> bytes:
        self.check_id(token)
        return self.token_bytes(prev_token, token)

    def token_text(self, token: int) -> str:
        return self._texts[token] if 0 <= token < self.vocab_size else ""
