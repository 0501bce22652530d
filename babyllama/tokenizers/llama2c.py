"""tokenizer.bin's vocabulary: llama2.c's BPE tokenizer (encode by merge score, byte fallback).

The file (formats/llama2c.py reads and writes it) stores no token count: that is the model's
vocab_size, so a tokenizer can only be loaded for a given model. Pieces are stored with
sentencepiece's "▁" already turned into a space; ids 0/1/2 are <unk>, <s> (BOS), </s> (EOS) and
ids 3..258 are the byte-fallback tokens, written as the text "<0xNN>".

Encoding reproduces run.c's encode() token for token; decoding reproduces run.c's decode() +
safe_printf(), except that byte tokens are assembled into UTF-8 text instead of being dropped
(the one place babyllama deliberately prints more than run.c; see DESIGN.md).
"""

from __future__ import annotations

import heapq
import re
from pathlib import Path

import numpy as np

from ..errors import TokenizerError
from ..formats.llama2c import read_tokenizer_bin, write_tokenizer_bin
from .base import Tokenizer
from .chat import LLAMA2

BOS_ID = 1
EOS_ID = 2
BYTE_OFFSET = 3  # byte b is token b + 3 (after <unk>, <s>, </s>)

# run.c's merge loop starts from best_score = -1e10, so a pair whose merged token scores at or
# below that never merges. -1e10 is exactly representable as a float32.
_NO_MERGE_SCORE = -1e10

# run.c recognises byte tokens with sscanf(piece, "<0x%02hhX>"): "<0x" then one or two hex
# digits; whatever follows is not checked.
_BYTE_PIECE = re.compile(rb"<0x([0-9A-Fa-f]{1,2})")


def _printable(piece: bytes) -> bytes:
    """What run.c's safe_printf() writes for a decoded piece (before UTF-8 assembly).

    printf("%s") stops at a NUL byte, and a piece that is one single byte is skipped unless it is
    printable or whitespace in the C locale. Single bytes >= 0x80 are kept here: they are parts
    of UTF-8 characters, which babyllama assembles instead of dropping.
    """
    piece = piece.split(b"\0", 1)[0]
    if len(piece) == 1:
        b = piece[0]
        if b < 0x80 and not (0x20 <= b <= 0x7E or 0x09 <= b <= 0x0D):
            return b""
    return piece


def utf8_bytes(text: str) -> bytes:
    """text as UTF-8, with the bytes Python could not decode (surrogateescape) restored."""
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError as e:
        raise TokenizerError(f"cannot encode the text: {e.reason} at character {e.start}") from None


