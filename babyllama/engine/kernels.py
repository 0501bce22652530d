"""The float building blocks of the forward passes, in the operations llama2.c's build performs.

run.c and runq.c share rmsnorm, RoPE, attention and the SwiGLU gate, and llama2.c is built with
gcc -Ofast -march=native, which compiles them into specific vectorized operations (ofast.py says
which and why). These kernels perform exactly those, so the fp32 engine's logits are run.c's bit
for bit and the quantized engine's are runq's. No fastmath: it would let LLVM reorder the very
sums that are ordered here on purpose. The forward passes that call these keep their machine code
on disk (simd.jit.entry), so only the first-ever run pays compile time.

Activations are (rows, width) arrays, one row per token of the forward call, and the weights
(layers, rows, cols) stacks: kernels take the whole arrays and a row (t) or layer (l) index, never
a slice. A slice passed to a compiled function is a new array object whose reference count is
updated around the call (~35 ns): at stories260K's ~40 kernel calls a layer, a tenth of a token.

Parallel kernels take a `parallel` flag: tiny models (stories260K) run faster on one thread,
because waking the thread pool (~1-2 us) costs more than a 64x64 matrix-vector product. The
serial branch never touches the thread pool.
"""

import numpy as np
from numba import get_thread_id, njit, prange

from ..simd.jit import JIT, entry
from ..simd.ofast import (
    dot,
    dot8,
    dot_tile,
    dot16_columns,
    f32,
    fma,
    fma_chains,
    gate8,
    gate16,
    inv_sqrt,
    softmax,
)

# Kernels are compiled with JIT, never cached on their own: only entry points keep machine code
# on disk (simd/jit.py says why).


CHUNK = 16  # units per call in the threaded loops


