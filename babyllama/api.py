"""Model: the Python API behind `babyllama.load`: a model file and its tokenizer, loaded and run.

    model = babyllama.load("stories15M.bin")              # tokenizer.bin beside it
    for text in model.generate("Once upon a time", steps=128, temperature=0.8, seed=42):
        print(text, end="", flush=True)
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from .engine import Engine
from .errors import GenerationError, TokenizerError
from .generation import Chat, Piece, Sampling, Scheduler, pieces, resolve_steps, text_of
from .generation.speculative import LookupDraft, ModelDraft, SpecStats, speculative_ids
from .sampling import Sampler
from .tokenizers import load_tokenizer

ASSETS = Path(__file__).resolve().parent / "assets"
DEFAULT_MODEL = ASSETS / "model.bin"  # the small model babyllama ships (see README)


def find_tokenizer(model_path, tokenizer_path=None) -> Path:
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


class Model:
    """A loaded model with its tokenizer."""

    def __init__(self, engine: Engine, tokenizer, path: Path | None = None):
        if tokenizer.vocab_size != engine.config.vocab_size:
            raise TokenizerError(f"the tokenizer has {tokenizer.vocab_size} tokens, the model expects "
                                 f"{engine.config.vocab_size}")
        self.engine = engine
        self.tokenizer = tokenizer
        self.path = path

    @classmethod
    def load(cls, model_path=None, tokenizer_path=None, parallel: bool | None = None,
             quantize: int | None = None) -> "Model":
        """Load a model and its tokenizer: a llama2.c .bin (any version), a Hugging Face folder, a
        GGUF file or an llm.c GPT-2 .bin (formats.load_for_inference). quantize=8|4 quantizes float weights at load.

        The tokenizer: tokenizer_path if given (tokenizer.bin, tokenizer.json, a .model, a GGUF);
        else the HF folder's or GGUF file's own; for an llm.c .bin the one beside it (tokenizer.json,
        vocab.json + merges.txt, else gpt2_tokenizer.bin: decode only); for a .bin, tokenizer.bin beside the model, then
        in the working directory. With no model path, the small model bundled with babyllama is used.
        """
        from .formats import load_for_inference

        model_path = Path(model_path) if model_path is not None else DEFAULT_MODEL
        loaded = load_for_inference(model_path, quantize, own_tokenizer=tokenizer_path is None)
        tokenizer = loaded.tokenizer
        if tokenizer is None:
            tokenizer = load_tokenizer(find_tokenizer(model_path, tokenizer_path), loaded.config.vocab_size)
        if loaded.config.arch == "gpt2":  # prompts start with <|endoftext|>, as in llm.c
            from .tokenizers.gpt2 import gpt2_conventions

            tokenizer = gpt2_conventions(tokenizer)
        return cls(Engine(loaded.config, loaded.weights, parallel), tokenizer, model_path)

    @property
    def config(self):
        return self.engine.config

    def encode(self, text: str | bytes, bos: bool = True) -> list[int]:
        """Token ids of a text (BOS first unless bos=False); bytes are encoded as they are."""
        if not isinstance(text, (str, bytes)):
            raise GenerationError(f"encode expects str or bytes, got {type(text).__name__}")
        return self.tokenizer.encode(text, bos=bos)

    def prompt_ids(self, prompt) -> list[int]:
        """A prompt given as text (str or bytes) or as token ids, as ids."""
        if isinstance(prompt, (str, bytes)):
            return self.encode(prompt)
        ids = [int(t) for t in prompt]
        if not ids:
            raise GenerationError("a prompt given as token ids must hold at least one id (BOS)")
        return ids

    def logits(self, tokens: Sequence[int]) -> np.ndarray:
        """(T, vocab) float32 logits of every position of a token sequence (fresh KV cache)."""
        return self.engine.logits(tokens)

    def pieces(self, prompt: str | bytes | Sequence[int] = "", steps: int = 256, temperature: float = 1.0,
               topp: float = 0.9, seed: int | None = None, topk: int = 0, minp: float = 0.0,
               state=None, draft: "Model | None" = None, lookup: int = 0,
               stats: SpecStats | None = None) -> Iterator[Piece]:
        """Yield every token after the first (forced prompt tokens, then samples) with its text.

        draft (a Model with the same vocabulary) or lookup (n-grams of up to `lookup` tokens of the
        context) turns on speculative decoding: the same tokens, fewer passes over the weights;
        `stats` (a SpecStats) collects drafted and accepted counts.
        """
        cfg = self.config
        tokens = self.prompt_ids(prompt)
        steps = resolve_steps(steps, cfg.seq_len)
        sampler = Sampler(cfg.vocab_size, temperature=temperature, topp=topp, seed=seed, topk=topk, minp=minp)
        drafter = self.drafter(draft, lookup)
        ids = None
        if drafter is not None:
            ids = speculative_ids(self.engine, state or self.engine.new_state(), tokens, steps, sampler, drafter,
                                  self.tokenizer.stop_ids, stats)
        return pieces(self.engine, self.tokenizer, tokens, steps, sampler, state, ids=ids)

    def drafter(self, draft: "Model | None" = None, lookup: int = 0):
        """The speculative drafter for a draft model or an n-gram length, or None for neither."""
        if draft is not None and lookup:
            raise GenerationError("use a draft model or --lookup, not both")
        if draft is not None:
            if draft.tokenizer.vocab_size != self.tokenizer.vocab_size or \
                    getattr(draft.tokenizer, "vocab", None) != getattr(self.tokenizer, "vocab", None):
                raise GenerationError(f"the draft model's tokenizer differs from the target's ({draft.tokenizer.vocab_size} "
                                      f"vs {self.tokenizer.vocab_size} tokens, or other pieces): drafts must share it")
            return ModelDraft(draft.engine, self.config)
        if lookup:
            return LookupDraft(lookup)
        return None

    def generate(self, prompt: str | bytes | Sequence[int] = "", steps: int = 256, temperature: float = 1.0,
                 topp: float = 0.9, seed: int | None = None, **kw) -> Iterator[str]:
        """Yield text as it is generated (prompt text first, like run.c's stdout)."""
        for piece in self.pieces(prompt, steps, temperature, topp, seed, **kw):
            if piece.text:
                yield piece.text

    def generate_batch(self, prompts: Sequence, steps: int = 256, temperature: float = 1.0, topp: float = 0.9,
                       seed: int | None = None, topk: int = 0, minp: float = 0.0,
                       max_sequences: int = 32) -> list["BatchResult"]:
        """Generate for many prompts at once (continuous batching): one result per prompt, in order.

        Prompt i uses seed + i (seed None or 0: from the clock, like run.c). Each result's tokens are
        exactly `babyllama run MODEL -s <seed+i> -i <prompt i> --json`'s, whatever the batch.
        """
        prompts = list(prompts)
        if not prompts:
            raise GenerationError("generate_batch needs at least one prompt")
        ids = [self.prompt_ids(p) for p in prompts]
        base = int(seed or 0) or int(time.time())
        sched = Scheduler(self.engine, max_sequences=max_sequences)
        stops = self.tokenizer.stop_ids
        seqs = [sched.add(p, steps, Sampling(temperature, topp, (base + i) % 2**64 or 1, topk, minp), stops)
                for i, p in enumerate(ids)]
        sched.run_all()
        return [BatchResult(s.all_tokens, text_of(self.tokenizer, s.all_tokens, s.finish_reason == "stop"),
                            len(s.prompt[: s.steps + 1]), len(s.tokens), s.finish_reason, (base + i) % 2**64 or 1)
                for i, s in enumerate(seqs)]

    def chat(self, system: str | None = None, steps: int = 0, temperature: float = 1.0, topp: float = 0.9,
             seed: int | None = None) -> Chat:
        """A chat session (run.c's -m chat); its turn(user) yields the reply's text."""
        return Chat(self.engine, self.tokenizer, system, steps, temperature, topp, seed)


@dataclass
class BatchResult:
    """One prompt's generation in a batch: tokens BOS first (as `babyllama run --json`), its text."""

    tokens: list[int]
    text: str
    prompt_tokens: int
    generated_tokens: int
    finish_reason: str
    seed: int


def load(model_path=None, tokenizer_path=None, **kwargs) -> Model:
    """Load a model (and its tokenizer) for generation. See Model.load."""
    return Model.load(model_path, tokenizer_path, **kwargs)
