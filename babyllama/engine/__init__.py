"""Inference engines: weights (read-only, usually views of a mapped file) kept apart from run state.

    engine = Engine.from_checkpoint(load_checkpoint("stories15M.bin"))
    state = engine.new_state()                 # KV cache + scratch buffers, owned by the caller
    logits = engine.forward([1, 403], 0, state)  # prefill two tokens -> logits of the last one

Nothing here allocates per token: forward writes into the state's buffers and returns a view.
"""

from __future__ import annotations

import math
import os

import numpy as np

from ..checkpoint import Checkpoint, Weights
from ..config import ModelConfig
from ..errors import GenerationError

# Below this many weight bytes a single thread wins: a 64x64 matvec takes less time than waking
# a thread pool. Measured with `babyllama bench` on 2 cores (stories260K: 1 MB serial is faster).
PARALLEL_MIN_BYTES = 4 << 20
# Up to this many weight bytes the model stays in the CPU caches from token to token, and the
# matmuls run eight rows side by side (kernels.matmul's `blocked`): ~20% faster on cached rows,
# but ~1.5x slower on rows streaming from memory, where one row at a time is one sequential stream.
BLOCKED_MAX_BYTES = 8 << 20


def compiles_on_first_call(dispatcher) -> bool:
    """True when a Numba function has no machine code yet, in memory or in its on-disk cache, so
    its first call compiles (the engine's forward: tens of seconds, once per install)."""
    if dispatcher.overloads:
        return False
    try:
        return not os.path.exists(dispatcher._cache._cache_file._index_path)
    except AttributeError:  # Numba's cache internals moved: say nothing rather than guess
        return False


