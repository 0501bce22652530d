"""The tokenizer interface: what generation, chat and the server need from any vocabulary.

A Tokenizer encodes text to ids, decodes ids to text, streams text while tokens arrive (never
splitting a UTF-8 character), and names its special ids: bos_id, eos_ids (the tokens that end an
assistant's reply) and stop_ids (the tokens that end plain generation). tokenizer.bin implements
it (llama2c.py); other vocabularies plug in the same way, each defining only `token_bytes`.
"""

from __future__ import annotations

import codecs
from typing import Iterable


class Tokenizer:
    """Base class of every vocabulary. Subclasses set the attributes and implement encode and
    token_bytes; decode and stream come from token_bytes."""

    vocab_size: int
    bos_id: int | None = None
    eos_ids: tuple[int, ...] = ()  # end an assistant's reply (chat)
    stop_ids: tuple[int, ...] = ()  # end plain generation
    chat_template = None  # a tokenizers.chat.ChatTemplate, or None
    path = None  # the file it was loaded from, if any

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        raise NotImplementedError

    def token_bytes(self, prev_token: int, token: int) -> bytes:
        """The bytes `token` prints when it follows `prev_token` (empty for control tokens)."""
        raise NotImplementedError

    def token_text(self, token: int) -> str:
        """How `token` is written in text, for a special token such as "<|eot_id|>" (what a chat
        template renders); "" when the vocabulary has no such text."""
        return ""

    def check_id(self, token: int) -> None:
        from ..errors import TokenizerError

        if not 0 <= token < self.vocab_size:
            raise TokenizerError(f"token id {token} is out of range: expected 0..{self.vocab_size - 1}")

    def stream(self) -> "StreamDecoder":
        """A new StreamDecoder: text as tokens arrive one at a time."""
        return StreamDecoder(self.token_bytes)

    def decode(self, ids: Iterable[int], prev_token: int = -1) -> str:
        """The text of `ids` (following `prev_token`) as one string."""
        out = self.stream()
        parts, prev = [], prev_token
        for token in ids:
            token = int(token)
            self.check_id(token)
            parts.append(out.feed(prev, token))
            prev = token
        parts.append(out.flush())
        return "".join(parts)


class StreamDecoder:
    """Turns tokens into text as they are generated.

    feed(prev_token, token) returns the text that is complete so far: bytes that form one UTF-8
    character are held back until the character is whole (an emoji split over four byte tokens
    appears whole, on the fourth feed). Invalid UTF-8 becomes U+FFFD (the replacement character)
    rather than disappearing silently. flush() returns what is left (U+FFFD for an unfinished
    character) and resets the decoder.
    """

    def __init__(self, token_bytes):
        self._bytes = token_bytes
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")

    def feed(self, prev_token: int, token: int) -> str:
        """Text completed by printing `token` after `prev_token` (possibly empty)."""
        piece = self._bytes(prev_token, token)
        return self._utf8.decode(piece) if piece else ""

    def flush(self) -> str:
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return text
