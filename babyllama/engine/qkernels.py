"""Numba kernels of the quantized forward: activation quantization, int8/int4 matmuls, and the
float kernels of runq's forward in runq's exact order.

The math is llama2.c runq's, as its C source reads: activations are quantized per group like the
weights; each output is the sum over groups of (exact int32 dot product of the group) * w_scale
* x_scale, accumulated in float32 group after group. Quantization turns a one-ulp difference in
an activation into a different int8 value now and then, which then shows in the logits: so
here, unlike the fp32 engine, nothing is compiled with fastmath, and rmsnorm, RoPE, attention
and softmax have runq-order twins below. The result is bit-identical logits to runq compiled
with llama2.c's default flags (`make run`: -O3). A -Ofast -march=native runq differs from both
(rsqrt + Newton for 1/sqrt, x * (127/max) for x / scale, libmvec expf, reordered sums).

Why the matmul loops look the way they do (measured on AVX-512 VNNI, see `babyllama bench`):
- Integer sums are exact in any order, so LLVM vectorizes a group's int8 products freely
  (vpmovsxbw + vpdpwssd) without fastmath, while the float part keeps runq's order.
- Products are truncated to int32 as they are summed (`np.int32(acc + ...)`): Numba types
  int32 * int32 as int64, and the truncation lets LLVM keep 16-bit products and 32-bit sums.
- Indices are cast to uint64: Numba checks signed indices for negative wraparound, and that
  select stops the loop from vectorizing.
- Group size 64 (the default for dim-768-like models) gets a loop with a literal trip count;
  other sizes use the runtime-trip-count loop. (A literal 32 is worse: LLVM fully unrolls it into
  scalar code before the vectorizer sees it.)
- Parallel loops call a row function rather than slicing inside the prange body: a slice there
  keeps an atomic reference count that the two threads fight over.
"""

import numpy as np
from numba import njit, prange

from ..sampler import softmax_inplace

# No fastmath: runq's float order is part of the format's contract (see the module docstring).
QJIT = dict(cache=True, nogil=True, error_model="numpy", fastmath=False)


