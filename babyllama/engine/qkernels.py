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
  keeps an atomic reference count that the two threads fight over. More generally nothing here
  takes a slice: the quantized activations are flat 1-D arrays addressed by offsets (xo: where
  this row's values start, xso: its scales), and a kind of matrix is (data, offsets, scales) with
  the scales of every matrix of the kind in one flat array.
"""

import numpy as np
from numba import njit, prange

from ..simd.jit import JIT
from .q4kernels import row_q4


_INV_127 = np.float32(0.007874015718698502)  # 1/127 in float32, what gcc makes of "/ 127.0f"
_JUST_BELOW_HALF = np.float32(0.49999997)  # gcc's inline round(): trunc(v + copysign(this, v))


@njit(**JIT)
def quantize_activations(xq, xo, xs, xso, x, t, gs):
    """runq's quantize() as compiled: xq[xo : xo + n] int8 and xs[xso : xso + n/gs] float32 from
    x[t] (n,) float32 (xq, xs flat).

    Per group: scale = max|x| * (1/127); q = round(x * (127 / max|x|)), with gcc's inline round
    (add 0.49999997 with x's sign, truncate; in float32). A group of zeros gets scale 0, q = 0.
    """
    for g in range(x.shape[1] // gs):
        wmax = np.float32(0.0)
        for i in range(g * gs, (g + 1) * gs):
            wmax = max(wmax, abs(x[t, i]))
        xs[xso + g] = wmax * _INV_127
        if wmax == 0:
            for i in range(g * gs, (g + 1) * gs):
                xq[xo + i] = 0
            continue
        inv = np.float32(127.0) / wmax
        for i in range(g * gs, (g + 1) * gs):
            v = x[t, i] * inv
            r = v + (_JUST_BELOW_HALF if v >= 0 else -_JUST_BELOW_HALF)
            xq[xo + i] = np.int8(np.int32(r))


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


@njit(inline="always", **JIT)
def _group_q8(w, wo, x, xo, gs):
    """Exact int32 sum of w[wo:wo+gs] * x[xo:xo+gs] (int8 values)."""
    acc = np.int32(0)
    for k in range(gs):
        acc = np.int32(acc + np.int32(w[np.uint64(wo + k)]) * np.int32(x[np.uint64(xo + k)]))
    return acc


@njit(**JIT)
def _row_q8(data, base, xq, xo, xs, xso, scales, so, n, gs):
    """One output of an int8 matmul: the row's n int8 values start at data[base], its scales at
    scales[so]; the activations at xq[xo], xs[xso]."""
    val = np.float32(0.0)
    if gs == 64:  # literal trip count: one fully vectorized block per group
        for g in range(n // 64):
            val += np.float32(_group_q8(data, base + g * 64, xq, xo + g * 64, 64)) * (scales[so + g] * xs[xso + g])
    else:
        for g in range(n // gs):
            val += np.float32(_group_q8(data, base + g * gs, xq, xo + g * gs, gs)) * (scales[so + g] * xs[xso + g])
    return val


@njit(inline="always", **JIT)
def _row(data, offset, i, xq, xo, xs, xso, scales, so, n, gs, bits):
    """Row i of the matrix at data[offset] (scales from scales[so]) times the activations."""
    if bits == 8:
        return _row_q8(data, offset + i * n, xq, xo, xs, xso, scales, so + i * (n // gs), n, gs)
    return row_q4(data, offset + i * (n // 2), xq, xo, xs, xso, scales, so + i * (n // gs), n, gs)  # q4kernels.py


@njit(parallel=True, **JIT)
def qmatmul(out, t, data, offsets, scales, l, xq, xo, xs, xso, n, gs, bits, parallel):
    """out[t] (rows,) = W_l @ x for matrix l of one kind (data, offsets, scales flat: matrix l's
    scales start at l * rows * n / gs), x (n,) given quantized at xq[xo:], xs[xso:]."""
    rows = out.shape[1]
    offset, so = offsets[l], l * rows * (n // gs)
    if parallel:
        for i in prange(rows):
            out[t, i] = _row(data, offset, i, xq, xo, xs, xso, scales, so, n, gs, bits)
    else:
        for i in range(rows):
            out[t, i] = _row(data, offset, i, xq, xo, xs, xso, scales, so, n, gs, bits)


@njit(parallel=True, **JIT)
def qmatmul3(q, k, v, t, wq, wk, wv, l, xq, xo, xs, xso, n, gs, bits, parallel):
    """q[t], k[t], v[t] = Wq @ x, Wk @ x, Wv @ x (layer l; each w a (data, offsets, scales) kind) in
    one parallel loop over all their rows.

    One thread-pool launch instead of three: at ~5 us a launch and 85 launches a token, the
    launches cost the 110M model about a tenth of its int8 decode time.
    """
    nq, nk = q.shape[1], k.shape[1]
    dq, oq, sq = wq[0], wq[1][l], l * nq * (n // gs)
    dk, ok, sk = wk[0], wk[1][l], l * nk * (n // gs)
    dv, ov, sv = wv[0], wv[1][l], l * nk * (n // gs)
    if parallel:
        for r in prange(nq + 2 * nk):
            if r < nq:
                q[t, r] = _row(dq, oq, r, xq, xo, xs, xso, wq[2], sq, n, gs, bits)
            elif r < nq + nk:
                k[t, r - nq] = _row(dk, ok, r - nq, xq, xo, xs, xso, wk[2], sk, n, gs, bits)
            else:
                v[t, r - nq - nk] = _row(dv, ov, r - nq - nk, xq, xo, xs, xso, wv[2], sv, n, gs, bits)
    else:
        for r in range(nq):
            q[t, r] = _row(dq, oq, r, xq, xo, xs, xso, wq[2], sq, n, gs, bits)
        for r in range(nk):
            k[t, r] = _row(dk, ok, r, xq, xo, xs, xso, wk[2], sk, n, gs, bits)
            v[t, r] = _row(dv, ov, r, xq, xo, xs, xso, wv[2], sv, n, gs, bits)


@njit(parallel=True, **JIT)
def qmatmul2(h1, h3, t, w1, w3, l, xq, xo, xs, xso, n, gs, bits, parallel):
    """h1[t], h3[t] = W1 @ x, W3 @ x (SwiGLU's two up-projections) in one parallel loop over the rows.

    The gate is applied afterwards (kernels.silu_mul): gcc compiles it differently in each block of
    16, so it runs over the whole vector rather than fused into the rows.
    """
    rows = h1.shape[1]
    d1, o1, s1 = w1[0], w1[1][l], l * rows * (n // gs)
    d3, o3, s3 = w3[0], w3[1][l], l * rows * (n // gs)
    if parallel:
        for i in prange(rows):
            h1[t, i] = _row(d1, o1, i, xq, xo, xs, xso, w1[2], s1, n, gs, bits)
            h3[t, i] = _row(d3, o3, i, xq, xo, xs, xso, w3[2], s3, n, gs, bits)
    else:
        for i in range(rows):
            h1[t, i] = _row(d1, o1, i, xq, xo, xs, xso, w1[2], s1, n, gs, bits)
            h3[t, i] = _row(d3, o3, i, xq, xo, xs, xso, w3[2], s3, n, gs, bits)
