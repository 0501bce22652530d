"""Speculative decoding: cheap guesses, verified k at a time in one batched forward, lossless.

A drafter proposes the next k tokens: a small model with the same vocabulary (`ModelDraft`,
greedy), or n-grams of the context itself (`LookupDraft`, prompt lookup). The target model then
runs the last token and the k guesses as one block of k + 1 rows, and each row's logits are
sampled in order with the plain sampler and its one RNG stream, exactly as plain decoding would
sample them: a guess is kept while it equals that sample, and the first sample that differs is
kept instead of the guess (so every round yields at least one token). The output is therefore the
plain decoding output, token for token, at any temperature and seed: the engine gives each row
the bits it gets alone, and the sampler sees the same logits in the same order. Rejected rows
leave stale cache entries past the last kept position, which the state forgets (State.truncate).

The draft length adapts: it grows by one after a round that kept every guess and shrinks by one
after a round that kept less than half of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from ..errors import GenerationError
from ..sampling import Sampler
from .loop import BOS

MAX_DRAFT = 8


@dataclass
class SpecStats:
    rounds: int = 0
    drafted: int = 0  # guesses proposed
    accepted: int = 0  # guesses that equalled the target's sample

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


class ModelDraft:
    """Guesses from a smaller model over the same vocabulary, from its own KV cache kept in step with
    the tokens actually produced. It samples its guesses with the target's sampler settings and a
    copy of the target's random state, so where the two models agree their samples agree too: a
    draft that is the target itself guesses every token, at any temperature. Without a sampler
    (a plain function) it guesses greedily."""

    def __init__(self, engine, target_config):
        if engine.config.vocab_size != target_config.vocab_size:
            raise GenerationError(f"the draft model's vocabulary has {engine.config.vocab_size} tokens, the "
                                  f"target's {target_config.vocab_size}: a draft must share the target's tokenizer")
        self.engine = engine
        self.state = engine.new_state()
        self.fed = []  # tokens in the draft's cache, position by position
        self._sampler = None

    def _coupled(self, sampler):
        """A sampler like the target's whose random state is a copy of the target's (None: greedy)."""
        if not isinstance(sampler, Sampler):
            return None
        if self._sampler is None or self._sampler.settings != sampler.settings:
            self._sampler = Sampler(sampler.vocab_size, sampler.temperature, sampler.topp, 1, sampler.topk,
                                    sampler.minp, sampler.repetition_penalty)
        self._sampler.rng_state[:] = sampler.rng_state
        return self._sampler

    def propose(self, context: list[int], k: int, sampler=None) -> list[int]:
        """Up to k guesses for what follows `context` (every token so far, BOS first)."""
        k = min(k, self.engine.config.seq_len - len(context))
        if k <= 0:
            return []
        same = 0  # the longest prefix of context the cache already holds (but one token to feed)
        while same < len(self.fed) and same < len(context) - 1 and self.fed[same] == context[same]:
            same += 1
        self.state.truncate(0, same)
        del self.fed[same:]
        logits = self.engine.forward(context[same:], same, self.state)
        self.fed += context[same:]
        coupled = self._coupled(sampler)
        guesses = []
        for _ in range(k):
            token = coupled(logits) if coupled is not None else int(np.argmax(logits))
            guesses.append(token)
            if len(guesses) == k or len(self.fed) >= self.engine.config.seq_len:
                break
            logits = self.engine.step(token, len(self.fed), self.state)
            self.fed.append(token)
        return guesses


class LookupDraft:
    """Prompt-lookup guesses: find the longest suffix of the context (up to `ngram` tokens) that
    occurred before, and propose what followed its latest earlier occurrence."""

    def __init__(self, ngram: int):
        if isinstance(ngram, bool) or not isinstance(ngram, int) or ngram < 1:
            raise GenerationError(f"--lookup needs an n-gram length >= 1, got {ngram!r}")
        self.ngram = ngram

    def propose(self, context: list[int], k: int, sampler=None) -> list[int]:
        for n in range(min(self.ngram, len(context) - 1), 0, -1):
            tail = context[-n:]
            for start in range(len(context) - n - 1, -1, -1):
                if context[start : start + n] == tail:
                    return context[start + n : start + n + k]
        return []


def speculative_ids(engine, state, prompt: Sequence[int], steps: int, sample, draft, stop_ids=(BOS,),
                    stats: SpecStats | None = None, k: int = 4) -> Iterator[int]:
    """generate_ids' tokens, produced by drafting and verifying (same arguments, plus the drafter).

    Yields exactly what generate_ids yields for the same engine, prompt, steps and sampler.
    """
    n = len(prompt)
    if n < 1:
        raise GenerationError("the prompt must contain at least the BOS token")
    if n > engine.config.seq_len:
        raise GenerationError(f"prompt is {n} tokens, longer than the model's context of {engine.config.seq_len}")
    stats = stats if stats is not None else SpecStats()
    if steps <= n - 1:
        yield from (int(t) for t in prompt[1 : steps + 1])
        return
    context = [int(t) for t in prompt]
    if n > 1:
        engine.forward(context[:-1], 0, state)  # the prompt but its last token, which opens round one
    yield from context[1:]
    pos = n - 1  # the position of the last token, not yet fed
    done = False
    while not done:
        guesses = draft.propose(context, min(k, steps - pos - 1), sample)
        rows = engine.forward([context[-1]] + guesses, pos, state, all_logits=True)  # one pass for all
        kept = compared = 0
        for i in range(len(guesses) + 1):
            token = sample(rows[i])  # the plain sampler on the plain logits, in order
            context.append(token)
            pos += 1
            yield token
            if i < len(guesses):
                compared += 1
                kept += token == guesses[i]
            done = token in stop_ids or pos >= steps
            if done or i == len(guesses) or token != guesses[i]:
                break
        state.truncate(0, pos)  # rows past the last kept token were guesses that lost
        stats.rounds += 1
        stats.drafted += compared  # guesses past the end of the run were never compared
        stats.accepted += kept
        if guesses and kept == len(guesses):
            k = min(k + 1, MAX_DRAFT)
        elif guesses and 2 * kept < len(guesses):
            k = max(k - 1, 1)
