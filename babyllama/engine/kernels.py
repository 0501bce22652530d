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
    dot8,
    f32,
    fma,
    fma_chains,
    gate8,
    gate16,
    inv_sqrt,
    softmax,
)

JIT = dict(cache=True, nogil=True, error_model="numpy", fastmath=False)


@njit(inline="always", **JIT)
def _unit(out, w, x, u, blocked):
    """One unit of out = w @ x: rows 8u .. 8u + 7 if blocked (ofast.dot8), else row u (ofast.dot).
    Inlined: called inside prange, a real call would update the arrays' reference counts
    atomically on every iteration, from every thread."""
    d = x.shape[0]
    if blocked:
        dot8(out, 8 * u, w, 8 * u * d, x, 0, d)
    else:
        out[u] = dot(w, u * d, x, 0, d)


@njit(**JIT)
def _units(out, blocked):
    return out.shape[0] // 8 if blocked else out.shape[0]


@njit(**JIT)
def _last_rows(out, w, x, blocked):
    """With blocked units, the rows after the last whole block of 8, one by one (the same sums)."""
    d = x.shape[0]
    if blocked:
        for i in range(8 * (out.shape[0] // 8), out.shape[0]):
            out[i] = dot(w, i * d, x, 0, d)


@njit(parallel=True, **JIT)
def matmul(out, w, x, parallel, blocked):
    """out (n,) = w (n, d) @ x (d,) -- the matrix-vector product that is ~all of decode time.

    Each row is run.c's `val += w[i * n + j] * x[j]` as -Ofast vectorizes it (ofast.dot). blocked
    computes eight rows at a time (ofast.dot8), which is faster while the weights sit in the CPU
    caches and slower when they stream from memory (Engine decides). Threads take whole units.
    """
    if parallel:
        for u in prange(_units(out, blocked)):
            _unit(out, w, x, u, blocked)
    else:
        for u in range(_units(out, blocked)):
            _unit(out, w, x, u, blocked)
    _last_rows(out, w, x, blocked)


@njit(parallel=True, **JIT)
def matmul3(q, k, v, wq, wk, wv, x, parallel, blocked):
    """q, k, v = wq @ x, wk @ x, wv @ x in one parallel loop over all their units: one thread-pool
    launch instead of three (a launch costs microseconds, a 15M model's q/k/v rows tens)."""
    nq, nk = _units(q, blocked), _units(k, blocked)
    if parallel:
        for u in prange(nq + 2 * nk):
            if u < nq:
                _unit(q, wq, x, u, blocked)
            elif u < nq + nk:
                _unit(k, wk, x, u - nq, blocked)
            else:
                _unit(v, wv, x, u - nq - nk, blocked)
    else:
        for u in range(nq):
            _unit(q, wq, x, u, blocked)
        for u in range(nk):
            _unit(k, wk, x, u, blocked)
            _unit(v, wv, x, u, blocked)
    _last_rows(q, wq, x, blocked)
    _last_rows(k, wk, x, blocked)
    _last_rows(v, wv, x, blocked)


@njit(parallel=True, **JIT)
def matmul2(out1, out3, w1, w3, x, parallel, blocked):
    """out1, out3 = w1 @ x, w3 @ x (SwiGLU's two up-projections) in one parallel loop."""
    if parallel:
        for u in prange(_units(out1, blocked)):
            _unit(out1, w1, x, u, blocked)
            _unit(out3, w3, x, u, blocked)
    else:
        for u in range(_units(out1, blocked)):
            _unit(out1, w1, x, u, blocked)
            _unit(out3, w3, x, u, blocked)
    _last_rows(out1, w1, x, blocked)
    _last_rows(out3, w3, x, blocked)


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
    """hb = silu(hb) * hb2 in place (the SwiGLU gate, Shazeer 2020), llama2.c's loop as compiled:
    whole 16-blocks and then one 8-block are vectorized (ofast.gate16, gate8: libmvec's expf and a
    Newton-refined reciprocal for 1 / (1 + e^-x)); the tail gets libm's expf and a true division."""
    n = hb.shape[0]
    j = 0
    while n - j >= 16:
        gate16(hb, hb2, j)
        j += 16
    if n - j >= 8:
        gate8(hb, hb2, j)
        j += 8
    for i in range(j, n):
        inv = f32(1.0) / (np.exp(-hb[i]) + f32(1.0))
        hb[i] = inv * (hb[i] * hb2[i])


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
def _weighted_sums(out, att, value_cache, n, n_heads):
    """out_h = sum_{t < n} att[h, t] * v_t for every head h: each element a chain of fused
    multiply-adds in t order (run.c's loop). All heads' 8-dim chunks go four at a time through
    ofast.fma_chains, a short last group repeating its final chunk; dims past a multiple of 8 are
    done one by one."""
    n_kv_heads, seq_len, head_size = value_cache.shape
    kv_mul = n_heads // n_kv_heads
    per_head = head_size // 8
    units = n_heads * per_head
    for g in range(0, units, 4):
        u = (min(g, units - 1), min(g + 1, units - 1), min(g + 2, units - 1), min(g + 3, units - 1))
        h = (u[0] // per_head, u[1] // per_head, u[2] // per_head, u[3] // per_head)
        c = (8 * (u[0] % per_head), 8 * (u[1] % per_head), 8 * (u[2] % per_head), 8 * (u[3] % per_head))
        fma_chains(
            out, (h[0] * head_size + c[0], h[1] * head_size + c[1], h[2] * head_size + c[2], h[3] * head_size + c[3]),
            att, (h[0] * seq_len, h[1] * seq_len, h[2] * seq_len, h[3] * seq_len),
            value_cache, ((h[0] // kv_mul) * seq_len * head_size + c[0], (h[1] // kv_mul) * seq_len * head_size + c[1],
                          (h[2] // kv_mul) * seq_len * head_size + c[2], (h[3] // kv_mul) * seq_len * head_size + c[3]),
            head_size, n,
        )
    for h in range(n_heads):
        vh = value_cache[h // kv_mul]  # (seq_len, head_size)
        for i in range(8 * per_head, head_size):
            acc = f32(0.0)
            for t in range(n):
                acc = fma(att[h, t], vh[t, i], acc)
            out[h * head_size + i] = acc


@njit(**JIT)
def attention(out, q, key_cache, value_cache, att, att_lanes, pos, n_heads):
    """Causal multi-head attention of one query position over cache positions 0..pos.

    q, out: (n_heads * head_size,); key_cache (n_kv_heads, head_size, seq_len) and value_cache
    (n_kv_heads, seq_len, head_size): one layer's (store_kv). att (n_heads, seq_len) and
    att_lanes (16, seq_len): scratch. Query head h reads kv head h // (n_heads / n_kv_heads)
    (grouped-query attention, Ainslie et al. 2023).

    One thread, even for models whose matmuls use several: the heads' weighted sums run
    together (_weighted_sums), and a threaded version measured ~1% of a 15M-110M token while
    its compiled code cost ~15 s more on the first-ever run.
    """
    scale = inv_sqrt(f32(key_cache.shape[1]))  # score /= sqrtf(head_size), as compiled
    for h in range(n_heads):
        _head_weights(att[h], att_lanes, q, key_cache, pos, h, n_heads, scale)
    _weighted_sums(out, att, value_cache, pos + 1, n_heads)


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
