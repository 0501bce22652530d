"""The float building blocks of the forward passes, in the operations llama2.c's build performs.

run.c and runq.c share rmsnorm, RoPE, attention and the SwiGLU gate, and llama2.c is built with
gcc -Ofast -march=native, which compiles them into specific vectorized operations (ofast.py says
which and why). These kernels perform exactly those, so the fp32 engine's logits are run.c's bit
for bit and the quantized engine's are runq's. No fastmath: it would let LLVM reorder the very
sums that are ordered here on purpose. `cache=True` keeps the machine code on disk so only the
first-ever run pays compile time.

Parallel kernels take a `parallel` flag: tiny models (stories260K) run faster on one thread,
because waking the thread pool (~1-2 us) costs more than a 64x64 matrix-vector product. The
serial branch never touches the thread pool.
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

JIT = dict(cache=True, nogil=True, error_model="numpy", fastmath=False)


@njit(parallel=True, **JIT)
def matmul(out, w, x, parallel):
    """out (n,) = w (n, d) @ x (d,) -- the matrix-vector product that is ~all of decode time.

    Each row is run.c's `val += w[i * n + j] * x[j]` as -Ofast vectorizes it (ofast.dot)."""
    d = x.shape[0]
    if parallel:  # rows addressed by flat offset: a row slice in the prange body would keep an
        for i in prange(out.shape[0]):  # atomic reference count that the threads fight over
            out[i] = dot(w, i * d, x, 0, d)
    else:
        for i in range(out.shape[0]):
            out[i] = dot(w, i * d, x, 0, d)


@njit(parallel=True, **JIT)
def matmul3(q, k, v, wq, wk, wv, x, parallel):
    """q, k, v = wq @ x, wk @ x, wv @ x in one parallel loop over all their rows: one thread-pool
    launch instead of three (a launch costs microseconds, a 15M model's q/k/v rows tens)."""
    d = x.shape[0]
    nq, nk = q.shape[0], k.shape[0]
    if parallel:
        for r in prange(nq + 2 * nk):
            if r < nq:
                q[r] = dot(wq, r * d, x, 0, d)
            elif r < nq + nk:
                k[r - nq] = dot(wk, (r - nq) * d, x, 0, d)
            else:
                v[r - nq - nk] = dot(wv, (r - nq - nk) * d, x, 0, d)
    else:
        for r in range(nq):
            q[r] = dot(wq, r * d, x, 0, d)
        for r in range(nk):
            k[r] = dot(wk, r * d, x, 0, d)
            v[r] = dot(wv, r * d, x, 0, d)


@njit(parallel=True, **JIT)
def matmul2(out1, out3, w1, w3, x, parallel):
    """out1, out3 = w1 @ x, w3 @ x (SwiGLU's two up-projections) in one parallel loop."""
    d = x.shape[0]
    if parallel:
        for i in prange(out1.shape[0]):
            out1[i] = dot(w1, i * d, x, 0, d)
            out3[i] = dot(w3, i * d, x, 0, d)
    else:
        for i in range(out1.shape[0]):
            out1[i] = dot(w1, i * d, x, 0, d)
            out3[i] = dot(w3, i * d, x, 0, d)


