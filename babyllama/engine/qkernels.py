"""Numba kernels of the quantized forward: activation quantization and the int8/int4 matmuls, in
the exact operations of runq's -Ofast build (the float kernels runq shares with run.c, rmsnorm,
RoPE, attention and the SwiGLU gate, are kernels.py's).

The math is llama2.c runq's: activations are quantized per group like the weights; each output
is the sum over groups of (exact int32 dot product of the group) * (w_scale * x_scale),
accumulated in float32 group after group. Quantization turns a one-ulp difference in an
activation into a different int8 value now and then, which then shows in the logits and, sooner
or later, in the tokens. So nothing here is compiled with fastmath, and every float step is the
one gcc -Ofast -march=native makes of runq.c (the build llama2.c recommends and the fixtures
come from): quantize() multiplies by 127/max and rounds with gcc's inline round, 1/sqrt is
rsqrtss + Newton, sums and dot products run in the vectorizer's lane order, expf is libmvec's in
vectorized loops, RoPE's powf becomes expf. simd/ofast.py has the primitives and says why. Result:
bit-identical logits to that runq build at every position (checked against the C program on
llama2.c's and babyllama's v2 files, odd dims, GQA and untied classifiers; see the README).

The matmuls' rows are qrows' row kernels (VNNI, several groups at a time); many token rows at
once go through qgemm.py. Nothing here takes a slice (a slice passed to a compiled function is a
new array object whose reference count is updated around the call): the quantized activations
are flat 1-D arrays addressed by offsets (xo: where this row's values start, xso: its scales and
group sums), and a kind of matrix is (data, offsets, scales) with the scales of every matrix of
the kind in one flat array.
"""

import numpy as np
from numba import njit, prange

from ..simd.jit import JIT
from .qrows import (qrow_plain, rows_q4_4, rows_q4_8, rows_q4_16, rows_q4_32, rows_q4_64, rows_q8_4, rows_q8_8,
                    rows_q8_16, rows_q8_32, rows_q8_64)


_INV_127 = np.float32(0.007874015718698502)  # 1/127 in float32, what gcc makes of "/ 127.0f"
_JUST_BELOW_HALF = np.float32(0.49999997)  # gcc's inline round(): trunc(v + copysign(this, v))


