"""The Llama forward pass: run.c's `forward` over a block of token rows, from embedding to logits.

One Numba function serves every weight type. The weights' type picks the matmul at compile time
(`linear` and friends below): float32 arrays take the fp32 kernels (kernels.py, run.c's
arithmetic); quantized matrices (QMat) quantize each activation row to int8 first and take the
int8/int4 kernels (qkernels.py, runq's arithmetic). Everything else (norms, RoPE, attention, the
SwiGLU gate, residuals) is the same code for both, as it is in run.c and runq.c.

A call runs T token rows, each a (token, position, slot) of one of the state's sequences: decode
is T = 1, prefill is one sequence's consecutive positions, a batch step is one row per sequence.
Every row gets exactly the operations it would get alone, in the same order (attention reads a
row's own slot up to its own position), so the logits of a row never depend on what else is in
the block (batch invariance).
"""

from collections import namedtuple

from numba import njit, types
from numba.extending import overload

from ..simd.jit import JIT, entry
from .kernels import (attention_rows, gemm, gemm2, gemm3, matmul, matmul2, matmul3, residual, rmsnorm, rope, silu_mul,
                      store_kv)
from .qgemm import qgemm, transpose_block
from .qkernels import dequantize_row, qmatmul, qmatmul2, qmatmul3, quantize_activations
from .state import PAGE, Scratch

# The forward's arguments travel as plain tuples, named again inside (a namedtuple argument costs
# the dispatcher ~2 us more per call than a plain tuple: typed in Python, not C).
# The weights, with the same names as everywhere else. fp32: float32 arrays, layer matrices
# (L, rows, cols), rms_final (1, dim), wcls (1, vocab, dim). Quantized: norms the same; each
# matrix kind a tuple (data, offsets, scales): quant.QuantMatrix's arrays, the scales flat.
LlamaWeights = namedtuple("LlamaWeights", "token_embedding rms_att wq wk wv wo rms_ffn w1 w2 w3 rms_final wcls")
Params = namedtuple("Params", "n_heads eps parallel blocked gs bits rope_cos rope_sin")
# Quantized activations of one stream (dim-sized, or hidden-sized), flat: row t's values at
# xq[t * xq_row:], its scales and group sums at xs / xsum[t * xs_row:]; xt, xst, xsumt: the same
# rows laid out for qgemm.
Acts = namedtuple("Acts", "xq xq_row xs xs_row xsum xt xst xsumt")
QGEMM_MIN_ROWS = 4  # from this many rows on, quantized matmuls take qgemm's 16-token tiles


def _is_quantized(w) -> bool:
    return isinstance(w, types.BaseTuple)


# ------------------------------------------------------------------------------------------------
# The weight-type-dependent steps. Each is a stub overloaded per type; inlined into the forward.


def embed(x, t, w, token, p):
    """x[t] (dim,) = row `token` of the token embedding."""


@overload(embed, inline="always", jit_options=JIT)
def _embed(x, t, w, token, p):
    if _is_quantized(w):
        def impl(x, t, w, token, p):
            data, offsets, scales = w
            dequantize_row(x, t, data, offsets[0], scales, token, p.gs, p.bits)  # runq's dequantized table
    else:
        def impl(x, t, w, token, p):
            for i in range(x.shape[1]):
                x[t, i] = w[token, i]
    return impl


@njit(**JIT)
def _batched(T, p):
    """Whether a quantized matmul of T rows takes qgemm (any group size of 4 values per lane)."""
    return T >= QGEMM_MIN_ROWS and p.gs % 4 == 0 and (p.bits == 8 or p.gs % 8 == 0)


@njit(**JIT)
def _qgemm(out, w, l, x, T, a, p):
    """qgemm of rows x[:T] (prepared in a) by quantized matrix l of kind w."""
    data, offsets, scales = w
    qgemm(out, T, data, offsets, scales, l, a.xt, a.xst, a.xsumt, x.shape[1], p.gs, p.bits, p.parallel)


def prepare(w, x, T, a, p):
    """The activations a matmul by w reads from rows x[:T]: x itself for fp32; for quantized
    weights x quantized per group into a's arrays, as runq does before every matmul (and laid out
    for qgemm when the block is large enough)."""