@njit(**JIT)
def rope(vec, n_heads, head_size, cos, sin):
    """Rotate each (even, odd) pair of every head by the position's angle (RoPE, Su et al. 2021).

    llama2.c's convention: pairs are interleaved (x[2i], x[2i+1]); cos/sin are (head_size/2,).
    The products are rounded before the add, as gcc's vaddsubps does.
    """
    for h in range(n_heads):
        base = h * head_size
        for i in range(head_size // 2):
            v0 = vec[base + 2 * i]
            v1 = vec[base + 2 * i + 1]
            vec[base + 2 * i] = v0 * cos[i] - v1 * sin[i]
            vec[base + 2 * i + 1] = v0 * sin[i] + v1 * cos[i]




@njit(**JIT)
def rmsnorm(out, x, weight, eps, in_layer):
    """out = weight * x / sqrt(mean(x^2) + eps) (Zhang & Sennrich 2019), as compiled:
    ss = sum(x^2) (vectorized), r = 1/sqrt(ss/n + eps) (rsqrtss + Newton).

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


@njit(**JIT)
def silu_mul(hb, hb2):
    """hb = silu(hb) * hb2 in place (the SwiGLU gate, Shazeer 2020), llama2.c's loop as compiled: whole 16-blocks get libmvec's
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


@njit(**JIT)
def store_kv(key_cache, value_cache, k, v, pos):
    """Write this position's key and value into one layer's caches: keys head-major
    (n_kv_heads, head_size, seq_len), values position-major (n_kv_heads, seq_len, head_size).

    Each layout makes its half of the attention a contiguous loop that keeps llama2.c's order:
    the scores vectorize across positions, the weighted sum across the head's dimensions.
    """
    n_kv_heads, head_size = key_cache.shape[0], key_cache.shape[1]
    for g in range(n_kv_heads):
        for i in range(head_size):
            key_cache[g, i, pos] = k[g * head_size + i]
            value_cache[g, pos, i] = v[g * head_size + i]


@njit(**JIT)
def _scores(att, lanes, q, qo, kh, n):
    """att[t] = dot(q[qo:qo+hs], k_t) for t < n, in ofast.dot's order, for all t at once.

    kh: (head_size, seq_len), one kv head's keys. lanes: (16, seq_len) scratch holding the
    16-lane accumulator of every position (lane l sums dims 16c + l), so every step is a loop
    over positions that vectorizes, and each position still gets exactly gcc's sum.
    """
    head_size = kh.shape[0]
    n16 = head_size // 16
    j = 16 * n16
    has8 = head_size - j >= 8
    if n16 == 0:  # small heads (stories260K: 8): no 16-lane block, one pass over the positions
        if has8:
            q0, q1, q2, q3, q4, q5, q6, q7 = q[qo], q[qo + 1], q[qo + 2], q[qo + 3], q[qo + 4], q[qo + 5], q[qo + 6], q[qo + 7]
            k0, k1, k2, k3, k4, k5, k6, k7 = kh[0], kh[1], kh[2], kh[3], kh[4], kh[5], kh[6], kh[7]
            for t in range(n):  # fma(q, k, 0) is the rounded product; then the fold
                att[t] = ((q7 * k7[t] + q3 * k3[t]) + (q5 * k5[t] + q1 * k1[t])) + (
                    (q6 * k6[t] + q2 * k2[t]) + (q4 * k4[t] + q0 * k0[t]))
            j = 8
        else:
            for t in range(n):
                att[t] = 0.0
    else:
        for l in range(16):  # the first block's products start the lanes (fma(q, k, 0) = q * k)
            qi = q[qo + l]
            k_i = kh[l]
            acc = lanes[l]
            for t in range(n):
                acc[t] = qi * k_i[t]
        for c in range(1, n16):
            for l in range(16):
                qi = q[qo + 16 * c + l]
                k_i = kh[16 * c + l]
                acc = lanes[l]
                for t in range(n):
                    acc[t] = fma(qi, k_i[t], acc[t])
        for l in range(8):  # high half onto low half, then the 8-lane step
            hi, lo = lanes[l + 8], lanes[l]
            for t in range(n):
                lo[t] = hi[t] + lo[t]
        if has8:
            for l in range(8):
                qi = q[qo + j + l]
                k_i = kh[j + l]
                acc = lanes[l]
                for t in range(n):
                    acc[t] = fma(qi, k_i[t], acc[t])
            j += 8
        v0, v1, v2, v3, v4, v5, v6, v7 = lanes[0], lanes[1], lanes[2], lanes[3], lanes[4], lanes[5], lanes[6], lanes[7]
        for t in range(n):
            att[t] = ((v7[t] + v3[t]) + (v5[t] + v1[t])) + ((v6[t] + v2[t]) + (v4[t] + v0[t]))  # the fold of ofast._reduce_ir
    for m in range(j, head_size):  # the last < 8 dims, one by one
        qi = q[qo + m]
        k_i = kh[m]
        for t in range(n):
            att[t] = fma(qi, k_i[t], att[t])


@njit(**JIT)
def _head_weights(att, lanes, q, key_cache, pos, h, n_heads, scale):
    """att[:pos+1] = softmax(q_h . k_t * (1/sqrt(head_size))), llama2.c's scores and softmax (with
    element 0 peeled, as gcc compiles the one inlined into forward)."""
    n_kv_heads, head_size = key_cache.shape[0], key_cache.shape[1]
    n = pos + 1
    _scores(att, lanes, q, h * head_size, key_cache[h // (n_heads // n_kv_heads)], n)
    for t in range(n):
        att[t] *= scale
    softmax(att, n, True)


@njit(**JIT)
def _weighted_sum(out, att, value_cache, pos, h, n_heads):
    """out_h = sum_t att[t] * v_t, one fused multiply-add per element, t in order."""
    n_kv_heads, head_size = value_cache.shape[0], value_cache.shape[2]
    vh = value_cache[h // (n_heads // n_kv_heads)]  # (seq_len, head_size)
    o = h * head_size
    for i in range(head_size):
        out[o + i] = 0.0
    for t in range(pos + 1):
        a = att[t]
        v_t = vh[t]
        for i in range(head_size):
            out[o + i] = fma(a, v_t[i], out[o + i])


@njit(parallel=True, **JIT)
def attention(out, q, key_cache, value_cache, att, att_lanes, pos, n_heads, parallel):
    """Causal multi-head attention of one query position over cache positions 0..pos.

    q, out: (n_heads * head_size,); key_cache (n_kv_heads, head_size, seq_len) and value_cache
    (n_kv_heads, seq_len, head_size): one layer's (store_kv). att (n_heads, seq_len) and
    att_lanes (n_heads, 16, seq_len): scratch. Query head h reads kv head
    h // (n_heads / n_kv_heads) (grouped-query attention, Ainslie et al. 2023).
    """
    scale = inv_sqrt(f32(key_cache.shape[1]))  # score /= sqrtf(head_size), as compiled
    if parallel:
        for h in prange(n_heads):
            _head_weights(att[h], att_lanes[h], q, key_cache, pos, h, n_heads, scale)
            _weighted_sum(out, att[h], value_cache, pos, h, n_heads)
    else:
        for h in range(n_heads):
            _head_weights(att[h], att_lanes[h], q, key_cache, pos, h, n_heads, scale)
        # All heads' weighted sums advance together, position by position: each element's chain of
        # fused multiply-adds keeps its order, and the heads' independent chains overlap (one
        # small head alone is a latency-bound chain of pos+1 dependent FMAs).
        n_kv_heads, head_size = value_cache.shape[0], value_cache.shape[2]
        kv_mul = n_heads // n_kv_heads
        for i in range(out.shape[0]):
            out[i] = 0.0
        for t in range(pos + 1):
            for h in range(n_heads):
                a = att[h, t]
                v_t = value_cache[h // kv_mul, t]
                o = h * head_size
                for i in range(head_size):
                    out[o + i] = fma(a, v_t[i], out[o + i])


@njit(**JIT)
def rope_table(seq_len, head_size, ln_theta):
    """cos/sin (seq_len, head_size/2) of llama2.c's RoPE angles as compiled: 1/powf(10000, d/hs)
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
