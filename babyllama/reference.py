"""A Llama in plain NumPy: the whole forward pass, the KV cache and run.c's sampler, top to bottom.

Start reading here. This is what babyllama computes, written like run.c and nothing more: no
Numba, no SIMD, no batching. The engine (babyllama/engine) computes the same function as fast as
the C program, in llama2.c's exact float order; this module computes it in plain NumPy (float32
like run.c, or float64 for the tests), so its logits agree with the engine's to float rounding,
not bit for bit. `babyllama run --reference` runs it on any model babyllama runs; with int8/int4
weights it does runq's arithmetic: dequantized weights times activations quantized per group.

Shapes: D dim, H query heads, G key/value heads, hs head size, F hidden width, V vocab, P positions.
"""

from __future__ import annotations

import math

import numpy as np


class ReferenceEngine:
    """The Llama forward with a KV cache, one token at a time (run.c's `forward`)."""

    compiles_on_first_call = False

    def __init__(self, config, weights, dtype=np.float32):
        self.group_size = getattr(weights, "group_size", 0)  # int8 / int4 weights: runq's arithmetic
        if self.group_size:
            weights = _dequantized(weights)
        self.config, self.weights, self.dtype = config, weights, dtype
        self.w = {name: np.asarray(a, dtype) for name, a in weights.items()}
        c = config
        # RoPE: pair i of a head turns by pos * theta^(-2i/hs) (Su et al. 2021), llama3 scaling aside
        freqs = 1.0 / c.rope_theta ** (np.arange(0, c.head_size, 2) / c.head_size)
        if c.rope_scaling is not None:
            freqs = _llama3_scaling(freqs, c.rope_scaling)
        angles = np.outer(np.arange(c.seq_len), freqs)  # (P, hs/2)
        self.cos, self.sin = np.cos(angles).astype(dtype), np.sin(angles).astype(dtype)

    def new_state(self):
        """The KV cache: keys and values of every layer and position, (L, P, G, hs) each."""
        c = self.config
        shape = (c.n_layers, c.seq_len, c.n_kv_heads, c.head_size)
        return {"k": np.zeros(shape, self.dtype), "v": np.zeros(shape, self.dtype), "pos": 0}

    def step(self, token: int, pos: int, state) -> np.ndarray:
        """The logits (V,) after `token` at position `pos`, its key and value stored in the cache."""
        c, w = self.config, self.w
        hs, H, G = c.head_size, c.n_heads, c.n_kv_heads
        x = w["token_embedding"][token].copy()  # (D,)
        for l in range(c.n_layers):
            # attention: pre-norm, project, rotate, cache, attend over positions 0..pos, project back
            h = rmsnorm(x, w["rms_att"][l], c.norm_eps)  # (D,)
            q = self.matmul(w["wq"][l], h).reshape(H, hs)  # (H, hs)
            k = self.matmul(w["wk"][l], h).reshape(G, hs)  # (G, hs)
            v = self.matmul(w["wv"][l], h).reshape(G, hs)  # (G, hs)
            q, k = rope(q, self.cos[pos], self.sin[pos]), rope(k, self.cos[pos], self.sin[pos])
            state["k"][l, pos], state["v"][l, pos] = k, v
            keys = state["k"][l, : pos + 1]  # (pos+1, G, hs)
            values = state["v"][l, : pos + 1]
            group = np.arange(H) // (H // G)  # query head -> its key/value head (GQA)
            scores = np.einsum("hd,phd->hp", q, keys[:, group]) / math.sqrt(hs)  # (H, pos+1)
            att = softmax(scores)
            out = np.einsum("hp,phd->hd", att, values[:, group]).reshape(-1)  # (H * hs,)
            x = x + self.matmul(w["wo"][l], out)  # residual
            # feed-forward: pre-norm, SwiGLU, project back
            h = rmsnorm(x, w["rms_ffn"][l], c.norm_eps)
            gate, up = self.matmul(w["w1"][l], h), self.matmul(w["w3"][l], h)  # (F,) each
            x = x + self.matmul(w["w2"][l], silu(gate) * up)  # residual
        x = rmsnorm(x, w["rms_final"], c.norm_eps)
        state["pos"] = pos + 1
        return self.matmul(w["wcls"], x)  # (V,)

    def matmul(self, w, x):
        """w @ x. With int8/int4 weights x is first rounded to int8 per group of group_size values
        (scale = max|x| / 127, round half away from zero), as runq quantizes its activations."""
        if self.group_size:
            g = x.reshape(-1, self.group_size)
            scale = np.abs(g).max(axis=1, keepdims=True) / 127
            q = np.trunc(np.abs(g) / np.where(scale > 0, scale, 1) + 0.5) * np.sign(g)
            x = (q * scale).reshape(x.shape)
        return w @ x

    def forward(self, tokens, pos: int, state, all_logits: bool = False) -> np.ndarray:
        """Feed tokens at positions pos..; the last position's logits (or all, (T, V))."""
        rows = [self.step(int(t), pos + i, state) for i, t in enumerate(np.atleast_1d(tokens))]
        return np.stack(rows) if all_logits else rows[-1]

    def logits(self, tokens) -> np.ndarray:
        """(T, V) logits of every position of a token sequence, from an empty cache."""
        return self.forward(tokens, 0, self.new_state(), all_logits=True)