def rope_tables(cfg: ModelConfig) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin of every (position, pair) angle, (seq_len, head_size/2) float32, as run.c's
    -Ofast build computes them (kernels.rope_table).

    (The tables stored in v0 files are not used by run.c either.)
    """
    from .kernels import rope_table

    return rope_table(cfg.seq_len, cfg.head_size, np.float32(math.log(cfg.rope_theta)))


class RunState:
    """Everything that changes while generating: activations scratch and the KV cache."""

    def __init__(self, cfg: ModelConfig):
        f32 = np.float32
        self.pos = 0  # number of positions already in the cache
        self.token = np.zeros(1, np.int32)  # the decode step's input, reused
        self.x = np.zeros(cfg.dim, f32)  # residual stream
        self.xb = np.zeros(cfg.dim, f32)  # normalized / attention output
        self.xb2 = np.zeros(cfg.dim, f32)  # projection output before the residual add
        self.q = np.zeros(cfg.dim, f32)
        self.hb = np.zeros(cfg.hidden_dim, f32)  # SwiGLU hidden activations (w1 @ x, then gated)
        self.hb2 = np.zeros(cfg.hidden_dim, f32)  # w3 @ x
        tiles = -(-cfg.seq_len // 16)  # positions in tiles of 16 (kernels.store_kv)
        self.att = np.zeros((cfg.n_heads, 16 * tiles), f32)  # attention scores
        self.k = np.zeros(cfg.kv_dim, f32)  # this position's key and value before caching
        self.v = np.zeros(cfg.kv_dim, f32)
        # KV cache: keys (layer, kv head, position tile, head_size, position in tile), values
        # (layer, kv head, position, head_size); kernels.store_kv says why
        self.key_cache = np.zeros((cfg.n_layers, cfg.n_kv_heads, tiles, cfg.head_size, 16), f32)
        self.value_cache = np.zeros((cfg.n_layers, cfg.n_kv_heads, cfg.seq_len, cfg.head_size), f32)
        self.logits = np.zeros((1, cfg.vocab_size), f32)

    @property
    def nbytes(self) -> int:
        return sum(v.nbytes for v in vars(self).values() if isinstance(v, np.ndarray))


def _as_tokens(tokens) -> np.ndarray:
    return np.ascontiguousarray(np.atleast_1d(np.asarray(tokens)), dtype=np.int32)


class Engine:
    """fp32 inference over llama2.c weights (v0/v1 files, or arrays from the trainer)."""

    def __init__(self, cfg: ModelConfig, weights: Weights, parallel: bool | None = None,
                 blocked: bool | None = None):
        from .jitcache import ensure_fresh

        ensure_fresh()  # before any compiled code loads: no machine code from older sources
        self.config = cfg
        self.weights = weights
        if parallel is None:
            parallel = self.weight_bytes >= PARALLEL_MIN_BYTES
        if blocked is None:
            blocked = self.weight_bytes <= BLOCKED_MAX_BYTES
        self.parallel, self.blocked = bool(parallel), bool(blocked)  # either way, the same logits
        self.rope_cos, self.rope_sin = rope_tables(cfg)
        self._eps = np.float32(cfg.norm_eps)
        self._forward = None

    @classmethod
    def from_checkpoint(cls, ck: Checkpoint, parallel: bool | None = None) -> "Engine":
        return cls(ck.config, ck.weights, parallel)

    @property
    def weight_bytes(self) -> int:
        """Bytes of weights one decode step reads (the classifier once even if tied)."""
        w = self.weights
        return sum(a.nbytes for n, a in w.items() if n != "token_embedding") + w.token_embedding[0].nbytes

    def new_state(self) -> RunState:
        return RunState(self.config)

    @property
    def compiles_on_first_call(self) -> bool:
        from .fp32 import forward

        return compiles_on_first_call(forward)

    def check_tokens(self, tokens: np.ndarray, pos: int) -> None:
        cfg = self.config
        if pos < 0 or pos + tokens.shape[0] > cfg.seq_len:
            raise GenerationError(
                f"positions {pos}..{pos + tokens.shape[0] - 1} exceed the model's context of {cfg.seq_len} tokens"
            )
        if tokens.size and (tokens.min() < 0 or tokens.max() >= cfg.vocab_size):
            raise GenerationError(f"token ids must be in [0, {cfg.vocab_size}), found {tokens.min()}..{tokens.max()}")

    def forward(self, tokens, pos: int, state: RunState, all_logits: bool = False) -> np.ndarray:
        """Run tokens at positions pos.. through the model; return logits.

        Returns a (vocab,) view of the last position's logits, or (T, vocab) with all_logits.
        The returned view is overwritten by the next call.
        """
        tokens = _as_tokens(tokens)
        self.check_tokens(tokens, pos)
        out = np.empty((tokens.shape[0], self.config.vocab_size), np.float32) if all_logits else state.logits
        self._run(tokens, pos, out, state)
        return out if all_logits else out[0]

    def step(self, token: int, pos: int, state: RunState) -> np.ndarray:
        """forward() for one token: the decode loop's path, with only scalar checks (~1 us less)."""
        if not (0 <= pos < self.config.seq_len and 0 <= token < self.config.vocab_size):
            self.check_tokens(np.array([token], np.int32), pos)  # raises with the full message
        state.token[0] = token
        self._run(state.token, pos, state.logits, state)
        return state.logits[0]

    def _run(self, tokens: np.ndarray, pos: int, out: np.ndarray, state: RunState) -> None:
        if self._forward is None:  # bound once: at ~20 us a token, Python-side work shows
            from .fp32 import forward

            w = self.weights
            self._forward = forward
            self._weight_args = (w.token_embedding, w.rms_att, w.wq, w.wk, w.wv, w.wo, w.rms_ffn, w.w1, w.w2, w.w3,
                                 w.rms_final, w.wcls)
        self._forward(
            tokens, pos, out, *self._weight_args,
            state.key_cache, state.value_cache, state.x, state.xb, state.xb2, state.q, state.k, state.v,
            state.hb, state.hb2, state.att, self.rope_cos, self.rope_sin,
            self.config.n_heads, self._eps, self.parallel, self.blocked,
        )
        state.pos = pos + tokens.shape[0]

    def logits(self, tokens) -> np.ndarray:
        """(T, vocab) logits of every position of a token sequence, from a fresh state."""
        return self.forward(tokens, 0, self.new_state(), all_logits=True)


__all__ = ["Engine", "RunState", "rope_tables", "compiles_on_first_call", "PARALLEL_MIN_BYTES", "BLOCKED_MAX_BYTES"]
