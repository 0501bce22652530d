"""The float building blocks of the forward passes, in the operations llama2.c's build performs.

run.c and runq.c share rmsnorm, RoPE, attention and the SwiGLU gate, and llama2.c is built with
gcc -Ofast -march=native, which compiles them into specific vectorized operations (ofast.py says
which and why). These kernels perform exactly those, so the fp32 engine's logits are run.c's bit
for bit and the quantized engine's are runq's. No fastmath: it would let LLVM reorder the very
sums that are ordered here on purpose. The forward passes that call these keep their machine code
on disk (ENTRY, below), so only the first-ever run pays compile time.

Parallel kernels take a `parallel` flag: tiny models (stories260K) run faster on one thread,
because waking the thread pool (~1-2 us) costs more than a 64x64 matrix-vector product. The
serial branch never touches the thread pool.
"""

import numpy as np
from numba import njit, prange

from .ofast import (
    dot,
    dot8,
    dot16_columns,
    f32,
    fma,
    fma_chains,
    gate8,
    gate16,
    inv_sqrt,
    softmax,
)

# Only entry points (the forward passes, rope_table) keep machine code on disk (ENTRY). A kernel
# cached on its own is loaded as finished machine code when a forward is compiled in a later
# process, and the forward then calls it opaquely: measured 20-60% slower forwards (no inlining),
# and with the threaded kernels loaded that way, a cached forward that segfaulted in the next
# process. Uncached, the kernels are always compiled into whichever forward calls them.
JIT = dict(cache=False, nogil=True, error_model="numpy", fastmath=False)
ENTRY = dict(JIT, cache=True)


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
    """Write this position's key and value into one layer's caches: keys in tiles of 16 positions
    (n_kv_heads, tiles, head_size, 16), values position-major (n_kv_heads, seq_len, head_size).

    Each layout makes its half of the attention a sequential read that keeps llama2.c's order: a
    tile is the (head_size, 16) block the scores take at once (16 positions side by side), and
    the weighted sum reads each position's value as one vector. Keys (head_size, seq_len) would
    read 64 bytes from each of head_size rows a block, rows apart: slow once the cache has been
    evicted by the weights streaming past (a large model, every token).
    """
    n_kv_heads, head_size = key_cache.shape[0], key_cache.shape[2]
    tile, slot = pos // 16, pos % 16
    for g in range(n_kv_heads):
        for i in range(head_size):
            key_cache[g, tile, i, slot] = k[g * head_size + i]
            value_cache[g, pos, i] = v[g * head_size + i]


@njit(inline="always", **JIT)
def _head_weights(att, q, key_cache, pos, h, n_heads, scale):
    """att[:pos+1] = softmax(q_h . k_t * (1/sqrt(head_size))), llama2.c's scores and softmax (with
    element 0 peeled, as gcc compiles the one inlined into forward). The scores go one tile of 16
    positions at a time (ofast.dot16_columns); the last tile's unused positions are computed too,
    from zeros or stale keys, and never read."""
    n_kv_heads, head_size = key_cache.shape[0], key_cache.shape[2]
    n = pos + 1
    kh = key_cache[h // (n_heads // n_kv_heads)]  # (tiles, head_size, 16)
    for b in range((n + 15) // 16):
        dot16_columns(att, 16 * b, q, h * head_size, kh, b * head_size * 16, head_size, 16, scale)
    softmax(att, n, True)


@njit(inline="always", **JIT)
def _chunk(u, per_head, head_size, row, seq_len, kv_mul):
    """Flat offsets of weighted-sum unit u (head u // per_head, its 8-dim chunk u % per_head) into
    out, att (rows of `row`) and value_cache (kv head's (seq_len, head_size) block)."""
    h, c = u // per_head, 8 * (u % per_head)
    return h * head_size + c, h * row, (h // kv_mul) * seq_len * head_size + c


@njit(inline="always", **JIT)
def _weighted_sums(out, att, value_cache, n, h0, h1, n_heads):
    """out_h = sum_{t < n} att[h, t] * v_t for heads h0 <= h < h1: each element a chain of fused
    multiply-adds in t order (run.c's loop). The heads' 8-dim chunks go four at a time through
    ofast.fma_chains, a short last group repeating its final chunk; dims past a multiple of 8 are
    done one by one."""
    n_kv_heads, seq_len, head_size = value_cache.shape
    row = att.shape[1]
    kv_mul = n_heads // n_kv_heads
    per_head = head_size // 8
    first, last = h0 * per_head, h1 * per_head - 1
    for g in range(first, last + 1, 4):
        o0, a0, v0 = _chunk(g, per_head, head_size, row, seq_len, kv_mul)
        o1, a1, v1 = _chunk(min(g + 1, last), per_head, head_size, row, seq_len, kv_mul)
        o2, a2, v2 = _chunk(min(g + 2, last), per_head, head_size, row, seq_len, kv_mul)
        o3, a3, v3 = _chunk(min(g + 3, last), per_head, head_size, row, seq_len, kv_mul)
        fma_chains(out, (o0, o1, o2, o3), att, (a0, a1, a2, a3), value_cache, (v0, v1, v2, v3), head_size, n)
    for h in range(h0, h1):
        vh = value_cache[h // kv_mul]  # (seq_len, head_size)
        for i in range(8 * per_head, head_size):
            acc = f32(0.0)
            for t in range(n):
                acc = fma(att[h, t], vh[t, i], acc)
            out[h * head_size + i] = acc


@njit(parallel=True, **JIT)
def attention(out, q, key_cache, value_cache, att, pos, n_heads, parallel):
    """Causal multi-head attention of one query position over cache positions 0..pos.

    q, out: (n_heads * head_size,); key_cache (n_kv_heads, tiles, head_size, 16) and value_cache
    (n_kv_heads, seq_len, head_size): one layer's (store_kv). att (n_heads, 16 * tiles): scratch.
    Query head h reads kv head h // (n_heads / n_kv_heads) (grouped-query attention, Ainslie et
    al. 2023).

    In a large model the cache is evicted by the weights streaming past every token, and attention
    waits on memory: threads take heads. One thread does all heads' weighted sums together (more
    chains in flight). The helpers are inlined: called from the prange body, each would be
    compiled again into the thread-pool function, seconds of the first-ever run.
    """
    scale = inv_sqrt(f32(key_cache.shape[2]))  # score /= sqrtf(head_size), as compiled
    if parallel:
        for h in prange(n_heads):
            _head_weights(att[h], q, key_cache, pos, h, n_heads, scale)
            _weighted_sums(out, att, value_cache, pos + 1, h, h + 1, n_heads)
    else:
        for h in range(n_heads):
            _head_weights(att[h], q, key_cache, pos, h, n_heads, scale)
        _weighted_sums(out, att, value_cache, pos + 1, 0, n_heads, n_heads)


@njit(**ENTRY)
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