@njit(**JIT)
def _units(out, w, l, x, t, u0, u1, blocked):
    """Units u0..u1 of out[t] = w[l] @ x[t]: 8-row blocks if blocked (ofast.dot8), else rows
    (ofast.dot); with blocked units, the rows after the last whole block go one by one when u1
    is the end. One compiled copy serves every matrix-vector product (serial, or a thread's
    chunk), which keeps the first-ever compile short."""
    n, d = out.shape[1], x.shape[1]
    for u in range(u0, u1):
        if blocked:
            dot8(out, t * n + 8 * u, w, (l * n + 8 * u) * d, x, t * d, d)
        else:
            out[t, u] = dot(w, (l * n + u) * d, x, t * d, d)
    if blocked and u1 == n // 8:
        for i in range(8 * (n // 8), n):
            out[t, i] = dot(w, (l * n + i) * d, x, t * d, d)


@njit(**JIT)
def _count(out, blocked):
    return out.shape[1] // 8 if blocked else out.shape[1]


@njit(inline="always", **JIT)
def _chunk_end(u0, units):
    return min(units, u0 + CHUNK)


@njit(parallel=True, **JIT)
def matmul(out, w, l, x, t, parallel, blocked):
    """out[t] (n,) = w[l] (n, d) @ x[t] (d,) -- the matrix-vector product that is ~all of decode time.

    Each row is run.c's `val += w[i * n + j] * x[j]` as -Ofast vectorizes it (ofast.dot). blocked
    computes eight rows at a time (ofast.dot8), which is faster while the weights sit in the CPU
    caches and slower when they stream from memory (Engine decides). Threads take chunks of units.
    """
    units = _count(out, blocked)
    if parallel:
        for c in prange((units + CHUNK - 1) // CHUNK):
            _units(out, w, l, x, t, c * CHUNK, _chunk_end(c * CHUNK, units), blocked)
    else:
        _units(out, w, l, x, t, 0, units, blocked)


@njit(parallel=True, **JIT)
def matmul3(q, k, v, wq, wk, wv, l, x, t, parallel, blocked):
    """q, k, v = wq @ x, wk @ x, wv @ x (row t, layer l) in one parallel loop over all their units:
    one thread-pool launch instead of three (a launch costs microseconds, a 15M model's q/k/v rows
    tens)."""
    nq, nk = _count(q, blocked), _count(k, blocked)
    cq, ck = (nq + CHUNK - 1) // CHUNK, (nk + CHUNK - 1) // CHUNK
    if parallel:
        for c in prange(cq + 2 * ck):
            if c < cq:
                _units(q, wq, l, x, t, c * CHUNK, _chunk_end(c * CHUNK, nq), blocked)
            elif c < cq + ck:
                u = (c - cq) * CHUNK
                _units(k, wk, l, x, t, u, _chunk_end(u, nk), blocked)
            else:
                u = (c - cq - ck) * CHUNK
                _units(v, wv, l, x, t, u, _chunk_end(u, nk), blocked)
    else:
        _units(q, wq, l, x, t, 0, nq, blocked)
        _units(k, wk, l, x, t, 0, nk, blocked)
        _units(v, wv, l, x, t, 0, nk, blocked)


@njit(parallel=True, **JIT)
def matmul2(out1, out3, w1, w3, l, x, t, parallel, blocked):
    """out1, out3 = w1 @ x, w3 @ x (SwiGLU's two up-projections; row t, layer l) in one parallel loop."""
    units = _count(out1, blocked)
    if parallel:
        for c in prange((units + CHUNK - 1) // CHUNK):
            u0, u1 = c * CHUNK, _chunk_end(c * CHUNK, units)
            _units(out1, w1, l, x, t, u0, u1, blocked)
            _units(out3, w3, l, x, t, u0, u1, blocked)
    else:
        _units(out1, w1, l, x, t, 0, units, blocked)
        _units(out3, w3, l, x, t, 0, units, blocked)


# Many token rows at once (prefill, a batch step, speculative verification): a tile of GEMM_R
# weight rows x GEMM_C token rows of dot products runs side by side in registers, so each loaded
# weight vector serves GEMM_C tokens and each activation vector GEMM_R rows: compute-bound where
# the matrix-vector product above is memory-bound. Every element is still ofast.dot's sum in its
# order (dot_tile), so a row's logits do not depend on what else is in the block. 4 x 6 keeps the
# 24 accumulators, 6 activation vectors and a weight vector in the 32 zmm registers.
GEMM_R, GEMM_C = 4, 6
_tile = dot_tile(GEMM_R, GEMM_C)
_tile_one = dot_tile(GEMM_R, 1)  # the tokens after the last whole group of GEMM_C


@njit(**JIT)
def _gemm_unit(out, w, l, x, T, u):
    """Rows GEMM_R*u .. +GEMM_R of out[:T] = x[:T] @ w[l].T, all T tokens. A call, not inlined: a
    unit is thousands of multiply-adds, and one compiled copy of the tiles keeps the first-ever
    compile short (inlined into the three GEMMs' serial and threaded loops it was six)."""
    n, d = out.shape[1], x.shape[1]
    r0 = GEMM_R * u
    wo = (l * n + r0) * d
    t = 0
    while t + GEMM_C <= T:
        _tile(out, t * n + r0, n, w, wo, d, x, t * d, d, d)
        t += GEMM_C
    while t < T:
        _tile_one(out, t * n + r0, n, w, wo, d, x, t * d, d, d)
        t += 1


@njit(**JIT)
def _gemm_rest(out, w, l, x, T):
    """The rows after the last whole tile, element by element (the same sums)."""
    n, d = out.shape[1], x.shape[1]
    for i in range(GEMM_R * (n // GEMM_R), n):
        for t in range(T):
            out[t, i] = dot(w, (l * n + i) * d, x, t * d, d)


@njit(parallel=True, **JIT)
def gemm(out, w, l, x, T, parallel):
    """out[:T] (T, n) = x[:T] (T, d) @ w[l].T: the rows x[t] of a block, each out[t, i] bit for bit
    matmul's. Threads take tiles of rows (each weight row is read by one thread, once)."""
    units = out.shape[1] // GEMM_R
    if parallel:
        for u in prange(units):
            _gemm_unit(out, w, l, x, T, u)
    else:
        for u in range(units):
            _gemm_unit(out, w, l, x, T, u)
    _gemm_rest(out, w, l, x, T)


@njit(parallel=True, **JIT)
def gemm3(q, k, v, wq, wk, wv, l, x, T, parallel):
    """gemm for q, k and v in one parallel loop (one thread-pool launch)."""
    nq, nk = q.shape[1] // GEMM_R, k.shape[1] // GEMM_R
    if parallel:
        for u in prange(nq + 2 * nk):
            if u < nq:
                _gemm_unit(q, wq, l, x, T, u)
            elif u < nq + nk:
                _gemm_unit(k, wk, l, x, T, u - nq)
            else:
                _gemm_unit(v, wv, l, x, T, u - nq - nk)
    else:
        for u in range(nq):
            _gemm_unit(q, wq, l, x, T, u)
        for u in range(nk):
            _gemm_unit(k, wk, l, x, T, u)
            _gemm_unit(v, wv, l, x, T, u)
    _gemm_rest(q, wq, l, x, T)
    _gemm_rest(k, wk, l, x, T)
    _gemm_rest(v, wv, l, x, T)


@njit(parallel=True, **JIT)
def gemm2(o1, o3, w1, w3, l, x, T, parallel):
    """gemm for SwiGLU's w1 and w3 in one parallel loop."""
    units = o1.shape[1] // GEMM_R
    if parallel:
        for u in prange(units):
            _gemm_unit(o1, w1, l, x, T, u)
            _gemm_unit(o3, w3, l, x, T, u)
    else:
        for u in range(units):
            _gemm_unit(o1, w1, l, x, T, u)
            _gemm_unit(o3, w3, l, x, T, u)
    _gemm_rest(o1, w1, l, x, T)
    _gemm_rest(o3, w3, l, x, T)


@njit(**JIT)
def rope(vec, t, n_heads, head_size, cos, sin, pos):
    """Rotate each (even, odd) pair of every head of vec[t] by position pos's angles (RoPE, Su et
    al. 2021).

    llama2.c's convention: pairs are interleaved (x[2i], x[2i+1]); cos/sin are (positions,
    head_size/2) tables. The products are rounded before the add, as gcc's vaddsubps does.
    """
    for h in range(n_heads):
        base = h * head_size
        for i in range(head_size // 2):
            v0 = vec[t, base + 2 * i]
            v1 = vec[t, base + 2 * i + 1]
            vec[t, base + 2 * i] = v0 * cos[pos, i] - v1 * sin[pos, i]
            vec[t, base + 2 * i + 1] = v0 * sin[pos, i] + v1 * cos[pos, i]


@njit(**JIT)
def rmsnorm(out, j, x, t, weight, l, eps, in_layer):
    """out[j] = weight[l] * x[t] / sqrt(mean(x[t]^2) + eps) (Zhang & Sennrich 2019), as compiled:
    ss = sum(x^2) (vectorized), r = 1/sqrt(ss/n + eps) (rsqrtss + Newton).

    gcc compiles the two inlined copies differently: inside a layer (in_layer) ss/n + eps is one
    fused multiply-add with 1/n and the output is (x * w) * r for whole 16-blocks, (r * x) * w
    after them; the final norm divides, adds, and computes (x * w) * r throughout.
    """
    n = x.shape[1]
    ss = dot(x, t * n, x, t * n, n)
    if in_layer:
        ss = fma(ss, f32(1.0) / f32(n), eps)
    else:
        ss = ss / f32(n) + eps
    r = inv_sqrt(ss)
    vec_end = 16 * (n // 16) if in_layer else n
    for i in range(vec_end):
        out[j, i] = (x[t, i] * weight[l, i]) * r
    for i in range(vec_end, n):
        out[j, i] = (r * x[t, i]) * weight[l, i]


@njit(**JIT)
def silu_mul(hb, hb2, t):
    """hb[t] = silu(hb[t]) * hb2[t] in place (the SwiGLU gate, Shazeer 2020), llama2.c's loop as
    compiled: whole 16-blocks and then one 8-block are vectorized (ofast.gate16, gate8: libmvec's
    expf and a Newton-refined reciprocal for 1 / (1 + e^-x)); the tail gets libm's expf and a true
    division."""
    n = hb.shape[1]
    j = 0
    while n - j >= 16:
        gate16(hb, hb2, t * n + j)
        j += 16
    if n - j >= 8:
        gate8(hb, hb2, t * n + j)
        j += 8
    for i in range(j, n):
        inv = f32(1.0) / (np.exp(-hb[t, i]) + f32(1.0))
        hb[t, i] = inv * (hb[t, i] * hb2[t, i])


@njit(**JIT)
def store_kv(key_pages, value_pages, l, page, slot, k, v, t):
    """Write row t's key and value into its page of layer l's cache: keys (L, pages, n_kv_heads,
    head_size, 16), values (L, pages, n_kv_heads, 16, head_size); `slot` is the position within
    the page's 16.

    A page holds 16 positions: the (head_size, 16) block the scores take at once (16 positions side
    by side) and the 16 value vectors the weighted sum reads one after another, so each half of the
    attention is a sequential read that keeps llama2.c's order. Keys (head_size, positions) would
    read 64 bytes from each of head_size rows a block, rows apart: slow once the cache has been
    evicted by the weights streaming past (a large model, every token). Pages let many sequences
    share one pool, each holding only the pages its positions need (state.py).
    """
    n_kv_heads, head_size = key_pages.shape[2], key_pages.shape[3]
    for g in range(n_kv_heads):
        for i in range(head_size):
            key_pages[l, page, g, i, slot] = k[t, g * head_size + i]
            value_pages[l, page, g, slot, i] = v[t, g * head_size + i]


@njit(inline="always", **JIT)
def _head_weights(att, ao, q, qo, key_pages, l, block_table, seq, pos, g, scale):
    """att[ao : ao + pos + 1] (att 1-D) = softmax(q_h . k_t * (1/sqrt(head_size))) for the query head at
    q.flat[qo:] and kv head g: llama2.c's scores and softmax (with element 0 peeled, as gcc
    compiles the one inlined into forward). The scores go one page of 16 positions at a time
    (ofast.dot16_columns); the last page's unused positions are computed too, from zeros or stale
    keys, and never read."""
    n_kv_heads, head_size = key_pages.shape[2], key_pages.shape[3]
    n = pos + 1
    page_floats = n_kv_heads * head_size * 16
    base = l * key_pages.shape[1] * page_floats + g * head_size * 16  # layer l, kv head g
    for b in range((n + 15) // 16):
        ko = base + block_table[seq, b] * page_floats
        dot16_columns(att, ao + 16 * b, q, qo, key_pages, ko, head_size, 16, scale)
    softmax(att, ao, n, True)


@njit(inline="always", **JIT)
def _chunk(u, per_head, head_size, out_base, att_base, row, kv_mul):
    """Flat offsets of weighted-sum unit u (head u // per_head, its 8-dim chunk u % per_head) into
    out, att (rows of `row`) and a value page ((n_kv_heads, 16, head_size) block)."""
    h, c = u // per_head, 8 * (u % per_head)
    return out_base + h * head_size + c, att_base + h * row, (h // kv_mul) * 16 * head_size + c


@njit(inline="always", **JIT)
def _weighted_sums(out, t, att, att_base, row, value_pages, l, block_table, seq, n, h0, h1, kv_mul):
    """out[t]_h = sum_{s < n} att_h[s] * v_s for heads h0 <= h < h1 (att 1-D, att_h at att[att_base +
    h * row:]): each element a chain of fused multiply-adds in s order (run.c's loop), across the
    sequence's pages. The heads' 8-dim chunks go four at a time through ofast.fma_chains, a short
    last group repeating its final chunk; dims past a multiple of 8 are done one by one."""
    n_kv_heads, head_size = value_pages.shape[2], value_pages.shape[4]
    per_head = head_size // 8
    page_floats = n_kv_heads * 16 * head_size
    base = l * value_pages.shape[1] * page_floats  # layer l's pages
    out_base = t * out.shape[1]
    blocks = block_table.shape[1]
    first, last = h0 * per_head, h1 * per_head - 1
    for g in range(first, last + 1, 4):
        o0, a0, v0 = _chunk(g, per_head, head_size, out_base, att_base, row, kv_mul)
        o1, a1, v1 = _chunk(min(g + 1, last), per_head, head_size, out_base, att_base, row, kv_mul)
        o2, a2, v2 = _chunk(min(g + 2, last), per_head, head_size, out_base, att_base, row, kv_mul)
        o3, a3, v3 = _chunk(min(g + 3, last), per_head, head_size, out_base, att_base, row, kv_mul)
        fma_chains(out, (o0, o1, o2, o3), att, (a0, a1, a2, a3), value_pages,
                   (base + v0, base + v1, base + v2, base + v3), head_size, n, block_table, seq * blocks,
                   page_floats)
    if 8 * per_head < head_size:
        for h in range(h0, h1):
            g = h // kv_mul
            for i in range(8 * per_head, head_size):
                acc = f32(0.0)
                for s in range(n):
                    acc = fma(att[att_base + h * row + s], value_pages[l, block_table[seq, s // 16], g, s % 16, i], acc)
                out[t, h * head_size + i] = acc


@njit(**JIT)
def _attend(out, q, t, key_pages, value_pages, l, block_table, seq, att, ao, row, pos, n_heads):
    """attention() for row t on one thread: all heads' weights, then their weighted sums together
    (more chains in flight), with scores at att[ao:] (this thread's part). A call (one compiled
    copy for the serial path and the threads over rows)."""
    kv_mul = n_heads // key_pages.shape[2]
    head_size = key_pages.shape[3]
    scale = inv_sqrt(f32(head_size))  # score /= sqrtf(head_size), as compiled
    qo = t * q.shape[1]
    for h in range(n_heads):
        _head_weights(att, ao + h * row, q, qo + h * head_size, key_pages, l, block_table, seq, pos, h // kv_mul, scale)
    _weighted_sums(out, t, att, ao, row, value_pages, l, block_table, seq, pos + 1, 0, n_heads, kv_mul)


@njit(parallel=True, **JIT)
def attention(out, q, t, key_pages, value_pages, l, block_table, seq, att, row, pos, n_heads, parallel):
    """Causal multi-head attention of row t's query (at position pos of sequence seq) over the
    sequence's positions 0..pos, into out[t].

    q, out: (rows, n_heads * head_size); key_pages / value_pages: the cache (store_kv); block_table
    (sequences, blocks): each block of 16 positions' page; l the layer. att: scratch, flat
    (threads * n_heads * row), head h's scores at h * row (thread 0's part).
    Query head h reads kv head h // (n_heads / n_kv_heads) (grouped-query attention, Ainslie et
    al. 2023).

    In a large model the cache is evicted by the weights streaming past every token, and attention
    waits on memory: threads take heads. The helpers are inlined: called from the prange body,
    each would be compiled again into the thread-pool function, seconds of the first-ever run.
    """
    if parallel:
        kv_mul = n_heads // key_pages.shape[2]
        head_size = key_pages.shape[3]
        scale = inv_sqrt(f32(head_size))
        qo = t * q.shape[1]
        for h in prange(n_heads):
            _head_weights(att, h * row, q, qo + h * head_size, key_pages, l, block_table, seq, pos, h // kv_mul, scale)
            _weighted_sums(out, t, att, 0, row, value_pages, l, block_table, seq, pos + 1, h, h + 1, kv_mul)
    else:
        _attend(out, q, t, key_pages, value_pages, l, block_table, seq, att, 0, row, pos, n_heads)


@njit(parallel=True, **JIT)
def attention_rows(out, q, key_pages, value_pages, l, block_table, slots, positions, T, att, row, n_heads, parallel):
    """attention() for rows t < T, each over its own sequence. One row: threads take heads. Many:
    threads take rows, each with its own part of att, in the order 0, T-1, 1, T-2, ... so that
    both threads get early (short) and late (long) positions of a prefill block alike."""
    if T == 1 or not parallel:
        for t in range(T):
            attention(out, q, t, key_pages, value_pages, l, block_table, slots[t], att, row, positions[t], n_heads,
                      parallel)
    else:
        for u in prange(T):
            t = u // 2 if u % 2 == 0 else T - 1 - u // 2
            ao = get_thread_id() * n_heads * row
            _attend(out, q, t, key_pages, value_pages, l, block_table, slots[t], att, ao, row, positions[t], n_heads)


@entry
def rope_table(seq_len, head_size, ln_theta, scaling):
    """cos/sin (seq_len, head_size/2) of the RoPE angles. The frequencies are llama2.c's as
    compiled: 1/powf(theta, d/hs) becomes expf(-(d * (1/hs)) * ln_theta), ln_theta the float32 log
    of theta that gcc folds; the angle is freq * pos; then libm's sincosf.

    scaling (factor, low_freq_factor, high_freq_factor, original_max_position_embeddings), all
    zero for none: Llama 3.1's rescaling of each frequency by its wavelength, in float64 (Meta's
    apply_scaling; transformers' _compute_llama3_parameters).
    """
    cos = np.empty((seq_len, head_size // 2), np.float32)
    sin = np.empty((seq_len, head_size // 2), np.float32)
    inv_hs = f32(1.0) / f32(head_size)
    factor, low, high, original = scaling
    for i in range(head_size // 2):
        freq = np.exp(-(f32(2 * i) * inv_hs) * ln_theta)
        if factor > 0:
            wavelen = 2 * np.pi / np.float64(freq)
            if wavelen > original / low:  # long wavelengths: slowed down by the factor
                freq = f32(np.float64(freq) / factor)
            elif wavelen >= original / high:  # in between: a smooth ramp
                smooth = (original / wavelen - low) / (high - low)
                freq = f32((1 - smooth) * np.float64(freq) / factor + smooth * np.float64(freq))
        for pos in range(seq_len):
            val = freq * f32(pos)
            cos[pos, i] = np.cos(val)
            sin[pos, i] = np.sin(val)
    return cos, sin


@njit(**JIT)
def residual(x, dx, T):
    """x[t] += dx[t] for rows t < T: the residual connection, in both architectures' forwards."""
    for t in range(T):
        for i in range(x.shape[1]):
            x[t, i] += dx[t, i]