@njit(**JIT)
def quantize_activations(xq, xo, xs, xso, xsum, x, t, gs):
    """runq's quantize() as compiled: xq[xo : xo + n] int8 and xs[xso : xso + n/gs] float32 from
    x[t] (n,) float32 (xq, xs flat); xsum[xso + g] is group g's sum of the int8 values (what the
    VNNI kernels take off again, qrows.py).

    Per group: scale = max|x| * (1/127); q = round(x * (127 / max|x|)), with gcc's inline round
    (add 0.49999997 with x's sign, truncate; in float32). A group of zeros gets scale 0, q = 0.
    """
    for g in range(x.shape[1] // gs):
        wmax = np.float32(0.0)
        for i in range(g * gs, (g + 1) * gs):
            wmax = max(wmax, abs(x[t, i]))
        xs[xso + g] = wmax * _INV_127
        total = np.int32(0)
        if wmax == 0:
            for i in range(g * gs, (g + 1) * gs):
                xq[xo + i] = 0
        else:
            inv = np.float32(127.0) / wmax
            for i in range(g * gs, (g + 1) * gs):
                v = x[t, i] * inv
                r = v + (_JUST_BELOW_HALF if v >= 0 else -_JUST_BELOW_HALF)
                q = np.int32(r)
                xq[xo + i] = np.int8(q)
                total += q
        xsum[xso + g] = total


@njit(**JIT)
def dequantize_row(out, t, data, offset, scales, row, gs, bits):
    """out[t] (cols,) = row `row` of the quantized matrix whose values start at data[offset] and
    whose scales start at scales[0], float32 (q * scale, like runq's dequantize)."""
    cols = out.shape[1]
    if bits == 8:
        base = offset + row * cols
        for j in range(cols):
            out[t, j] = np.float32(data[base + j]) * scales[(row * cols + j) // gs]
    else:
        half = gs // 2
        base = offset + row * cols // 2
        for g in range(cols // gs):
            s = scales[(row * cols) // gs + g]
            for j in range(half):
                b = np.int32(data[base + g * half + j])
                out[t, g * gs + j] = np.float32((b & 15) - 8) * s
                out[t, g * gs + half + j] = np.float32(((b >> 4) & 15) - 8) * s


CHUNK = 16  # rows per call in the threaded loops: the call costs nanoseconds, a row ~100


@njit(**JIT)
def qrows_range(out, t, w, l, i0, i1, xq, xo, xs, xso, xsum, n, gs, bits):
    """out[t, i] for rows i0 <= i < i1 of matrix l of kind w = (data, offsets, scales). Group sizes
    4-64 take qrows' compiled loop for their (group size, width) pair, in which both are constants
    (with them as the runtime values the forward passes, small rows ran 15-20x slower); other
    group sizes the general row kernel. Not inlined: one copy serves every matmul (inlined into
    each threaded and serial loop it was a dozen copies and a minute of first-ever compile)."""
    if bits == 8:
        if gs == 64:
            return rows_q8_64(out, t, w, l, i0, i1, xq, xo, xs, xso, xsum, n)
        if gs == 32:
            return rows_q8_32(out, t, w, l, i0, i1, xq, xo, xs, xso, xsum, n)
        if gs == 16:
            return rows_q8_16(out, t, w, l, i0, i1, xq, xo, xs, xso, xsum, n)
        if gs == 8:
            return rows_q8_8(out, t, w, l, i0, i1, xq, xo, xs, xso, xsum, n)
        if gs == 4:
            return rows_q8_4(out, t, w, l, i0, i1, xq, xo, xs, xso, xsum, n)
    else:
        if gs == 64:
            return rows_q4_64(out, t, w, l, i0, i1, xq, xo, xs, xso, xsum, n)
        if gs == 32:
            return rows_q4_32(out, t, w, l, i0, i1, xq, xo, xs, xso, xsum, n)
        if gs == 16:
            return rows_q4_16(out, t, w, l, i0, i1, xq, xo, xs, xso, xsum, n)
        if gs == 8:
            return rows_q4_8(out, t, w, l, i0, i1, xq, xo, xs, xso, xsum, n)
        if gs == 4:
            return rows_q4_4(out, t, w, l, i0, i1, xq, xo, xs, xso, xsum, n)
    rows = out.shape[1]
    wbytes = n if bits == 8 else n // 2
    data, base, scales = w[0], w[1][l], w[2]
    so = l * rows * (n // gs)
    for i in range(i0, i1):
        out[t, i] = qrow_plain(data, base + i * wbytes, xq, xo, xs, xso, scales, so + i * (n // gs), n, gs, bits)


@njit(parallel=True, **JIT)
def qmatmul(out, t, w, l, xq, xo, xs, xso, xsum, n, gs, bits, parallel):
    """out[t] (rows,) = W_l @ x for matrix l of kind w = (data, offsets, scales flat: matrix l's
    scales start at l * rows * n / gs), x (n,) given quantized at xq[xo:], xs / xsum[xso:]."""
    rows = out.shape[1]
    chunks = (rows + CHUNK - 1) // CHUNK
    if parallel:
        for c in prange(chunks):
            qrows_range(out, t, w, l, c * CHUNK, min(rows, (c + 1) * CHUNK), xq, xo, xs, xso, xsum, n, gs, bits)
    else:
        qrows_range(out, t, w, l, 0, rows, xq, xo, xs, xso, xsum, n, gs, bits)


@njit(parallel=True, **JIT)
def qmatmul3(q, k, v, t, wq, wk, wv, l, xq, xo, xs, xso, xsum, n, gs, bits, parallel):
    """q[t], k[t], v[t] = Wq @ x, Wk @ x, Wv @ x (layer l; each w a (data, offsets, scales) kind) in
    one parallel loop over all their rows.

    One thread-pool launch instead of three: at ~5 us a launch and 85 launches a token, the
    launches cost the 110M model about a tenth of its int8 decode time.
    """
    cq, ck = (q.shape[1] + CHUNK - 1) // CHUNK, (k.shape[1] + CHUNK - 1) // CHUNK
    if parallel:
        for c in prange(cq + 2 * ck):
            if c < cq:
                qrows_range(q, t, wq, l, c * CHUNK, min(q.shape[1], (c + 1) * CHUNK), xq, xo, xs, xso, xsum, n, gs, bits)
            elif c < cq + ck:
                i = (c - cq) * CHUNK
                qrows_range(k, t, wk, l, i, min(k.shape[1], i + CHUNK), xq, xo, xs, xso, xsum, n, gs, bits)
            else:
                i = (c - cq - ck) * CHUNK
                qrows_range(v, t, wv, l, i, min(v.shape[1], i + CHUNK), xq, xo, xs, xso, xsum, n, gs, bits)
    else:
        qrows_range(q, t, wq, l, 0, q.shape[1], xq, xo, xs, xso, xsum, n, gs, bits)
        qrows_range(k, t, wk, l, 0, k.shape[1], xq, xo, xs, xso, xsum, n, gs, bits)
        qrows_range(v, t, wv, l, 0, v.shape[1], xq, xo, xs, xso, xsum, n, gs, bits)


@njit(parallel=True, **JIT)
def qmatmul2(h1, h3, t, w1, w3, l, xq, xo, xs, xso, xsum, n, gs, bits, parallel):
    """h1[t], h3[t] = W1 @ x, W3 @ x (SwiGLU's two up-projections) in one parallel loop over the rows.

    The gate is applied afterwards (kernels.silu_mul): gcc compiles it differently in each block of
    16, so it runs over the whole vector rather than fused into the rows.
    """
    rows = h1.shape[1]
    chunks = (rows + CHUNK - 1) // CHUNK
    if parallel:
        for c in prange(chunks):
            i0, i1 = c * CHUNK, min(rows, (c + 1) * CHUNK)
            qrows_range(h1, t, w1, l, i0, i1, xq, xo, xs, xso, xsum, n, gs, bits)
            qrows_range(h3, t, w3, l, i0, i1, xq, xo, xs, xso, xsum, n, gs, bits)
    else:
        qrows_range(h1, t, w1, l, 0, rows, xq, xo, xs, xso, xsum, n, gs, bits)
        qrows_range(h3, t, w3, l, 0, rows, xq, xo, xs, xso, xsum, n, gs, bits)