class Llama2cTokenizer(Tokenizer):
    """A llama2.c vocabulary: pieces (bytes), their merge scores, and encode/decode.

    Attributes: vocab (list of bytes), scores (float32 array), vocab_size, max_token_length,
    bos_id (1), eos_ids ((2,): ends a chat reply), stop_ids ((1,): run.c's generate loop stops
    when BOS is sampled), chat_template (Llama 2's, as run.c renders it), path.
    """

    bos_id = BOS_ID
    eos_ids = (EOS_ID,)
    stop_ids = (BOS_ID,)
    chat_template = LLAMA2

    def __init__(self, vocab: list[bytes], scores, max_token_length: int | None = None, path=None):
        """Build a tokenizer from its pieces and scores (load reads them from a file)."""
        if len(vocab) != len(scores):
            raise TokenizerError(f"expected one score per token, got {len(vocab)} tokens and {len(scores)} scores")
        self.vocab = [bytes(p) for p in vocab]
        self.scores = np.asarray(scores, dtype=np.float32)
        self.vocab_size = len(self.vocab)
        longest = max((len(p) for p in self.vocab), default=0)
        self.max_token_length = longest if max_token_length is None else int(max_token_length)
        self.path = path
        # piece -> id. run.c finds ids by bsearch in a qsorted copy, so for a piece listed twice
        # it returns either id; real vocabularies have no duplicates and we keep the lowest id.
        self._lookup: dict[bytes, int] = {}
        for i, piece in enumerate(self.vocab):
            self._lookup.setdefault(piece, i)
        self._score_list = self.scores.tolist()  # Python floats (exact float32 values): fast to compare
        # run.c's decode(): "<0xNN>" pieces stand for the raw byte NN.
        self._decoded = list(self.vocab)
        for i, piece in enumerate(self.vocab):
            if piece.startswith(b"<0x"):
                m = _BYTE_PIECE.match(piece)
                if m:
                    self._decoded[i] = bytes([int(m.group(1), 16)])
        self._stream_tables: tuple[list[bytes], list[bytes]] | None = None

    # ------------------------------------------------------------------ loading / saving

    @classmethod
    def load(cls, path, vocab_size: int) -> "Llama2cTokenizer":
        """Read a llama2.c tokenizer.bin holding exactly `vocab_size` tokens (the model's vocab_size).

        Raises TokenizerError when the file is missing, malformed, or holds a different number of
        tokens than the model expects (the message names both counts).
        """
        pieces, scores, max_len = read_tokenizer_bin(path, vocab_size)
        return cls(pieces, scores, max_len, path=Path(path))

    def save(self, path, inputs=()) -> None:
        """Write this vocabulary as a llama2.c tokenizer.bin (atomically)."""
        write_tokenizer_bin(path, self.vocab, self.scores, self.max_token_length, inputs)

    # ------------------------------------------------------------------ encoding

    def encode(self, text: str | bytes, bos: bool = True, eos: bool = False) -> list[int]:
        """Token ids of `text`, exactly as llama2.c's run.c encode() produces them.

        BOS (if `bos`), then for non-empty text a "dummy prefix" space token, then every UTF-8
        code point as its own token (or, when it is not in the vocabulary, one byte token per
        byte), then greedy merging: repeatedly replace the adjacent pair whose concatenation is
        the highest-scoring vocabulary piece (leftmost on ties) until no pair merges.
        `text` may also be bytes (not necessarily valid UTF-8), split the same way run.c does; so
        may a str holding undecodable bytes as lone surrogates (how Python passes on a command
        line or file that is not UTF-8): those are the original bytes again.
        """
        data = utf8_bytes(text) if isinstance(text, str) else bytes(text)
        ids = [BOS_ID] if bos else []
        if data:
            ids.append(self._dummy_prefix_id())
            ids.extend(self._code_point_ids(data))
            ids = self._merge(ids)  # run.c merges over the whole list, BOS included
        if eos:
            ids.append(EOS_ID)
        return ids

    def _dummy_prefix_id(self) -> int:
        space = self._lookup.get(b" ")
        # run.c would emit -1 (and crash later); the byte token of " " is the honest fallback.
        return space if space is not None else self._byte_id(0x20)

    def _byte_id(self, b: int) -> int:
        if b + BYTE_OFFSET >= self.vocab_size:
            raise TokenizerError(
                f"cannot encode byte 0x{b:02X}: byte fallback needs ids 3..258, the vocabulary has {self.vocab_size} tokens"
            )
        return b + BYTE_OFFSET

    def _code_point_ids(self, data: bytes) -> list[int]:
        """Split bytes into code points like run.c (a lead byte plus up to 3 continuation bytes)."""
        ids = []
        lookup = self._lookup
        n = len(data)
        start = 0
        for i in range(n):
            if data[i] & 0xC0 != 0x80:
                start = i  # a non-continuation byte starts a new code point
            nxt = data[i + 1] if i + 1 < n else 0
            if nxt & 0xC0 == 0x80 and i - start + 1 < 4:
                continue  # the next byte continues this code point
            cp = data[start : i + 1]
            tid = lookup.get(cp)
            if tid is not None:
                ids.append(tid)
            else:
                ids.extend(self._byte_id(b) for b in cp)
            start = i + 1  # a stray continuation byte after this starts its own group
        return ids

    def _merge(self, ids: list[int]) -> list[int]:
        """run.c's merge loop, with a heap instead of a rescan per merge (O(n log n), same result).

        run.c picks the pair with the strictly highest score, leftmost among equals. Here every
        mergeable adjacent pair sits in a heap keyed (-score, position of its left token); the
        linked list keeps the original positions in order, so the smallest position is the
        leftmost. Entries made stale by an earlier merge are recognised by version counters.
        """
        n = len(ids)
        if n < 2:
            return ids
        vocab, lookup, scores = self.vocab, self._lookup, self._score_list
        tok = list(ids)
        nxt = list(range(1, n + 1))
        nxt[-1] = -1
        prev = list(range(-1, n - 1))
        version = [0] * n  # bumped whenever a position changes token or is removed
        heap = []

        def candidate(i: int, j: int):
            merged = lookup.get(vocab[tok[i]] + vocab[tok[j]])
            if merged is not None:
                score = scores[merged]
                if score > _NO_MERGE_SCORE:
                    return (-score, i, version[i], j, version[j], merged)
            return None

        for i in range(n - 1):
            c = candidate(i, i + 1)
            if c is not None:
                heap.append(c)
        heapq.heapify(heap)

        while heap:
            _, i, vi, j, vj, merged = heapq.heappop(heap)
            if version[i] != vi or version[j] != vj:
                continue  # one of the two tokens changed since this pair was queued
            tok[i] = merged
            version[i] += 1
            version[j] += 1  # j is gone
            k = nxt[j]
            nxt[i] = k
            if k != -1:
                prev[k] = i
                c = candidate(i, k)
                if c is not None:
                    heapq.heappush(heap, c)
            if prev[i] != -1:
                c = candidate(prev[i], i)
                if c is not None:
                    heapq.heappush(heap, c)

        out = []
        i = 0  # position 0 always survives: a merge keeps its left position
        while i != -1:
            out.append(tok[i])
            i = nxt[i]
        return out

    # ------------------------------------------------------------------ decoding

    def decode_piece(self, prev_token: int, token: int) -> bytes:
        """The bytes run.c's decode() gives for `token` following `prev_token`.

        After BOS a leading space of the piece is dropped (sentencepiece's dummy prefix), and a
        byte token "<0xNN>" is the single raw byte NN.
        """
        self.check_id(token)
        piece = self.vocab[token]
        if prev_token == BOS_ID and piece[:1] == b" ":
            piece = piece[1:]
        if piece.startswith(b"<0x"):
            m = _BYTE_PIECE.match(piece)
            if m:
                piece = bytes([int(m.group(1), 16)])
        return piece

    def _tables(self) -> tuple[list[bytes], list[bytes]]:
        """Per-token printable bytes (plain, and after BOS), built once and shared by decoders.
        BOS and EOS print nothing (control tokens), so decode(encode(text)) == text."""
        if self._stream_tables is None:
            plain = [_printable(p) for p in self._decoded]
            after_bos = list(plain)
            for i, piece in enumerate(self.vocab):
                if piece[:1] == b" ":
                    after_bos[i] = _printable(self.decode_piece(BOS_ID, i))
            self._stream_tables = (plain, after_bos)
        return self._stream_tables

    def token_bytes(self, prev_token: int, token: int) -> bytes:
        """What run.c's decode() + safe_printf() print for `token` after `prev_token`, except that
        single bytes >= 0x80 are kept (the stream decoder assembles them into UTF-8)."""
        plain, after_bos = self._tables()
        return after_bos[token] if prev_token == BOS_ID else plain[token]

    def decode(self, ids, prev_token: int = -1) -> str:
        """The text run.c would print for `ids` (after `prev_token`), as one string.

        BOS and EOS in `ids` print nothing themselves, but BOS still makes the next piece drop its
        leading space, so decode(encode(text)) == text.
        """
        ids = [int(t) for t in ids]
        for t in ids:
            self.check_id(t)
        prev, out, parts = prev_token, self.stream(), []
        for token in ids:
            if token not in (BOS_ID, EOS_ID):
                parts.append(out.feed(prev, token))
            prev = token
        parts.append(out.flush())
        return "".join(parts)
