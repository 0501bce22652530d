"""The numeric building blocks of the forward pass, compiled by Numba.

Each kernel is the loop run.c writes in C. `fastmath` lets LLVM reorder float sums so the
inner dot products vectorize (run.c is built with -Ofast for the same reason); `cache=True`
keeps the machine code on disk so only the first-ever run pays compile time.

Parallel kernels take a `parallel` flag: tiny models (stories260K) run faster on one thread,
because waking the thread pool (~1-2 us) costs more than a 64x64 matrix-vector product. The
serial branch never touches the thread pool.
"""

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

JIT = dict(cache=True, fastmath=True, nogil=True, error_model="numpy")


@njit(inline="always", **JIT)
def dot(w, x):
    """w . x for two float32 vectors of the same length, accumulated in float32 like run.c."""
    acc = np.float32(0.0)
    for j in range(x.shape[0]):
        acc += w[j] * x[j]
    return acc


@njit(parallel=True, **JIT)
def matmul(out, w, x, parallel):
    """out (n,) = w (n, d) @ x (d,) -- the matrix-vector product that is ~all of decode time."""
    n = out.shape[0]
    if parallel:
        for i in prange(n):
            out[i] = dot(w[i], x)
    else:
        for i in range(n):
            out[i] = dot(w[i], x)


@njit(**JIT)
def rmsnorm(out, x, weight, eps):
    """out = weight * x / sqrt(mean(x^2) + eps)  (Zhang & Sennrich 2019)."""
    ss = np.float32(0.0)
    for j in range(x.shape[0]):
        ss += x[j] * x[j]
    ss = np.float32(1.0) / np.sqrt(ss / np.float32(x.shape[0]) + eps)
    for j in range(x.shape[0]):
        out[j] = weight[j] * (ss * x[j])


@intrinsic
def _float_from_bits(typingctx, bits):
    """Reinterpret an int32's bits as a float32 (a bitcast LLVM can vectorize, unlike ldexp)."""
    if bits != types.int32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.int32), codegen


@njit(inline="always", **JIT)
def fast_exp(x):
    """exp(x) for float32 x <= 0 (softmax inputs), to about 1 ulp, in code LLVM can vectorize.

    libm's expf is an opaque call that keeps the softmax loop scalar; run.c gets vector expf
    from -Ofast + glibc's libmvec. Method (Cody-Waite / Cephes): x = n ln2 + r, |r| <= ln2/2,
    e^r by a degree-6 Taylor polynomial, 2^n by writing n into the float's exponent bits.
    """
    x = max(x, np.float32(-87.0))  # below this e^x underflows float32's normal range: ~0 anyway
    n = np.floor(x * np.float32(1.44269504) + np.float32(0.5))  # round(x / ln2)
    r = x - n * np.float32(0.693359375) + n * np.float32(2.12194440e-4)  # ln2 split in two parts
    p = np.float32(1.0 / 720.0)
    p = p * r + np.float32(1.0 / 120.0)
    p = p * r + np.float32(1.0 / 24.0)
    p = p * r + np.float32(1.0 / 6.0)
    p = p * r + np.float32(0.5)
    p = p * r + np.float32(1.0)
    p = p * r + np.float32(1.0)
    return p * _float_from_bits(np.int32((np.int32(n) + np.int32(127)) << np.int32(23)))


@njit(**JIT)
def softmax(x, n):
    """In-place softmax over x[:n], subtracting the max for numerical stability."""
    max_val = x[0]
    for i in range(1, n):
        max_val = max(max_val, x[i])
    total = np.float32(0.0)
    for i in range(n):
        x[i] = fast_exp(x[i] - max_val)
        total += x[i]
    inv = np.float32(1.0) / total
    for i in range(n):
        x[i] *= inv