@overload(prepare, inline="always", jit_options=JIT)
def _prepare(w, x, T, a, p):
    if _is_quantized(w):
        def impl(w, x, T, a, p):
            for t in range(T):
                quantize_activations(a.xq, t * a.xq_row, a.xs, t * a.xs_row, a.xsum, x, t, p.gs)
            if _batched(T, p):
                transpose_block(a.xt, a.xst, a.xsumt, a.xq, a.xq_row, a.xs, a.xsum, a.xs_row, T, x.shape[1], p.gs)
    else:
        def impl(w, x, T, a, p):
            pass
    return impl


def linear(out, w, l, x, T, a, p):
    """out[t] = w[l] @ x[t] for rows t < T (x given as prepared)."""


@overload(linear, inline="always", jit_options=JIT)
def _linear(out, w, l, x, T, a, p):
    if _is_quantized(w):
        def impl(out, w, l, x, T, a, p):
            if _batched(T, p):
                _qgemm(out, w, l, x, T, a, p)
            else:
                for t in range(T):
                    qmatmul(out, t, w, l, a.xq, t * a.xq_row, a.xs, t * a.xs_row, a.xsum, x.shape[1], p.gs, p.bits,
                            p.parallel)
    else:
        def impl(out, w, l, x, T, a, p):
            if T == 1:  # decode: one pass over the weights, memory-bound
                matmul(out, w, l, x, 0, p.parallel, p.blocked)
            else:  # a block of rows: tiles of rows x tokens, compute-bound
                gemm(out, w, l, x, T, p.parallel)
    return impl


def linear2(o1, o3, w1, w3, l, x, T, a, p):
    """o1[t], o3[t] = w1[l] @ x[t], w3[l] @ x[t]: SwiGLU's two up-projections, one parallel loop."""


@overload(linear2, inline="always", jit_options=JIT)
def _linear2(o1, o3, w1, w3, l, x, T, a, p):
    if _is_quantized(w1):
        def impl(o1, o3, w1, w3, l, x, T, a, p):
            if _batched(T, p):
                _qgemm(o1, w1, l, x, T, a, p)
                _qgemm(o3, w3, l, x, T, a, p)
            else:
                for t in range(T):
                    qmatmul2(o1, o3, t, w1, w3, l, a.xq, t * a.xq_row, a.xs, t * a.xs_row, a.xsum, x.shape[1], p.gs,
                             p.bits, p.parallel)
    else:
        def impl(o1, o3, w1, w3, l, x, T, a, p):
            if T == 1:
                matmul2(o1, o3, w1, w3, l, x, 0, p.parallel, p.blocked)
            else:
                gemm2(o1, o3, w1, w3, l, x, T, p.parallel)
    return impl


def linear3(q, k, v, wq, wk, wv, l, x, T, a, p):
    """q[t], k[t], v[t] = wq[l] @ x[t], wk[l] @ x[t], wv[l] @ x[t] in one parallel loop."""


@overload(linear3, inline="always", jit_options=JIT)
def _linear3(q, k, v, wq, wk, wv, l, x, T, a, p):
    if _is_quantized(wq):
        def impl(q, k, v, wq, wk, wv, l, x, T, a, p):
            if _batched(T, p):
                _qgemm(q, wq, l, x, T, a, p)
                _qgemm(k, wk, l, x, T, a, p)
                _qgemm(v, wv, l, x, T, a, p)
            else:
                for t in range(T):
                    qmatmul3(q, k, v, t, wq, wk, wv, l, a.xq, t * a.xq_row, a.xs, t * a.xs_row, a.xsum, x.shape[1],
                             p.gs, p.bits, p.parallel)
    else:
        def impl(q, k, v, wq, wk, wv, l, x, T, a, p):
            if T == 1:
                matmul3(q, k, v, wq, wk, wv, l, x, 0, p.parallel, p.blocked)
            else:
                gemm3(q, k, v, wq, wk, wv, l, x, T, p.parallel)
    return impl


# ------------------------------------------------------------------------------------------------


