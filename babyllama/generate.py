"""Generation as Python generators: run.c's generate and chat loops, token by token.

The CLI and the server only consume these generators; all of run.c's rules about forced prompt
tokens, stopping and step counting live here, once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from .checkpoint import load_checkpoint
from .engine import Engine, RunState
from .errors import GenerationError, TokenizerError
from .sampler import Sampler
from .tokenizer import StreamDecoder, Tokenizer

BOS, EOS = 1, 2
ASSETS = Path(__file__).resolve().parent / "assets"
DEFAULT_MODEL = ASSETS / "model.bin"  # the small model babyllama ships (see README)


def resolve_steps(steps: int, seq_len: int) -> int:
    """run.c's rule: steps counts positions including the prompt; 0 or too many means seq_len."""
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 0:
        raise GenerationError(f"steps must be a non-negative integer (0 = the model's context), got {steps!r}")
    return seq_len if steps == 0 or steps > seq_len else int(steps)


def generate_ids(engine: Engine, state: RunState, prompt: Sequence[int], steps: int, sample) -> Iterator[int]:
    """Yield the token that follows each position, exactly as run.c's generate loop does.

    `prompt` starts with BOS; its tokens are forced (yielded, not sampled), then `sample(logits)`
    picks each next token until `steps` positions are used or BOS is sampled (which is yielded
    last, as run.c's fixtures record it). The prompt is prefilled in one engine call: the cache
    ends up the same as run.c's token-by-token loop leaves it.
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
        if token == BOS or pos >= steps:
            return
        logits = engine.step(token, pos, state)


def chat_prompt(user: str, system: str | None, first_turn: bool) -> str:
    """Llama 2's chat template, as run.c renders it."""
    if first_turn and system:
        return f"[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{user} [/INST]"
    return f"[INST] {user} [/INST]"


@dataclass
class Piece:
    """One generated token: its id and the text it completes (may be empty mid-UTF-8)."""

    id: int
    text: str
    forced: bool  # a prompt token rather than a sampled one


class Model:
    """A loaded model with its tokenizer: the Python API behind `babyllama.load`."""

    def __init__(self, engine: Engine, tokenizer: Tokenizer, path: Path | None = None):
        self.engine = engine
        self.tokenizer = tokenizer
        self.path = path

    @classmethod
    def load(cls, model_path=None, tokenizer_path=None, parallel: bool | None = None) -> "Model":
        """Map a llama2.c checkpoint and its tokenizer.bin.

        The tokenizer defaults to tokenizer.bin beside the model, then in the working directory.
        With no model path, the small model bundled with babyllama is used.
        """
        model_path = Path(model_path) if model_path is not None else DEFAULT_MODEL
        ck = load_checkpoint(model_path)
        tok_path = find_tokenizer(model_path, tokenizer_path)
        tokenizer = Tokenizer.load(tok_path, ck.config.vocab_size)
        return cls(engine_for(ck, parallel), tokenizer, model_path)

    @property
    def config(self):
        return self.engine.config

    def encode(self, text: str, bos: bool = True) -> list[int]:
        return self.tokenizer.encode(text, bos=bos)

    def logits(self, tokens: Sequence[int]) -> np.ndarray:
        """(T, vocab) float32 logits of every position of a token sequence (fresh KV cache)."""
        return self.engine.logits(tokens)

    def pieces(
        self,
        prompt: str | Sequence[int] = "",
        steps: int = 256,
        temperature: float = 1.0,
        topp: float = 0.9,
        seed: int | None = None,
        topk: int = 0,
        minp: float = 0.0,
        state: RunState | None = None,
    ) -> Iterator[Piece]:
        """Yield every token after the first (forced prompt tokens, then samples) with its text."""
        cfg = self.config
        tokens = self.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        steps = resolve_steps(steps, cfg.seq_len)
        sampler = Sampler(cfg.vocab_size, temperature=temperature, topp=topp, seed=seed, topk=topk, minp=minp)
        decoder = StreamDecoder(self.tokenizer)
        prev = tokens[0]
        for i, token in enumerate(generate_ids(self.engine, state or self.engine.new_state(), tokens, steps, sampler)):
            if token == BOS and i >= len(tokens) - 1:
                yield Piece(token, decoder.flush(), False)
                return
            yield Piece(token, decoder.feed(prev, token), i < len(tokens) - 1)
            prev = token
        tail = decoder.flush()
        if tail:
            yield Piece(-1, tail, False)

    def generate(self, prompt: str = "", steps: int = 256, temperature: float = 1.0, topp: float = 0.9,
                 seed: int | None = None, **kw) -> Iterator[str]:
        """Yield text as it is generated (prompt text first, like run.c's stdout)."""
        for piece in self.pieces(prompt, steps, temperature, topp, seed, **kw):
            if piece.text:
                yield piece.text

    def chat(self, system: str | None = None, steps: int = 0, temperature: float = 1.0, topp: float = 0.9,
             seed: int | None = None) -> "Chat":
        return Chat(self, system, steps, temperature, topp, seed)


class Chat:
    """A Llama 2 chat session over one KV cache; `turn(user)` yields the assistant's text."""

    def __init__(self, model: Model, system, steps, temperature, topp, seed):
        self.model = model
        self.system = system
        self.steps = resolve_steps(steps, model.config.seq_len)
        self.sampler = Sampler(model.config.vocab_size, temperature=temperature, topp=topp, seed=seed)
        self.state = model.engine.new_state()
        self.pos = 0

    @property
    def full(self) -> bool:
        return self.pos >= self.steps

    def turn(self, user: str) -> Iterator[str]:
        """Feed the user's message, then yield the reply's text until EOS or the step limit."""
        engine, tok = self.model.engine, self.model.tokenizer
        prompt = tok.encode(chat_prompt(user, self.system, self.pos == 0), bos=True)
        if self.pos + len(prompt) > self.steps:
            raise GenerationError(
                f"this turn is {len(prompt)} tokens but only {self.steps - self.pos} positions of the context are left"
            )
        logits = engine.forward(prompt, self.pos, self.state)
        self.pos += len(prompt)
        # run.c samples (and discards) at every forced position: advance the RNG the same way
        self.sampler.skip(len(prompt) - 1)
        decoder = StreamDecoder(tok)
        prev = prompt[-1]
        while True:
            token = self.sampler(logits)
            if token == EOS:
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


def find_tokenizer(model_path: Path, tokenizer_path=None) -> Path:
    """The explicit path, else tokenizer.bin beside the model, else ./tokenizer.bin."""
    if tokenizer_path is not None:
        return Path(tokenizer_path)
    candidates = [Path(model_path).resolve().parent / "tokenizer.bin", Path(os.getcwd()) / "tokenizer.bin"]
    for c in candidates:
        if c.is_file():
            return c
    raise TokenizerError(
        f"no tokenizer given and none found (looked for {candidates[0]} and {candidates[1]}); pass -z TOKENIZER"
    )


def engine_for(ck, parallel: bool | None = None):
    """The engine that runs a checkpoint's format."""
    if ck.version in (0, 1):
        return Engine.from_checkpoint(ck, parallel)
    from .engine.quant import QuantEngine  # the int8/int4 formats

    return QuantEngine.from_checkpoint(ck, parallel)