@njit(cache=True, nogil=True, error_model="numpy", fastmath=False)
def rope_table(seq_len, head_size, theta):
    """cos/sin (seq_len, head_size/2) of every RoPE angle, computed as run.c does per step.

    float32 powf/cosf/sinf from the C library (Numba calls libm for float32 math): rounding the
    float64 cos of the same angle differs from glibc's cosf in the last bit for some angles.
    """
    cos = np.empty((seq_len, head_size // 2), np.float32)
    sin = np.empty((seq_len, head_size // 2), np.float32)
    for i in range(head_size // 2):
        freq = np.float32(1.0) / np.power(theta, np.float32(2 * i) / np.float32(head_size))
        for pos in range(seq_len):
            val = np.float32(pos) * freq
            cos[pos, i] = np.cos(val)
            sin[pos, i] = np.sin(val)
    return cos, sin


@njit(cache=True, nogil=True, error_model="numpy", fastmath=False)
def rope(vec, n_heads, head_size, cos, sin):
    """Rotate each (even, odd) pair of every head by the position's angle (RoPE, Su et al. 2021).

    No fastmath: without it LLVM does not fuse the multiply-adds, so the rotation rounds as C's
    does (the quantized path's bit-exactness with runq depends on it; the cost is negligible).

    llama2.c's convention: pairs are interleaved (x[2i], x[2i+1]); cos/sin are (head_size/2,).
    """
    for h in range(n_heads):
        base = h * head_size
        for i in range(head_size // 2):
            v0 = vec[base + 2 * i]
            v1 = vec[base + 2 * i + 1]
            vec[base + 2 * i] = v0 * cos[i] - v1 * sin[i]
            vec[base + 2 * i + 1] = v0 * sin[i] + v1 * cos[i]


@njit(parallel=True, **JIT)
def attention(out, q, key_cache, value_cache, att, pos, n_heads, parallel):
    """Causal multi-head attention of one query position over cache positions 0..pos.

    q, out: (n_heads * head_size,); key_cache, value_cache: (n_kv_heads, head_size, seq_len) of one
    layer, position-minor so both the scores and the weighted sum are long contiguous loops
    (a position-major cache makes them head_size-long dot products, mostly horizontal adds).
    att: (n_heads, seq_len) scratch. Query head h reads kv head h // (n_heads / n_kv_heads)
    (grouped-query attention, Ainslie et al. 2023).
    """
    if parallel:
        for h in prange(n_heads):
            _attend_head(out, q, key_cache, value_cache, att[h], pos, h, n_heads)
    else:
        for h in range(n_heads):
            _attend_head(out, q, key_cache, value_cache, att[h], pos, h, n_heads)


@njit(inline="always", **JIT)
def _attend_head(out, q, key_cache, value_cache, att, pos, h, n_heads):
    n_kv_heads, head_size = key_cache.shape[0], key_cache.shape[1]
    kh = key_cache[h // (n_heads // n_kv_heads)]  # (head_size, seq_len)
    vh = value_cache[h // (n_heads // n_kv_heads)]
    n = pos + 1
    scale = np.float32(1.0) / np.sqrt(np.float32(head_size))
    for t in range(n):
        att[t] = 0.0
    for i in range(head_size):  # scores: att[t] = q_h . k_t / sqrt(head_size)
        qi = q[h * head_size + i] * scale
        k_i = kh[i]
        for t in range(n):
            att[t] += qi * k_i[t]
    softmax(att, n)
    for i in range(head_size):  # out_h[i] = sum_t att[t] v_t[i]
        out[h * head_size + i] = dot(vh[i, :n], att[:n])


@njit(**JIT)
def store_kv(key_cache, value_cache, k, v, pos):
    """Write this position's key and value (kv_dim,) into one layer's head-major caches."""
    n_kv_heads, head_size = key_cache.shape[0], key_cache.shape[1]
    for g in range(n_kv_heads):
        for i in range(head_size):
            key_cache[g, i, pos] = k[g * head_size + i]
            value_cache[g, i, pos] = v[g * head_size + i]


@njit(parallel=True, **JIT)
def swiglu_ffn_up(hb, w1, w3, x, parallel):
    """hb = silu(w1 @ x) * (w3 @ x): the gated half of SwiGLU (Shazeer 2020), one pass over rows."""
    n = hb.shape[0]
    if parallel:
        for i in prange(n):
            hb[i] = _swiglu_row(w1[i], w3[i], x)
    else:
        for i in range(n):
            hb[i] = _swiglu_row(w1[i], w3[i], x)


@njit(inline="always", **JIT)
def _swiglu_row(w1_row, w3_row, x):
    a = dot(w1_row, x)
    b = dot(w3_row, x)
    return a * (np.float32(1.0) / (np.float32(1.0) + np.exp(-a))) * b  # silu(a) * b, as run.c