@entry
def forward(tokens, positions, slots, T, logit_rows, logits, weights, cache, scratch, params):
    """Run T token rows through the model, filling the KV cache; write the logits of logit_rows.

    tokens, positions, slots: (T,) int32, row t is token tokens[t] at position positions[t] of
    sequence slots[t]. logit_rows: ascending rows whose logits to compute, into logits (R, vocab).
    weights: LlamaWeights' fields; cache: (key_pages, value_pages, block_table) of a State;
    scratch: its Scratch's fields; params: Params' fields (all plain tuples). A sequence's rows must
    be in position order (causal attention inside the block).
    """
    w, s, p = LlamaWeights(*weights), Scratch(*scratch), Params(*params)
    key_pages, value_pages, block_table = cache
    n_layers = w.rms_att.shape[0]
    n_kv_heads, head_size = key_pages.shape[2], key_pages.shape[3]
    # quantized activations, flat: dim-sized rows (ax) and hidden-sized rows (ah)
    ax = Acts(s.xq.reshape(s.xq.size), s.xq.shape[1], s.xs.reshape(s.xs.size), s.xs.shape[1],
              s.xsum.reshape(s.xsum.size), s.xt, s.xst, s.xsumt)
    ah = Acts(s.hq.reshape(s.hq.size), s.hq.shape[1], s.hs.reshape(s.hs.size), s.hs.shape[1],
              s.hsum.reshape(s.hsum.size), s.xt, s.xst, s.xsumt)
    att_row = PAGE * block_table.shape[1]  # one head's scores in s.att
    for t in range(T):
        embed(s.x, t, w.token_embedding, tokens[t], p)  # (dim,)

    for l in range(n_layers):
        # attention: x -> rmsnorm -> q, k, v -> RoPE -> cache -> attend -> wo -> residual
        for t in range(T):
            rmsnorm(s.xb, t, s.x, t, w.rms_att, l, p.eps, True)  # (dim,)
        prepare(w.wq, s.xb, T, ax, p)
        linear3(s.q, s.k, s.v, w.wq, w.wk, w.wv, l, s.xb, T, ax, p)  # (q_dim,), (kv_dim,) x2
        for t in range(T):
            pos = positions[t]
            rope(s.q, t, p.n_heads, head_size, p.rope_cos, p.rope_sin, pos)
            rope(s.k, t, n_kv_heads, head_size, p.rope_cos, p.rope_sin, pos)
            store_kv(key_pages, value_pages, l, block_table[slots[t], pos // PAGE], pos % PAGE, s.k, s.v, t)
        attention_rows(s.att_out, s.q, key_pages, value_pages, l, block_table, slots, positions, T, s.att, att_row,
                       p.n_heads, p.parallel)  # (q_dim,)
        prepare(w.wo, s.att_out, T, ax, p)
        linear(s.xb2, w.wo, l, s.att_out, T, ax, p)  # (dim,)
        residual(s.x, s.xb2, T)

        # feed-forward: x -> rmsnorm -> SwiGLU -> w2 -> residual
        for t in range(T):
            rmsnorm(s.xb, t, s.x, t, w.rms_ffn, l, p.eps, True)  # (dim,)
        prepare(w.w1, s.xb, T, ax, p)
        linear2(s.hb, s.hb2, w.w1, w.w3, l, s.xb, T, ax, p)  # (hidden,), (hidden,)
        for t in range(T):
            silu_mul(s.hb, s.hb2, t)  # (hidden,)
        prepare(w.w2, s.hb, T, ah, p)
        linear(s.xb2, w.w2, l, s.hb, T, ah, p)  # (dim,)
        residual(s.x, s.xb2, T)

    # classifier, for the rows that want logits (rows only move down: j <= logit_rows[j])
    R = logit_rows.shape[0]
    for j in range(R):
        rmsnorm(s.xb, j, s.x, logit_rows[j], w.rms_final, 0, p.eps, False)  # (dim,)
    prepare(w.wcls, s.xb, R, ax, p)
    linear(logits, w.wcls, 0, s.xb, R, ax, p)  # (vocab,)
