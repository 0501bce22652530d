"""The inference engine: weights (read-only, usually views of a mapped file) kept apart from run
state (state.State: the KV cache and scratch), and one forward per architecture (llama.py).

    engine = Engine.from_checkpoint(load_checkpoint("stories15M.bin"))
    state = engine.new_state()                   # KV cache + scratch buffers, owned by the caller
    logits = engine.forward([1, 403], 0, state)  # prefill two tokens -> logits of the last one
    logits = engine.step(9038, 2, state)         # decode one token

fp32 (v0/v1), int8 (v2) and int4 (v3) weights all run here: the weights' type picks the matmul.
Nothing allocates per token: forward writes into the state's buffers and returns a view.
"""

from __future__ import annotations

import math

import numpy as np

from ..arch.gpt2 import Weights as GPT2Weights
from ..arch.llama import Weights
from ..config import ModelConfig
from ..errors import CheckpointError, GenerationError
from ..quant import QuantWeights
from ..simd.jitcache import compiles_on_first_call, ensure_fresh
from .state import PAGE, State

# Below this many weight bytes a single thread wins: a 64x64 matvec takes less time than waking
# a thread pool. Measured with `babyllama bench` on 2 cores (stories260K: 1 MB serial is faster).
PARALLEL_MIN_BYTES = 4 << 20
# Up to this many weight bytes the model stays in the CPU caches from token to token, and the
# fp32 matmuls run eight rows side by side (kernels.matmul's `blocked`): ~20% faster on cached
# rows, but ~1.5x slower on rows streaming from memory, where one row at a time is one stream.
BLOCKED_MAX_BYTES = 8 << 20


def rope_tables(cfg: ModelConfig) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin of every (position, pair) angle, (seq_len, head_size/2) float32, as run.c's
    -Ofast build computes them, with Llama 3.1's frequency scaling when the config has it."""
    from .kernels import rope_table

    s = cfg.rope_scaling
    scaling = (s.factor, s.low_freq_factor, s.high_freq_factor, float(s.original_max_position_embeddings)) if s \
        else (0.0, 0.0, 0.0, 0.0)
    return rope_table(cfg.seq_len, cfg.head_size, np.float32(math.log(cfg.rope_theta)), scaling)


def _as_int32(values) -> np.ndarray:
    return np.ascontiguousarray(np.atleast_1d(np.asarray(values)), dtype=np.int32)


