"""One choice's text as its tokens arrive: stream decoding, stop strings, logprob entries.

Text comes from the tokenizer's StreamDecoder, so a UTF-8 character split over byte tokens appears
whole. A stop string never reaches the output, also when it is split across tokens: text that
could be the start of a stop string is held back until the next token shows whether it is one.
A sampled stop token (EOS in chat, BOS in plain generation) prints nothing and ends the choice.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TokenLogprob:
    """A generated token's log-probability entry: its text, bytes, logprob and top alternatives."""

    token: str
    bytes: list[int]
    logprob: float
    top: list[tuple[str, list[int], float]]


class ChoiceText:
    """Feed it a choice's generated tokens in order; it returns the text each one completes.

    finish_reason becomes "stop" (a stop token or a stop string) or "length" once the choice is
    over; tokens after that are not counted (they were sampled before the cancel took effect).
    """

    def __init__(self, tokenizer, prompt: list[int], stop: tuple[str, ...] = (), stop_ids=(), logprobs=False,
                 echo: bool = False):
        self.tokenizer = tokenizer
        self.decoder = tokenizer.stream()
        self.stop = stop
        self.stop_ids = tuple(stop_ids)
        self.logprobs = logprobs
        self.prev = prompt[0]
        self.echo_text = ""
        if echo:  # the prompt's text through the same decoder, as `babyllama run` prints it
            for t in prompt[1:]:
                self.echo_text += self.decoder.feed(self.prev, t)
                self.prev = t
        else:
            self.prev = prompt[-1]
        self.pending = ""  # text held back: it may be the start of a stop string
        self.tokens = 0  # generated tokens that count (usage.completion_tokens)
        self.finish_reason: str | None = None
        self.entries: list[TokenLogprob] = []  # logprob entries not yet handed out

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def feed(self, token: int, last: bool, logprob: float | None = None, top=None) -> str:
        """The text that `token` makes final. `last`: the scheduler ended the sequence with it (a
        stop token or the step limit)."""
        if self.done:
            return ""
        self.tokens += 1
        if token in self.stop_ids:
            return self._finish(self._scan(self.decoder.flush(), final=True), "stop")
        if self.logprobs and logprob is not None:
            self.entries.append(self._entry(token, logprob, top or []))
        text = self.decoder.feed(self.prev, token)
        self.prev = token
        if last:
            text += self.decoder.flush()
        out = self._scan(text, final=last)
        if last and not self.done:
            return self._finish(out, "length")
        return out

    def take_entries(self) -> list[TokenLogprob]:
        out, self.entries = self.entries, []
        return out

    def _finish(self, text: str, reason: str) -> str:
        if self.finish_reason is None:
            self.finish_reason = reason
        return text

    def _scan(self, text: str, final: bool) -> str:
        """Emit what is certain not to be (part of) a stop string; finish at a stop string."""
        buf = self.pending + text
        self.pending = ""
        if not self.stop or self.done:
            return buf
        cut = min((i for i in (buf.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.finish_reason = "stop"
            return buf[:cut]
        if final:
            return buf
        hold = 0  # the longest tail of buf that starts some stop string
        for s in self.stop:
            for k in range(min(len(s) - 1, len(buf)), hold, -1):
                if buf.endswith(s[:k]):
                    hold = k
                    break
        self.pending = buf[len(buf) - hold:] if hold else ""
        return buf[: len(buf) - hold]

    def _entry(self, token: int, logprob: float, top) -> TokenLogprob:
        piece = self.tokenizer.token_bytes(self.prev, token)
        alts = []
        for alt, lp in top:
            b = self.tokenizer.token_bytes(self.prev, alt)
            alts.append((b.decode("utf-8", "replace"), list(b), lp))
        return TokenLogprob(piece.decode("utf-8", "replace"), list(piece), logprob, alts)
