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
    """Write this position's key and value into one layer's caches, position-major like llama2.c's:
    (n_kv_heads, seq_len, head_size), so each score is a contiguous dot product in its order."""
    n_kv_heads, head_size = key_cache.shape[0], key_cache.shape[2]
    for g in range(n_kv_heads):
        for i in range(head_size):
            key_cache[g, pos, i] = k[g * head_size + i]
            value_cache[g, pos, i] = v[g * head_size + i]


@njit(**JIT)
def _attend_head(out, q, key_cache, value_cache, att, pos, h, n_heads, scale):
    """One head of llama2.c's attention: score_t = dot(q_h, k_t) * (1/sqrt(head_size)), softmax with
    element 0 peeled, then out_h = sum_t att[t] * v_t with one fused multiply-add per element."""
    n_kv_heads, seq_len, head_size = key_cache.shape
    kv = (h // (n_heads // n_kv_heads)) * seq_len * head_size  # flat offset of this head's cache
    n = pos + 1
    for t in range(n):
        att[t] = dot(q, h * head_size, key_cache, kv + t * head_size, head_size) * scale
    softmax(att, n, True)
    o = h * head_size
    for i in range(head_size):
        out[o + i] = 0.0
    for t in range(n):
        a = att[t]
        base = kv + t * head_size
        for i in range(head_size):
            out[o + i] = fma(a, value_cache.flat[base + i], out[o + i])


@njit(parallel=True, **JIT)
def attention(out, q, key_cache, value_cache, att, pos, n_heads, parallel):
    """Causal multi-head attention of one query position over cache positions 0..pos.

    q, out: (n_heads * head_size,); key_cache, value_cache: one layer's (n_kv_heads, seq_len,
    head_size); att: (n_heads, seq_len) scratch. Query head h reads kv head
    h // (n_heads / n_kv_heads) (grouped-query attention, Ainslie et al. 2023).
    """
    scale = inv_sqrt(f32(key_cache.shape[2]))  # score /= sqrtf(head_size), as compiled
    if parallel:
        for h in prange(n_heads):
            _attend_head(out, q, key_cache, value_cache, att[h], pos, h, n_heads, scale)
    else:
        for h in range(n_heads):
            _attend_head(out, q, key_cache, value_cache, att[h], pos, h, n_heads, scale)


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
