"""run.c's chat loop: a conversation over one KV cache, one user turn at a time."""

from __future__ import annotations

from typing import Iterator

from ..errors import GenerationError
from ..sampling import Sampler
from .loop import resolve_steps


class Chat:
    """A chat session over one KV cache; `turn(user)` yields the assistant's text.

    The turn's prompt comes from the tokenizer's chat template (Llama 2's for tokenizer.bin, as
    run.c renders it); the reply ends at one of the tokenizer's eos_ids or at the step limit.
    run.c's RNG rules are kept: one draw per forced prompt position, and the token that ends a
    reply is fed (and sampled past) before the next turn.
    """

    def __init__(self, engine, tokenizer, system: str | None = None, steps: int = 0, temperature: float = 1.0,
                 topp: float = 0.9, seed: int | None = None):
        if tokenizer.chat_template is None:
            raise GenerationError("this tokenizer has no chat template")
        self.engine, self.tokenizer = engine, tokenizer
        self.system = system
        self.steps = resolve_steps(steps, engine.config.seq_len)
        self.sampler = Sampler(engine.config.vocab_size, temperature=temperature, topp=topp, seed=seed)
        self.state = engine.new_state()
        self.pos = 0
        self.finish_reason = None  # of the last reply: "stop" (an eos token) or "length" (the context)

    @property
    def full(self) -> bool:
        return self.pos >= self.steps

    def turn(self, user: str) -> Iterator[str]:
        """Feed the user's message, then yield the reply's text until EOS or the step limit."""
        engine, tok = self.engine, self.tokenizer
        prompt = tok.chat_template.turn(tok, user, self.system, self.pos == 0)
        if self.pos + len(prompt) > self.steps:
            raise GenerationError(
                f"this turn is {len(prompt)} tokens but only {self.steps - self.pos} positions of the context are left"
            )
        logits = engine.forward(prompt, self.pos, self.state)
        self.pos += len(prompt)
        # run.c samples (and discards) at every forced position: advance the RNG the same way
        self.sampler.skip(len(prompt) - 1)
        decoder = tok.stream()
        prev = prompt[-1]
        self.finish_reason = "length"
        while True:
            token = self.sampler(logits)
            if token in tok.eos_ids:
                self.finish_reason = "stop"
                # run.c feeds the EOS that ends the reply, and samples once more, before the next turn
                if self.pos < self.steps:
                    engine.step(token, self.pos, self.state)
                    self.pos += 1
                    self.sampler.skip(1)
                break
            text = decoder.feed(prev, token)
            if text:
                yield text
            if self.pos >= self.steps:
                break
            prev = token
            logits = engine.step(token, self.pos, self.state)
            self.pos += 1
        tail = decoder.flush()
        if tail:
            yield tail
