"""run.c's generate loop as generators: forced prompt tokens, then samples, until the step limit
or a stop token."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from ..errors import GenerationError

BOS = 1  # llama2.c's begin-of-sequence id: its generate loop stops when it is sampled


def resolve_steps(steps: int, seq_len: int) -> int:
    """run.c's rule: steps counts positions including the prompt; 0 or too many means seq_len."""
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 0:
        raise GenerationError(f"steps must be a non-negative integer (0 = the model's context), got {steps!r}")
    return seq_len if steps == 0 or steps > seq_len else int(steps)


def generate_ids(engine, state, prompt: Sequence[int], steps: int, sample, stop_ids=(BOS,)) -> Iterator[int]:
    """Yield the token that follows each position, exactly as run.c's generate loop does.

    `prompt` starts with BOS; its tokens are forced (yielded, not sampled), then `sample(logits)`
    picks each next token until `steps` positions are used or a stop token is sampled (which is
    yielded last, as run.c's fixtures record it). The prompt is prefilled in one engine call: the
    cache ends up the same as run.c's token-by-token loop leaves it.
    """
    n = len(prompt)
    if n < 1:
        raise GenerationError("the prompt must contain at least the BOS token")
    if n > engine.config.seq_len:
        raise GenerationError(f"prompt is {n} tokens, longer than the model's context of {engine.config.seq_len}")
    if steps <= n - 1:  # the step limit falls inside the prompt: run.c prints forced tokens only
        yield from (int(t) for t in prompt[1 : steps + 1])
        return
    logits = engine.forward(prompt, 0, state)  # logits at position n-1
    yield from (int(t) for t in prompt[1:])
    pos = n - 1  # the position whose logits we hold
    while True:
        token = sample(logits)
        yield token
        pos += 1
        if token in stop_ids or pos >= steps:
            return
        logits = engine.step(token, pos, state)


@dataclass
class Piece:
    """One generated token: its id and the text it completes (may be empty mid-UTF-8)."""

    id: int
    text: str
    forced: bool  # a prompt token rather than a sampled one


def text_of(tokenizer, tokens: Sequence[int], stopped: bool) -> str:
    """The text `pieces` yields for a finished run: tokens BOS first, `stopped` when the last one is
    a sampled stop token (which prints nothing; what is buffered is flushed)."""
    decoder = tokenizer.stream()
    last = len(tokens) - 1 if stopped else len(tokens)
    parts = [decoder.feed(tokens[i - 1], tokens[i]) for i in range(1, last)]
    parts.append(decoder.flush())
    return "".join(parts)


def pieces(engine, tokenizer, prompt: Sequence[int], steps: int, sample, state=None, ids=None) -> Iterator[Piece]:
    """Every token after the first (forced prompt tokens, then samples) with the text it prints.

    A sampled stop token ends the stream with whatever text is still buffered (run.c prints
    nothing for it); a last Piece with id -1 carries text left in the decoder at the step limit.
    `ids`: the token stream to decode instead of generate_ids' (speculative decoding's, the same).
    """
    decoder = tokenizer.stream()
    stops = tokenizer.stop_ids
    prev = prompt[0]
    if ids is None:
        ids = generate_ids(engine, state if state is not None else engine.new_state(), prompt, steps, sample, stops)
    for i, token in enumerate(ids):
        forced = i < len(prompt) - 1
        if token in stops and not forced:
            yield Piece(token, decoder.flush(), False)
            return
        yield Piece(token, decoder.feed(prev, token), forced)
        prev = token
    tail = decoder.flush()
    if tail:
        yield Piece(-1, tail, False)