@njit(**QJIT)
def quantize_activations(xq, xs, x, gs):
    """runq's quantize(): xq (n,) int8, xs (n/gs,) float32 from x (n,) float32.

    scale = max|x| / 127 per group; q = round(x / scale), rounding halves away from zero like C's
    round() (in float64, where x/scale + 0.5 is exact). A group of zeros gets scale 0, q = 0.
    """
    for g in range(x.shape[0] // gs):
        wmax = np.float32(0.0)
        for i in range(g * gs, (g + 1) * gs):
            wmax = max(wmax, abs(x[i]))
        scale = wmax / np.float32(127.0)
        xs[g] = scale
        for i in range(g * gs, (g + 1) * gs):
            if scale > 0:
                v = np.float64(x[i] / scale)  # float32 quotient, as runq computes it
                r = np.floor(abs(v) + 0.5)
                xq[i] = np.int8(r if v >= 0 else -r)
            else:
                xq[i] = 0


@njit(**QJIT)
def dequantize_row(out, data, offset, scales, row, gs, bits):
    """out (cols,) = row `row` of one quantized matrix, float32 (q * scale, like runq's dequantize)."""
    cols = out.shape[0]
    if bits == 8:
        base = offset + row * cols
        for j in range(cols):
            out[j] = np.float32(data[base + j]) * scales[(row * cols + j) // gs]
    else:
        half = gs // 2
        base = offset + row * cols // 2
        for g in range(cols // gs):
            s = scales[(row * cols) // gs + g]
            for j in range(half):
                b = np.int32(data[base + g * half + j])
                out[g * gs + j] = np.float32((b & 15) - 8) * s
                out[g * gs + half + j] = np.float32(((b >> 4) & 15) - 8) * s


@njit(inline="always", **QJIT)
def _group_q8(w, x, o, gs):
    """Exact int32 sum of w[o:o+gs] * x[o:o+gs] (int8 values)."""
    acc = np.int32(0)
    for k in range(gs):
        i = np.uint64(o + k)
        acc = np.int32(acc + np.int32(w[i]) * np.int32(x[i]))
    return acc


@njit(inline="always", **QJIT)
def _group_q4(w, x, ob, ox, half):
    """Exact int32 sum over one int4 group: bytes w[ob:ob+half] against x[ox:ox+2*half].

    Byte j holds value j (low nibble) and value j + half (high nibble), each stored as q + 8.
    """
    acc = np.int32(0)
    for j in range(half):
        b = np.int32(w[np.uint64(ob + j)])
        lo = np.int32((b & 15) - 8)
        hi = np.int32(((b >> 4) & 15) - 8)
        acc = np.int32(acc + lo * np.int32(x[np.uint64(ox + j)]) + hi * np.int32(x[np.uint64(ox + half + j)]))
    return acc


@njit(**QJIT)
def _row_q8(data, base, xq, xs, scales, sbase, gs):
    """One output of an int8 matmul: the row's int8 values start at data[base]."""
    n = xq.shape[0]
    w = data[base : base + n]
    val = np.float32(0.0)
    if gs == 64:  # literal trip count: one fully vectorized block per group
        for g in range(n // 64):
            val += np.float32(_group_q8(w, xq, g * 64, 64)) * scales[sbase + g] * xs[g]
    else:
        for g in range(n // gs):
            val += np.float32(_group_q8(w, xq, g * gs, gs)) * scales[sbase + g] * xs[g]
    return val


@njit(**QJIT)
def _row_q4(data, base, xq, xs, scales, sbase, gs):
    """One output of an int4 matmul: the row's packed bytes start at data[base]."""
    n = xq.shape[0]
    w = data[base : base + n // 2]
    half = gs // 2
    val = np.float32(0.0)
    if gs == 64:  # literal trip count, as for int8
        for g in range(n // 64):
            val += np.float32(_group_q4(w, xq, g * 32, g * 64, 32)) * scales[sbase + g] * xs[g]
    else:
        for g in range(n // gs):
            val += np.float32(_group_q4(w, xq, g * half, g * gs, half)) * scales[sbase + g] * xs[g]
    return val


@njit(inline="always", **QJIT)
def _row(data, offset, i, xq, xs, scales, gs, bits):
    n = xq.shape[0]
    if bits == 8:
        return _row_q8(data, offset + i * n, xq, xs, scales, i * (n // gs), gs)
    return _row_q4(data, offset + i * (n // 2), xq, xs, scales, i * (n // gs), gs)


@njit(parallel=True, **QJIT)
def qmatmul(out, data, offset, scales, xq, xs, gs, bits, parallel):
    """out (rows,) = W @ x for one quantized matrix W (rows, n) at data[offset], x given as (xq, xs).

    scales: that matrix's (rows * n / gs,) float32 scales.
    """
    if parallel:
        for i in prange(out.shape[0]):
            out[i] = _row(data, offset, i, xq, xs, scales, gs, bits)
    else:
        for i in range(out.shape[0]):
            out[i] = _row(data, offset, i, xq, xs, scales, gs, bits)


@njit(parallel=True, **QJIT)
def qmatmul3(q, k, v, dq, oq, sq, dk, ok, sk, dv, ov, sv, xq, xs, gs, bits, parallel):
    """q, k, v = Wq @ x, Wk @ x, Wv @ x in one parallel loop over all their rows.

    One thread-pool launch instead of three: at ~5 us a launch and 85 launches a token, the
    launches cost the 110M model about a tenth of its int8 decode time.
    """
    nq, nk = q.shape[0], k.shape[0]
    if parallel:
        for r in prange(nq + 2 * nk):
            if r < nq:
                q[r] = _row(dq, oq, r, xq, xs, sq, gs, bits)
            elif r < nq + nk:
                k[r - nq] = _row(dk, ok, r - nq, xq, xs, sk, gs, bits)
            else:
                v[r - nq - nk] = _row(dv, ov, r - nq - nk, xq, xs, sv, gs, bits)
    else:
        for r in range(nq):
            q[r] = _row(dq, oq, r, xq, xs, sq, gs, bits)
        for r in range(nk):
            k[r] = _row(dk, ok, r, xq, xs, sk, gs, bits)
            v[r] = _row(dv, ov, r, xq, xs, sv, gs, bits)


@njit(inline="always", **QJIT)
def _silu_mul(a, b):
    return a * (np.float32(1.0) / (np.float32(1.0) + np.exp(-a))) * b  # silu(a) * b, as runq


@njit(parallel=True, **QJIT)
def qswiglu(hb, d1, o1, s1, d3, o3, s3, xq, xs, gs, bits, parallel):
    """hb = silu(W1 @ x) * (W3 @ x), both matrices quantized, one pass over the rows."""
    if parallel:
        for i in prange(hb.shape[0]):
            hb[i] = _silu_mul(_row(d1, o1, i, xq, xs, s1, gs, bits), _row(d3, o3, i, xq, xs, s3, gs, bits))
    else:
        for i in range(hb.shape[0]):
            hb[i] = _silu_mul(_row(d1, o1, i, xq, xs, s1, gs, bits), _row(d3, o3, i, xq, xs, s3, gs, bits))


# ---------------------------------------------------------------------------------------------
# runq-order float kernels: the same math as kernels.py, in C's evaluation order, no fastmath

@njit(**QJIT)
def rmsnorm_exact(out, x, weight, eps):
    """out = weight * (x / sqrt(mean(x^2) + eps)), summing squares left to right like runq."""
    ss = np.float32(0.0)
    for j in range(x.shape[0]):
        ss += x[j] * x[j]
    ss /= np.float32(x.shape[0])
    ss += eps
    ss = np.float32(1.0) / np.sqrt(ss)
    for j in range(x.shape[0]):
        out[j] = weight[j] * (ss * x[j])


@njit(**QJIT)
def softmax_exact(x, n):
    """In-place softmax of x[:n] with libm's expf and a true division, like runq (the sampler's)."""
    softmax_inplace(x[:n])


@njit(**QJIT)
def _attend_head_exact(out, q, key_cache, value_cache, att, pos, h, n_heads):
    """One head of runq's attention: each score summed over i in order, then divided by
    sqrt(head_size); each output sums att[t] * v[t] over t in order.

    key_cache (n_kv_heads, head_size, seq_len) is head-major, so the scores' sums run across
    positions innermost; value_cache (n_kv_heads, seq_len, head_size) is position-major, as in
    runq, so the weighted sum runs across dimensions innermost. Both keep runq's summation order
    and still vectorize (a head-major value cache makes this loop strided and ~20x slower).
    """
    n_kv_heads, head_size = key_cache.shape[0], key_cache.shape[1]
    kh = key_cache[h // (n_heads // n_kv_heads)]  # (head_size, seq_len)
    vh = value_cache[h // (n_heads // n_kv_heads)]  # (seq_len, head_size)
    n = pos + 1
    for t in range(n):
        att[t] = 0.0
    for i in range(head_size):
        qi = q[h * head_size + i]
        k_i = kh[i]
        for t in range(n):
            att[t] += qi * k_i[t]
    denom = np.sqrt(np.float32(head_size))
    for t in range(n):
        att[t] /= denom
    softmax_exact(att, n)
    o = out[h * head_size : (h + 1) * head_size]
    for i in range(head_size):
        o[i] = 0.0
    for t in range(n):
        a = att[t]
        v_t = vh[t]
        for i in range(head_size):
            o[i] += a * v_t[i]


@njit(**QJIT)
def store_kv_exact(key_cache, value_cache, k, v, pos):
    """Write this position's key (head-major cache) and value (position-major cache), one layer."""
    n_kv_heads, head_size = key_cache.shape[0], key_cache.shape[1]
    for g in range(n_kv_heads):
        for i in range(head_size):
            key_cache[g, i, pos] = k[g * head_size + i]
            value_cache[g, pos, i] = v[g * head_size + i]


@njit(parallel=True, **QJIT)
def attention_exact(out, q, key_cache, value_cache, att, pos, n_heads, parallel):
    """kernels.attention in runq's order (see _attend_head_exact)."""
    if parallel:
        for h in prange(n_heads):
            _attend_head_exact(out, q, key_cache, value_cache, att[h], pos, h, n_heads)
    else:
        for h in range(n_heads):
            _attend_head_exact(out, q, key_cache, value_cache, att[h], pos, h, n_heads)