class Engine:
    """Inference over a model's weights: Llama (fp32 Weights, or QuantWeights: int8/int4) or GPT-2
    (fp32); the config's arch picks the forward (llama.py, gpt2.py), the weights' type the matmul."""

    def __init__(self, cfg: ModelConfig, weights, parallel: bool | None = None, blocked: bool | None = None):
        ensure_fresh()  # before any compiled code loads: no machine code from older sources
        self.config = cfg
        self.weights = weights
        self.quantized = isinstance(weights, QuantWeights)
        expected = GPT2Weights if cfg.arch == "gpt2" else (Weights, QuantWeights)
        if not isinstance(weights, expected):
            kind = "fp32 GPT-2 Weights" if cfg.arch == "gpt2" else "fp32 Weights or QuantWeights"
            raise CheckpointError(f"expected {kind} for arch {cfg.arch}, got {type(weights).__name__}")
        if parallel is None:
            parallel = self.weight_bytes >= PARALLEL_MIN_BYTES
        if blocked is None:
            blocked = self.weight_bytes <= BLOCKED_MAX_BYTES
        self.parallel = bool(parallel)
        self.blocked = bool(blocked) and not self.quantized  # row blocks are an fp32 kernel's choice
        if cfg.arch == "gpt2":
            self._bind_gpt2()
        else:
            self._bind_llama()
        self._one_row = np.zeros(1, np.int32)

    def _bind_llama(self) -> None:
        """The Llama forward's weight and parameter tuples, built once (not per token)."""
        from .llama import LlamaWeights, Params, forward

        cfg, w = self.config, self.weights
        self.rope_cos, self.rope_sin = rope_tables(cfg)
        if self.quantized:
            def m(q):
                return (q.data, q.offsets, q.scales.reshape(-1))

            self._w = tuple(LlamaWeights(m(w.token_embedding), w.rms_att, m(w.wq), m(w.wk), m(w.wv), m(w.wo),
                                         w.rms_ffn, m(w.w1), m(w.w2), m(w.w3), w.rms_final[None], m(w.wcls)))
            gs, bits = w.group_size, w.bits
        else:
            self._w = tuple(LlamaWeights(w.token_embedding, w.rms_att, w.wq, w.wk, w.wv, w.wo, w.rms_ffn, w.w1, w.w2,
                                         w.w3, w.rms_final[None], w.wcls[None]))
            gs, bits = 1, 32
        self._p = tuple(Params(cfg.n_heads, np.float32(cfg.norm_eps), self.parallel, self.blocked, gs, bits,
                               self.rope_cos, self.rope_sin))
        self._fwd = forward  # bound once: at ~25 us a token (stories260K), Python-side work shows

    def _bind_gpt2(self) -> None:
        from .gpt2 import GPT2Params, GPT2Weights as Tuple, forward

        w = self.weights
        self._w = tuple(Tuple(w.token_embedding, w.position_embedding, w.ln_att, w.ln_att_bias, w.wqkv, w.bqkv, w.wo,
                              w.bo, w.ln_ffn, w.ln_ffn_bias, w.w1, w.b1, w.w2, w.b2, w.ln_final[None],
                              w.ln_final_bias[None], w.wcls[None]))
        self._p = tuple(GPT2Params(self.config.n_heads, np.float32(self.config.norm_eps), self.parallel, self.blocked))
        self._fwd = forward

    @classmethod
    def from_checkpoint(cls, ck, parallel: bool | None = None) -> "Engine":
        """The engine for a loaded .bin (formats.llama2c.Checkpoint), whatever its version."""
        return cls(ck.config, ck.weights, parallel)

    @property
    def bits(self) -> int:
        return self.weights.bits if self.quantized else 32

    @property
    def group_size(self) -> int:
        return self.weights.group_size if self.quantized else 0

    @property
    def weight_bytes(self) -> int:
        """Bytes of weights one decode step reads (the embedding: one row; a tied classifier once)."""
        w = self.weights
        if self.quantized:
            total = sum(q.nbytes for n, q in w.matrices() if n not in ("token_embedding", "wcls"))
            emb = w.token_embedding
            total += w.wcls.nbytes + emb.cols * w.bits // 8 + 4 * (emb.cols // w.group_size)
            return total + w.rms_att.nbytes + w.rms_ffn.nbytes + w.rms_final.nbytes
        return sum(a.nbytes for n, a in w.items() if n != "token_embedding") + w.token_embedding[0].nbytes

    def new_state(self, n_slots: int = 1, n_pages: int | None = None, fixed: bool | None = None) -> State:
        """Run state for n_slots sequences (n_pages: the cache pool; default, every slot's whole
        context). fixed: every slot owns its pages for good (default: a single sequence does)."""
        return State(self.config, n_slots, n_pages, self.group_size, fixed=fixed)

    @property
    def compiles_on_first_call(self) -> bool:
        return compiles_on_first_call(self._fwd)

    def check_tokens(self, tokens: np.ndarray, pos: int) -> None:
        cfg = self.config
        if pos < 0 or pos + tokens.shape[0] > cfg.seq_len:
            raise GenerationError(
                f"positions {pos}..{pos + tokens.shape[0] - 1} exceed the model's context of {cfg.seq_len} tokens"
            )
        if tokens.size and (tokens.min() < 0 or tokens.max() >= cfg.vocab_size):
            raise GenerationError(f"token ids must be in [0, {cfg.vocab_size}), found {tokens.min()}..{tokens.max()}")

    def run(self, tokens, positions, slots, logit_rows, state: State, out: np.ndarray | None = None) -> np.ndarray:
        """The general call: T token rows (token, position, slot) of the state's sequences; returns
        the logits of logit_rows (ascending row indices), (R, vocab). Rows of one sequence must be
        consecutive positions in order, after what the slot already holds. Checked here; the
        slots' pages must be reserved (State.reserve)."""
        tokens, positions, slots, logit_rows = (_as_int32(a) for a in (tokens, positions, slots, logit_rows))
        T = tokens.shape[0]
        if not (positions.shape[0] == slots.shape[0] == T) or T == 0:
            raise GenerationError(f"tokens, positions and slots must have the same length > 0, got "
                                  f"{T}, {positions.shape[0]}, {slots.shape[0]}")
        if logit_rows.size and (np.any(np.diff(logit_rows) <= 0) or logit_rows[0] < 0 or logit_rows[-1] >= T):
            raise GenerationError(f"logit_rows must be ascending row indices below {T}")
        self.check_tokens(tokens, 0)
        if positions.min() < 0 or positions.max() >= self.config.seq_len:
            raise GenerationError(f"positions must be in [0, {self.config.seq_len}), found "
                                  f"{positions.min()}..{positions.max()}")
        if slots.min() < 0 or slots.max() >= state.n_slots:
            raise GenerationError(f"slots must be in [0, {state.n_slots}), found {slots.min()}..{slots.max()}")
        # each sequence's rows: one run of consecutive positions that continues its cache (vectorized:
        # a batch step of 32 sequences is checked in microseconds, not a loop per slot)
        starts = np.flatnonzero(np.concatenate(([True], slots[1:] != slots[:-1])))
        ends = np.concatenate((starts[1:], [T])) - 1
        run_slots = slots[starts]
        if np.unique(run_slots).size != run_slots.size:
            raise GenerationError("each sequence's rows must be consecutive rows of the block")
        if np.any(np.diff(positions)[slots[1:] == slots[:-1]] != 1) or np.any(positions[starts] > state.lengths[run_slots]):
            bad = next(i for i, s in enumerate(run_slots) if positions[starts[i]] > state.lengths[s]
                       or np.any(np.diff(positions[starts[i] : ends[i] + 1]) != 1))
            s = run_slots[bad]
            raise GenerationError(f"slot {s}: rows must continue its {state.lengths[s]} cached positions in order, "
                                  f"found positions {positions[starts[bad]]}..{positions[ends[bad]]}")
        short = state.pages_for(positions[ends] + 1) > state.owned[run_slots]  # (elementwise on arrays too)
        if np.any(short):
            i = int(np.argmax(short))
            raise GenerationError(f"slot {run_slots[i]}: positions up to {positions[ends[i]]} have no pages reserved")
        if out is None:
            out = np.empty((logit_rows.shape[0], self.config.vocab_size), np.float32)
        self._forward(tokens, positions, slots, logit_rows, out, state)
        state.lengths[run_slots] = positions[ends] + 1
        return out

    def forward(self, tokens, pos: int, state: State, all_logits: bool = False, slot: int = 0) -> np.ndarray:
        """Run tokens at positions pos.. of one sequence (slot) through the model; return logits.

        Returns a (vocab,) view of the last position's logits, or (T, vocab) with all_logits.
        The returned view is overwritten by the next call.
        """
        tokens = _as_int32(tokens)
        self.check_tokens(tokens, pos)
        T = tokens.shape[0]
        state.reserve(slot, pos + T)
        positions = np.arange(pos, pos + T, dtype=np.int32)
        slots = np.full(T, slot, np.int32)
        if all_logits:
            out = np.empty((T, self.config.vocab_size), np.float32)
            self._forward(tokens, positions, slots, positions - pos, out, state)
        else:
            out = state.logits
            self._forward(tokens, positions, slots, np.array([T - 1], np.int32), out, state)
        state.lengths[slot] = pos + T
        return out if all_logits else out[0]

    def step(self, token: int, pos: int, state: State, slot: int = 0) -> np.ndarray:
        """forward() for one token: the decode loop's path, with only scalar checks."""
        if not (0 <= pos < self.config.seq_len and 0 <= token < self.config.vocab_size):
            self.check_tokens(np.array([token], np.int32), pos)  # raises with the full message
        if not state.fixed:
            state.reserve(slot, pos + 1)
        st = state._step
        st[0][0], st[1][0], st[2][0] = token, pos, slot
        self._forward(st[0], st[1], st[2], self._one_row, state.logits, state)
        state.lengths[slot] = pos + 1
        return state.logits[0]

    def _forward(self, tokens, positions, slots, logit_rows, out, state: State) -> None:
        if tokens.shape[0] > state.rows:
            state.ensure_rows(tokens.shape[0])
        self._fwd(tokens, positions, slots, tokens.shape[0], logit_rows, out, self._w, state.cache, state.scratch_args,
                  self._p)

    def logits(self, tokens) -> np.ndarray:
        """(T, vocab) logits of every position of a token sequence, from a fresh state."""
        return self.forward(tokens, 0, self.new_state(), all_logits=True)


__all__ = ["Engine", "State", "PAGE", "rope_tables", "compiles_on_first_call", "PARALLEL_MIN_BYTES",
           "BLOCKED_MAX_BYTES"]
