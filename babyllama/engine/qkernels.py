"""Numba kernels of the quantized forward: activation quantization, int8/int4 matmuls, and the
float kernels of runq's forward, in the exact operations of runq's -Ofast build.

The math is llama2.c runq's: activations are quantized per group like the weights; each output
is the sum over groups of (exact int32 dot product of the group) * (w_scale * x_scale),
accumulated in float32 group after group. Quantization turns a one-ulp difference in an
activation into a different int8 value now and then, which then shows in the logits and, sooner
or later, in the tokens. So nothing here is compiled with fastmath, and every float step is the
one gcc -Ofast -march=native makes of runq.c (the build llama2.c recommends and the fixtures
come from): quantize() multiplies by 127/max and rounds with gcc's inline round, 1/sqrt is
rsqrtss + Newton, sums and dot products run in the vectorizer's lane order, expf is libmvec's in
vectorized loops, RoPE's powf becomes expf. ofast.py has the primitives and says why. Result:
bit-identical logits to that runq build at every position (checked against the C program on
llama2.c's and babyllama's v2 files, odd dims, GQA and untied classifiers; see the README).

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

from .ofast import (
    dot,
    exp8,
    exp16,
    f32,
    fma,
    inv_sqrt,
    newton_recip,
    rcp8,
    rcp16,
    softmax,
)
from .q4kernels import row_q4

# No fastmath: runq's float order is part of the format's contract (see the module docstring).
QJIT = dict(cache=True, nogil=True, error_model="numpy", fastmath=False)


_INV_127 = np.float32(0.007874015718698502)  # 1/127 in float32, what gcc makes of "/ 127.0f"
_JUST_BELOW_HALF = np.float32(0.49999997)  # gcc's inline round(): trunc(v + copysign(this, v))


@njit(**QJIT)
def quantize_activations(xq, xs, x, gs):
    """runq's quantize() as compiled: xq (n,) int8, xs (n/gs,) float32 from x (n,) float32.

    Per group: scale = max|x| * (1/127); q = round(x * (127 / max|x|)), with gcc's inline round
    (add 0.49999997 with x's sign, truncate; in float32). A group of zeros gets scale 0, q = 0.
    """
    for g in range(x.shape[0] // gs):
        wmax = np.float32(0.0)
        for i in range(g * gs, (g + 1) * gs):
            wmax = max(wmax, abs(x[i]))
        xs[g] = wmax * _INV_127
        if wmax == 0:
            for i in range(g * gs, (g + 1) * gs):
                xq[i] = 0
            continue
        inv = np.float32(127.0) / wmax
        for i in range(g * gs, (g + 1) * gs):
            v = x[i] * inv
            r = v + (_JUST_BELOW_HALF if v >= 0 else -_JUST_BELOW_HALF)
            xq[i] = np.int8(np.int32(r))


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


@njit(**QJIT)
def _row_q8(data, base, xq, xs, scales, sbase, gs):
    """One output of an int8 matmul: the row's int8 values start at data[base]."""
    n = xq.shape[0]
    w = data[base : base + n]
    val = np.float32(0.0)
    if gs == 64:  # literal trip count: one fully vectorized block per group
        for g in range(n // 64):
            val += np.float32(_group_q8(w, xq, g * 64, 64)) * (scales[sbase + g] * xs[g])
    else:
        for g in range(n // gs):
            val += np.float32(_group_q8(w, xq, g * gs, gs)) * (scales[sbase + g] * xs[g])
    return val


@njit(inline="always", **QJIT)
def _row(data, offset, i, xq, xs, scales, gs, bits):
    n = xq.shape[0]
    if bits == 8:
        return _row_q8(data, offset + i * n, xq, xs, scales, i * (n // gs), gs)
    return row_q4(data, offset + i * (n // 2), xq, xs, scales, i * (n // gs), gs)  # q4kernels.py


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


@njit(parallel=True, **QJIT)
def qmatmul2(h1, h3, d1, o1, s1, d3, o3, s3, xq, xs, gs, bits, parallel):
    """h1, h3 = W1 @ x, W3 @ x (SwiGLU's two up-projections) in one parallel loop over the rows.

    The gate is applied afterwards (silu_mul_runq): gcc compiles it differently in each block of
    16, so it runs over the whole vector rather than fused into the rows.
    """
    if parallel:
        for i in prange(h1.shape[0]):
            h1[i] = _row(d1, o1, i, xq, xs, s1, gs, bits)
            h3[i] = _row(d3, o3, i, xq, xs, s3, gs, bits)
    else:
        for i in range(h1.shape[0]):
            h1[i] = _row(d1, o1, i, xq, xs, s1, gs, bits)
            h3[i] = _row(d3, o3, i, xq, xs, s3, gs, bits)


# ---------------------------------------------------------------------------------------------
# runq's float kernels as gcc -Ofast -march=native compiles them (primitives and loop shapes: ofast.py)


@njit(**QJIT)
def rmsnorm_runq(out, x, weight, eps, in_layer):
    """runq's rmsnorm: ss = sum(x^2) (vectorized), r = 1/sqrt(ss/n + eps) (rsqrtss + Newton).

    gcc compiles the two inlined copies differently: inside a layer (in_layer) ss/n + eps is one
    fused multiply-add with 1/n and the output is (x * w) * r for whole 16-blocks, (r * x) * w
    after them; the final norm divides, adds, and computes (x * w) * r throughout.
    """
    n = x.shape[0]
    ss = dot(x, 0, x, 0, n)
    if in_layer:
        ss = fma(ss, f32(1.0) / f32(n), eps)
    else:
        ss = ss / f32(n) + eps
    r = inv_sqrt(ss)
    vec_end = 16 * (n // 16) if in_layer else n
    for j in range(vec_end):
        out[j] = (x[j] * weight[j]) * r
    for j in range(vec_end, n):
        out[j] = (r * x[j]) * weight[j]


@njit(**QJIT)
def silu_mul_runq(hb, hb2):
    """hb = silu(hb) * hb2 in place, runq's SwiGLU loop as compiled: whole 16-blocks get libmvec's
    expf and rcp14 + Newton for 1 / (1 + e^-x) and compute (inv * x) * x3; an 8-block gets the
    8-lane expf and rcpps + Newton and computes inv * (x * x3); the tail gets libm's expf and a
    true division, also inv * (x * x3)."""
    n = hb.shape[0]
    t = np.empty(16, np.float32)
    d = np.empty(16, np.float32)
    n16 = n // 16
    for c in range(n16 + 1):
        base = 16 * c
        width = 16 if c < n16 else (8 if n - base >= 8 else 0)
        if width == 0:
            break
        for j in range(width):
            t[j] = -hb[base + j]
        if width == 16:
            exp16(t, 0)
        else:
            exp8(t, 0)
        for j in range(width):
            t[j] = t[j] + f32(1.0)
            d[j] = t[j]
        if width == 16:
            rcp16(t, 0)
        else:
            rcp8(t, 0)
        for j in range(width):
            inv = newton_recip(t[j], d[j])
            if width == 16:
                hb[base + j] = (inv * hb[base + j]) * hb2[base + j]
            else:
                hb[base + j] = inv * (hb[base + j] * hb2[base + j])
    start = 16 * n16 + (8 if n - 16 * n16 >= 8 else 0)
    for j in range(start, n):
        inv = f32(1.0) / (np.exp(-hb[j]) + f32(1.0))
        hb[j] = inv * (hb[j] * hb2[j])


@njit(**QJIT)
def store_kv_runq(key_cache, value_cache, k, v, pos):
    """Write this position's key and value into one layer's caches, position-major like runq's:
    (n_kv_heads, seq_len, head_size), so each score is a contiguous dot product in runq's order."""
    n_kv_heads, head_size = key_cache.shape[0], key_cache.shape[2]
    for g in range(n_kv_heads):
        for i in range(head_size):
            key_cache[g, pos, i] = k[g * head_size + i]
            value_cache[g, pos, i] = v[g * head_size + i]


@njit(**QJIT)
def _attend_head_runq(out, q, key_cache, value_cache, att, pos, h, n_heads, scale):
    """One head of runq's attention: score_t = dot(q_h, k_t) * (1/sqrt(head_size)), softmax with
    element 0 peeled, then out_h = sum_t att[t] * v_t with one fused multiply-add per element."""
    n_kv_heads, head_size = key_cache.shape[0], key_cache.shape[2]
    g = h // (n_heads // n_kv_heads)
    kh = key_cache[g]  # (seq_len, head_size)
    vh = value_cache[g]
    n = pos + 1
    for t in range(n):
        att[t] = dot(q, h * head_size, kh[t], 0, head_size) * scale
    softmax(att, n, True)
    o = h * head_size
    for i in range(head_size):
        out[o + i] = 0.0
    for t in range(n):
        a = att[t]
        v_t = vh[t]
        for i in range(head_size):
            out[o + i] = fma(a, v_t[i], out[o + i])


@njit(parallel=True, **QJIT)
def attention_runq(out, q, key_cache, value_cache, att, pos, n_heads, parallel):
    """Causal attention of one position over a layer's position-major caches (runq's order)."""
    scale = inv_sqrt(f32(key_cache.shape[2]))  # runq's score /= sqrtf(head_size), as compiled
    if parallel:
        for h in prange(n_heads):
            _attend_head_runq(out, q, key_cache, value_cache, att[h], pos, h, n_heads, scale)
    else:
        for h in range(n_heads):
            _attend_head_runq(out, q, key_cache, value_cache, att[h], pos, h, n_heads, scale)


@njit(**QJIT)
def rope_table_runq(seq_len, head_size, ln_theta):
    """cos/sin (seq_len, head_size/2) of runq's RoPE angles as compiled: 1/powf(10000, d/hs)
    becomes expf(-(d * (1/hs)) * ln_theta), ln_theta the float32 log of 10000 that gcc folds;
    the angle is freq * pos; then libm's sincosf."""
    cos = np.empty((seq_len, head_size // 2), np.float32)
    sin = np.empty((seq_len, head_size // 2), np.float32)
    inv_hs = f32(1.0) / f32(head_size)
    for i in range(head_size // 2):
        freq = np.exp(-(f32(2 * i) * inv_hs) * ln_theta)
        for pos in range(seq_len):
            val = freq * f32(pos)
            cos[pos, i] = np.cos(val)
            sin[pos, i] = np.sin(val)
    return cos, sin
