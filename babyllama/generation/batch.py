"""Many sequences at once: a continuous-batching scheduler over one engine and one paged KV cache.

    sched = Scheduler(engine, max_sequences=32)
    a = sched.add(prompt_ids, steps=256, sampling=Sampling(temperature=0.8, seed=42))
    while sched.busy:
        for event in sched.step():             # one forward call for every live sequence
            print(event.seq.id, event.token)
    sched.cancel(a)                            # any time; the others are not affected
    sched.add(ids, 64, sampling, processor=LogitsProcessor(...), logprobs=5)  # OpenAI's extras, per sequence

Each step is one engine call over a block of token rows: one row per sequence that is decoding,
plus chunks of newcomers' prompts (chunked prefill) up to a budget of rows per step. Sequences join
when a slot and their pages are free and leave when they finish or are cancelled, between steps.
Every sequence has its own slot, positions, sampler and seed, and the engine gives each row the bits
it gets alone, so a sequence's tokens are exactly what `generate_ids` (and `babyllama run`) gives it
alone, whatever else runs, at any temperature.

A sequence may also carry a `processor` (called on its logits row and its generated tokens before
sampling: the server's logit_bias and penalties) and ask for `logprobs` (its events then carry the
chosen token's log-probability under the processed logits, and the top alternatives). Without
them nothing extra runs, and its tokens are still exactly `babyllama run`'s.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from ..errors import GenerationError
from ..sampling import Sampler, log_softmax, top_logprobs
from .loop import BOS, resolve_steps


@dataclass(frozen=True)
class Sampling:
    """How a sequence picks its tokens (sampling.Sampler's settings); seed None = from the clock."""

    temperature: float = 1.0
    topp: float = 0.9
    seed: int | None = None
    topk: int = 0
    minp: float = 0.0

    def sampler(self, vocab_size: int) -> Sampler:
        return Sampler(vocab_size, temperature=self.temperature, topp=self.topp, seed=self.seed, topk=self.topk,
                       minp=self.minp)


@dataclass(eq=False)
class Sequence:
    """One request: its prompt, what it has generated, and where it is."""

    id: int
    prompt: list[int]
    steps: int  # positions, prompt included (run.c's -n)
    sampler: Sampler
    stop_ids: tuple
    processor: object = None  # called as processor(logits_row, tokens) before sampling, or None
    logprobs: int | None = None  # None: no logprobs; k >= 0: the chosen token's and the top k's
    tokens: list[int] = field(default_factory=list)  # sampled tokens (after the prompt)
    slot: int = -1
    prefilled: int = 0  # prompt tokens in the cache
    status: str = "queued"  # queued, prefill, decode, done
    finish_reason: str | None = None  # stop, length, cancelled

    @property
    def done(self) -> bool:
        return self.status == "done"

    @property
    def all_tokens(self) -> list[int]:
        """BOS first, then every token after it, exactly like `babyllama run --json`'s tokens."""
        return self.prompt[: self.steps + 1] + self.tokens


@dataclass
class Event:
    """A token a sequence produced in a step (forced tokens are not events: they are its prompt)."""

    seq: Sequence
    token: int
    finished: bool
    logprob: float | None = None  # with Sequence.logprobs: log p(token) under the processed logits
    top_logprobs: list | None = None  # with Sequence.logprobs = k: the k likeliest (id, logprob), best first


class Scheduler:
    """Continuous batching over one engine. add() queues a sequence, step() advances every live one,
    cancel() drops one; `max_sequences` slots share a pool of KV pages."""

    def __init__(self, engine, max_sequences: int = 32, max_rows: int = 256, n_pages: int | None = None,
                 max_queue: int | None = None):
        if max_sequences < 1 or max_rows < 1:
            raise GenerationError(f"max_sequences and max_rows must be >= 1, got {max_sequences}, {max_rows}")
        self.engine = engine
        self.state = engine.new_state(n_slots=max_sequences, n_pages=n_pages, fixed=False)
        self.max_rows = max_rows  # token rows per step: decode rows first, then prompt chunks
        self.max_queue = max_queue
        self.free_slots = list(range(max_sequences - 1, -1, -1))
        self.queue: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._ids = itertools.count()
        self.steps_run = 0
        self.last_rows = 0  # rows in the last step (batch size, for metrics)

    # ---------------------------------------------------------------------------- requests

    def add(self, prompt, steps: int = 256, sampling: Sampling | Sampler = Sampling(), stop_ids=(BOS,),
            processor=None, logprobs: int | None = None) -> Sequence:
        """Queue a sequence. prompt: token ids, BOS first; steps: positions, prompt included (0 = the
        context). It starts at the next step that has a slot and its pages free. processor and
        logprobs: see the module docstring (both off by default)."""
        cfg = self.engine.config
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise GenerationError("a prompt must hold at least the BOS token")
        if len(prompt) > cfg.seq_len:
            raise GenerationError(f"prompt is {len(prompt)} tokens, longer than the model's context of {cfg.seq_len}")
        if min(prompt) < 0 or max(prompt) >= cfg.vocab_size:
            raise GenerationError(f"token ids must be in [0, {cfg.vocab_size}), found {min(prompt)}..{max(prompt)}")
        if self.max_queue is not None and len(self.queue) >= self.max_queue:
            raise GenerationError(f"the queue is full ({self.max_queue} sequences waiting)")
        sampler = sampling if isinstance(sampling, Sampler) else sampling.sampler(cfg.vocab_size)
        if logprobs is not None and (isinstance(logprobs, bool) or not isinstance(logprobs, int) or logprobs < 0):
            raise GenerationError(f"logprobs must be None or an integer >= 0, got {logprobs!r}")
        seq = Sequence(next(self._ids), prompt, resolve_steps(steps, cfg.seq_len), sampler, tuple(stop_ids),
                       processor, logprobs)
        self.queue.append(seq)
        return seq

    def cancel(self, seq: Sequence) -> None:
        """Drop a sequence now: its slot and pages are free for the next step."""
        if seq.done:
            return
        if seq in self.queue:
            self.queue.remove(seq)
        self._finish(seq, "cancelled")

    @property
    def busy(self) -> bool:
        return bool(self.queue or self.running)

    # ---------------------------------------------------------------------------- stepping

    def _admit(self) -> None:
        while self.queue and self.free_slots:
            seq = self.queue[0]
            need = self.state.pages_for(seq.steps)  # its whole run: never out of pages mid-way
            if need > self.state.free_pages:
                return
            self.queue.popleft()
            seq.slot = self.free_slots.pop()
            self.state.reserve(seq.slot, seq.steps)
            self.state.lengths[seq.slot] = 0
            seq.status = "prefill"
            self.running.append(seq)
            if seq.steps <= len(seq.prompt) - 1:  # the step limit falls inside the prompt: nothing to sample
                self._finish(seq, "length")

    def _finish(self, seq: Sequence, reason: str) -> None:
        if seq.slot >= 0:
            self.state.release(seq.slot)
            self.free_slots.append(seq.slot)
            seq.slot = -1
        if seq in self.running:
            self.running.remove(seq)
        seq.status, seq.finish_reason = "done", reason

    def step(self) -> list[Event]:
        """One engine call for every live sequence; returns the tokens sampled in it."""
        self._admit()
        tokens, positions, slots, logit_rows, owners = [], [], [], [], []
        for seq in self.running:  # decode rows: each sequence's last token at its last position
            if seq.status == "decode":
                pos = len(seq.prompt) - 1 + len(seq.tokens)
                logit_rows.append(len(tokens))
                owners.append(seq)
                tokens.append(seq.tokens[-1])
                positions.append(pos)
                slots.append(seq.slot)
        budget = self.max_rows - len(tokens)
        for seq in self.running:  # then prompt chunks, first come first served
            if seq.status != "prefill" or budget <= 0:
                continue
            chunk = seq.prompt[seq.prefilled : seq.prefilled + budget]
            tokens += chunk
            positions += range(seq.prefilled, seq.prefilled + len(chunk))
            slots += [seq.slot] * len(chunk)
            seq.prefilled += len(chunk)
            budget -= len(chunk)
            if seq.prefilled == len(seq.prompt):  # the prompt is in: its last row's logits give a token
                logit_rows.append(len(tokens) - 1)
                owners.append(seq)
        if not tokens:
            return []
        order = np.argsort(logit_rows, kind="stable")  # the engine wants ascending logit rows
        logits = self.engine.run(tokens, positions, slots, [logit_rows[i] for i in order], self.state)
        self.steps_run += 1
        self.last_rows = len(tokens)
        events = []
        for j, i in enumerate(order):
            seq = owners[i]
            row = logits[j]
            if seq.processor is not None:
                seq.processor(row, seq.tokens)
            logprobs = log_softmax(row) if seq.logprobs is not None else None  # before the sampler overwrites row
            token = seq.sampler(row)
            seq.tokens.append(token)
            seq.status = "decode"
            pos = len(seq.prompt) - 1 + len(seq.tokens)  # the position this token will take
            finished = token in seq.stop_ids or pos >= seq.steps
            event = Event(seq, token, finished)
            if logprobs is not None:
                event.logprob, event.top_logprobs = float(logprobs[token]), top_logprobs(logprobs, seq.logprobs)
            events.append(event)
            if finished:
                self._finish(seq, "stop" if token in seq.stop_ids else "length")
        events.sort(key=lambda e: e.seq.id)
        return events

    def run_all(self) -> None:
        """Step until every sequence added so far is done."""
        while self.busy:
            self.step()
