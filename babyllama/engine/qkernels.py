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

from .q4kernels import row_q4

# No fastmath: runq's float order is part of the format's contract (see the module docstring).
# not cached on their own: compiled into the forward that calls them (kernels.JIT says why)
QJIT = dict(cache=False, nogil=True, error_model="numpy", fastmath=False)


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

    The gate is applied afterwards (kernels.silu_mul): gcc compiles it differently in each block of
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