def rmsnorm(x, weight, eps):
    """x / sqrt(mean(x^2) + eps) * weight (Zhang & Sennrich 2019)."""
    return weight * (x / np.sqrt(np.mean(x * x) + eps))


def rope(x, cos, sin):
    """Rotate the interleaved pairs (x[2i], x[2i+1]) of each head of x (heads, hs) by the angles."""
    a, b = x[:, 0::2], x[:, 1::2]
    out = np.empty_like(x)
    out[:, 0::2], out[:, 1::2] = a * cos - b * sin, a * sin + b * cos
    return out


def softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def silu(x):
    return x / (1 + np.exp(-x))


def _llama3_scaling(freqs, s):
    """Llama 3.1's RoPE: long wavelengths slowed by `factor`, short ones kept, a ramp between."""
    wavelen = 2 * np.pi / freqs
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    ramp = (1 - smooth) * freqs / s.factor + smooth * freqs
    low, high = s.original_max_position_embeddings / s.low_freq_factor, s.original_max_position_embeddings / s.high_freq_factor
    return np.where(wavelen > low, freqs / s.factor, np.where(wavelen < high, freqs, ramp))


def _dequantized(qw):
    from .arch.llama import Weights

    mats = {name: m.dequantize() for name, m in qw.matrices()}
    norms = {"rms_att": qw.rms_att, "rms_ffn": qw.rms_ffn, "rms_final": qw.rms_final}
    return Weights(**norms, **mats)


# ------------------------------------------------------------------------------------------------
# run.c's sampler


class XorShift:
    """run.c's random numbers: xorshift64* (Marsaglia 2003) on a 64-bit state."""

    def __init__(self, seed: int):
        self.state = seed % 2**64

    def u32(self) -> int:
        s = self.state
        s ^= s >> 12
        s ^= (s << 25) % 2**64
        s ^= s >> 27
        self.state = s
        return ((s * 0x2545F4914F6CDD1D) % 2**64) >> 32

    def f32(self) -> np.float32:
        return np.float32(self.u32() >> 8) / np.float32(16777216.0)


def sample(logits, temperature: float, topp: float, rng: XorShift) -> int:
    """run.c's sample(): argmax at temperature 0; else softmax(logits / T) and one coin, picked
    from the top-p nucleus when 0 < topp < 1, else from the whole distribution."""
    if temperature == 0:
        return int(np.argmax(logits))  # the first maximum
    probs = softmax(np.asarray(logits, np.float32) / np.float32(temperature)).astype(np.float32)
    coin = rng.f32()
    if 0 < topp < 1:
        n = len(probs)
        keep = np.flatnonzero(probs >= (1 - np.float32(topp)) / (n - 1))  # too small to matter: dropped
        order = keep[np.argsort(-probs[keep], kind="stable")]  # most likely first
        cumulative = np.cumsum(probs[order], dtype=np.float32)
        last = min(int(np.searchsorted(cumulative, np.float32(topp), side="right")), len(order) - 1)
        order, cdf = order[: last + 1], cumulative[: last + 1]
        return int(order[min(int(np.searchsorted(cdf, coin * cdf[-1], side="right")), last)])
    cdf = np.cumsum(probs, dtype=np.float32)
    return int(min(np.searchsorted(cdf, coin, side="right"), len(probs) - 1))


def generate(engine, prompt: list[int], steps: int, temperature=1.0, topp=0.9, seed=1):
    """run.c's generate loop: force the prompt, then sample until `steps` positions or BOS."""
    rng, state = XorShift(seed), engine.new_state()
    out, token = [], prompt[0]
    for pos in range(steps):
        logits = engine.step(token, pos, state)
        token = prompt[pos + 1] if pos + 1 < len(prompt) else sample(logits, temperature, topp, rng)
        out.append(token)
        if token == 1:
            break
    return out
