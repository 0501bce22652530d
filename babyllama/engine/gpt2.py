"""The GPT-2 forward pass (llm.c's gpt2_forward, KV-cached): learned positions, LayerNorm, biases,
GELU, a tied classifier, over a block of token rows like the Llama forward (llama.py).

It shares the Llama engine's matmuls (one row: the matrix-vector product; many rows: register
tiles, each element in the same order) and its paged attention, so a GPT-2 sequence's logits do
not depend on what else is in the block either. There is no llama2.c float order to reproduce
for GPT-2: LayerNorm and GELU are plain float32 loops; against transformers' GPT2LMHeadModel the
logits agree to float32 rounding.

The fused q/k/v projection writes (rows, 3 * dim): queries in the first dim columns, which the
attention reads in place (its row stride is the array's width), keys and values after them,
copied into the cache's staging rows.
"""

import math
from collections import namedtuple

import numpy as np
from numba import njit

from ..simd.jit import JIT, entry
from .kernels import attention_rows, gemm, matmul, residual, store_kv
from .state import PAGE, Scratch

GPT2Weights = namedtuple("GPT2Weights", "token_embedding position_embedding ln_att ln_att_bias wqkv bqkv wo bo "
                                        "ln_ffn ln_ffn_bias w1 b1 w2 b2 ln_final ln_final_bias wcls")
GPT2Params = namedtuple("GPT2Params", "n_heads eps parallel blocked")

_GELU_C = np.float32(math.sqrt(2.0 / math.pi))


@njit(**JIT)
def layernorm(out, j, x, t, weight, bias, l, eps):
    """out[j] = (x[t] - mean) / sqrt(var + eps) * weight[l] + bias[l] (Ba et al. 2016)."""
    n = x.shape[1]
    mean = np.float32(0.0)
    for i in range(n):
        mean += x[t, i]
    mean /= np.float32(n)
    var = np.float32(0.0)
    for i in range(n):
        d = x[t, i] - mean
        var += d * d
    var /= np.float32(n)
    r = np.float32(1.0) / np.sqrt(var + eps)
    for i in range(n):
        out[j, i] = (x[t, i] - mean) * r * weight[l, i] + bias[l, i]


@njit(**JIT)
def add_bias(out, T, bias, l):
    for t in range(T):
        for i in range(out.shape[1]):
            out[t, i] += bias[l, i]


@njit(**JIT)
def gelu(h, T):
    """GELU with the tanh approximation, GPT-2's (Hendrycks & Gimpel 2016), in place."""
    for t in range(T):
        for i in range(h.shape[1]):
            x = h[t, i]
            h[t, i] = np.float32(0.5) * x * (np.float32(1.0) + np.tanh(_GELU_C * (x + np.float32(0.044715) * x * x * x)))


@njit(inline="always", **JIT)
def _linear(out, w, l, x, T, p):
    if T == 1:
        matmul(out, w, l, x, 0, p.parallel, p.blocked)
    else:
        gemm(out, w, l, x, T, p.parallel)


@entry
def forward(tokens, positions, slots, T, logit_rows, logits, weights, cache, scratch, params):
    """llama.forward's contract, for GPT-2 weights (GPT2Weights' fields; wcls (1, vocab, dim)).
    scratch.q is (rows, 3 * dim): the fused q/k/v projection."""
    w, s, p = GPT2Weights(*weights), Scratch(*scratch), GPT2Params(*params)
    key_pages, value_pages, block_table = cache
    n_layers, dim = w.ln_att.shape[0], s.x.shape[1]
    att_row = PAGE * block_table.shape[1]
    for t in range(T):
        for i in range(dim):  # token and position embeddings
            s.x[t, i] = w.token_embedding[tokens[t], i] + w.position_embedding[positions[t], i]

    for l in range(n_layers):
        # attention: x -> LayerNorm -> q|k|v -> cache -> attend -> c_proj -> residual
        for t in range(T):
            layernorm(s.xb, t, s.x, t, w.ln_att, w.ln_att_bias, l, p.eps)  # (dim,)
        _linear(s.q, w.wqkv, l, s.xb, T, p)  # (3 dim,)
        add_bias(s.q, T, w.bqkv, l)
        for t in range(T):
            for i in range(dim):
                s.k[t, i] = s.q[t, dim + i]
                s.v[t, i] = s.q[t, 2 * dim + i]
            pos = positions[t]
            store_kv(key_pages, value_pages, l, block_table[slots[t], pos // PAGE], pos % PAGE, s.k, s.v, t)
        attention_rows(s.att_out, s.q, key_pages, value_pages, l, block_table, slots, positions, T, s.att, att_row,
                       p.n_heads, p.parallel)  # (dim,)
        _linear(s.xb2, w.wo, l, s.att_out, T, p)
        add_bias(s.xb2, T, w.bo, l)
        residual(s.x, s.xb2, T)

        # MLP: x -> LayerNorm -> c_fc -> GELU -> c_proj -> residual
        for t in range(T):
            layernorm(s.xb, t, s.x, t, w.ln_ffn, w.ln_ffn_bias, l, p.eps)
        _linear(s.hb, w.w1, l, s.xb, T, p)  # (hidden,)
        add_bias(s.hb, T, w.b1, l)
        gelu(s.hb, T)
        _linear(s.xb2, w.w2, l, s.hb, T, p)  # (dim,)
        add_bias(s.xb2, T, w.b2, l)
        residual(s.x, s.xb2, T)

    R = logit_rows.shape[0]
    for j in range(R):
        layernorm(s.xb, j, s.x, logit_rows[j], w.ln_final, w.ln_final_bias, 0, p.eps)
    _linear(logits, w.wcls, 0, s.xb, R, p)  # (vocab,): the tied wte
