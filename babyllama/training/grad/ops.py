"""The hand-written trainer's operations: each forward with its backward, as Numba kernels over
(rows, width) arrays of float32 (training) or float64 (the gradient checks).

Rows are tokens: N = B * T, batch-major. Kernels are serial and release the GIL: the trainer
runs one share of the batch per thread (trainer.py), so no kernel waits on a thread pool and
every sum has one fixed order. Matrix products are NumPy's (`linear_*`, BLAS): the trainer has no
batch-invariance promise to keep (the engine does), and a GEMM is a solved problem; the model
math is what is hand-written here.

Options: KERNEL_JIT lets LLVM reassociate and contract (vectorise the sums: this trainer matches
torch to float32 rounding, not llama2.c's order), but keeps NaN and Inf semantics, so a diverging
run still shows a non-finite loss. The kernels Python calls (`@kernel`) keep their machine code
in babyllama's cache folder, so only a first run compiles (~10 s); their helpers are compiled
into them, as the engine's are (simd/jit.py). `fexp` is a vectorisable float32 exp (Cephes' polynomial,
~1 ulp); in float64 it is math.exp, so the float64 checks compare exact functions.
"""

from __future__ import annotations

import math

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload

from ...simd.jit import JIT, entry

# fastmath minus nnan/ninf: NaN must survive to the loss check (training/loop.py stops on it)
FAST = {"reassoc", "contract", "nsz", "arcp"}
KERNEL_JIT = dict(JIT, fastmath=FAST)  # helpers: compiled into the kernels that call them
kernel = entry(fastmath=FAST)  # what Python calls: machine code kept on disk (simd/jit.py)


# ---------------------------------------------------------------------------------------------
# scalar functions: exp, sigmoid and tanh that vectorise in float32, exact in float64


@intrinsic
def _f32_from_bits(typingctx, bits):
    """The float32 whose bit pattern is the low 32 bits of the integer `bits` (an LLVM bitcast, so
    loops around it stay vectorised)."""
    if not isinstance(bits, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        low = builder.trunc(args[0], ir.IntType(32)) if bits.bitwidth > 32 else args[0]
        return builder.bitcast(low, ir.FloatType())

    return types.float32(bits), codegen


@njit(inline="always")
def _exp_reduced_f32(n, r):
    """e^r * 2^n for |r| <= ln2/2 and a whole n in [-126, 127]: Cephes expf's degree-7
    polynomial, 2^n by the exponent bits."""
    p = np.float32(1.9875691500e-4)
    p = p * r + np.float32(1.3981999507e-3)
    p = p * r + np.float32(8.3334519073e-3)
    p = p * r + np.float32(4.1665795894e-2)
    p = p * r + np.float32(1.6666665459e-1)
    p = p * r + np.float32(5.0000001201e-1)
    p = p * r * r + r + np.float32(1.0)
    return p * _f32_from_bits((np.int64(n) + 127) << 23)


def fexp(x):
    """exp(x); see the overload."""
    return math.exp(x)


@overload(fexp, jit_options=KERNEL_JIT)
def _fexp(x):
    if x == types.float32:
        def exp_f32(x):
            # Cephes expf: x = n ln2 + r (ln2 in two parts, so r is exact); NaN passes through
            # the clamps (comparisons with NaN are false)
            c = np.float32(-87.33654) if x < np.float32(-87.33654) else x
            c = np.float32(88.72283) if c > np.float32(88.72283) else c
            n = np.floor(c * np.float32(1.44269504) + np.float32(0.5))
            y = _exp_reduced_f32(n, c - n * np.float32(0.693359375) + n * np.float32(2.12194440e-4))
            # exactly 0 below the range (and for -inf: masked scores), never a denormal, which
            # would cost a microcode assist per operation downstream
            return np.float32(0.0) if x < np.float32(-87.33654) else y
        return exp_f32
    return lambda x: math.exp(x)


def fexp_softmax(x):
    """exp(x) for x <= 0 (or -inf: 0); see the overload."""
    return math.exp(x)


@overload(fexp_softmax, jit_options=KERNEL_JIT)
def _fexp_softmax(x):
    if x == types.float32:
        def exp_f32(x):
            # fexp for a softmax's x - max <= 0, in fewer operations: no clamps (the select
            # discards what a huge |n| makes of the exponent bits) and a one-step reduction
            # r = x - n ln2 (its error, |n| * 2e-9, stays below 3e-7 of the result for x > -87)
            n = np.rint(x * np.float32(1.44269504))
            y = _exp_reduced_f32(n, x - n * np.float32(0.6931471806))
            return np.float32(0.0) if x < np.float32(-87.33654) else y
        return exp_f32
    return lambda x: math.exp(x)


def ftanh(x):
    """tanh(x); see the overload."""
    return math.tanh(x)


@overload(ftanh, jit_options=KERNEL_JIT)
def _ftanh(x):
    if x == types.float32:
        # 1 - 2 / (e^2x + 1): exact at both tails, absolute error ~1e-7 near 0 (enough for GELU,
        # where tanh is added to 1)
        return lambda x: np.float32(1.0) - np.float32(2.0) / (fexp(np.float32(2.0) * x) + np.float32(1.0))
    return lambda x: math.tanh(x)


# ---------------------------------------------------------------------------------------------
# matrix products (NumPy / BLAS): y = x W^T (+ b) and its gradients


def linear_forward(x, w, b, out):
    """out (N, O) = x (N, I) @ w (O, I)^T (+ b (O,))."""
    np.matmul(x, w.T, out=out)
    if b is not None:
        out += b


def linear_backward(dy, x, w, dw, db, dx, accumulate_dx: bool):
    """dw += dy^T x; db += sum of dy over rows; dx (N, I) = dy @ w (or += when accumulate_dx)."""
    dw += dy.T @ x
    if db is not None:
        db += dy.sum(axis=0)
    if accumulate_dx:
        dx += dy @ w
    else:
        np.matmul(dy, w, out=dx)


# ---------------------------------------------------------------------------------------------
# embeddings


@kernel
def embedding_forward(tokens, T, wte, wpe, out):
    """out[n] = wte[tokens[n]] (+ wpe[n % T] when wpe has rows: GPT-2's learned positions)."""
    N, D = out.shape
    positions = wpe.shape[0] > 0
    for n in range(N):
        tok = tokens[n]
        for i in range(D):
            out[n, i] = wte[tok, i]
        if positions:
            t = n % T
            for i in range(D):
                out[n, i] += wpe[t, i]


@kernel
def embedding_backward(tokens, T, dout, dwte, dwpe):
    """dwte[tokens[n]] += dout[n] (and dwpe[n % T] += dout[n]); serial: rows repeat tokens."""
    N, D = dout.shape
    positions = dwpe.shape[0] > 0
    for n in range(N):
        tok = tokens[n]
        for i in range(D):
            dwte[tok, i] += dout[n, i]
        if positions:
            t = n % T
            for i in range(D):
                dwpe[t, i] += dout[n, i]


# ---------------------------------------------------------------------------------------------
# normalisation: RMSNorm (Llama, center=False, no bias) and LayerNorm (GPT-2, center=True)


@kernel
def norm_forward(x, w, b, eps, center, out, mean, rstd):
    """out = (x - mean) * rstd * w (+ b), per row; RMSNorm when not center (mean 0, no b).

    x, out (N, D); w, b (D,); mean, rstd (N,) saved for the backward.
    """
    N, D = x.shape
    zero, inv_d, eps = x.dtype.type(0), x.dtype.type(1.0 / D), x.dtype.type(eps)
    for n in range(N):
        mu = zero
        if center:
            for i in range(D):
                mu += x[n, i]
            mu *= inv_d
        ss = zero
        for i in range(D):
            d = x[n, i] - mu
            ss += d * d
        r = x.dtype.type(1) / math.sqrt(ss * inv_d + eps)
        mean[n] = mu
        rstd[n] = r
        for i in range(D):
            y = (x[n, i] - mu) * r * w[i]
            out[n, i] = y + b[i] if center else y


@kernel
def norm_backward(dout, x, w, mean, rstd, center, dx, dw, db):
    """dx += d(norm)/dx . dout; dw (and db when center) += the weight (bias) gradient.

    With xhat = (x - mean) * rstd and g = dout * w:
      dx = rstd * (g - mean(g) - xhat * mean(g * xhat))   (LayerNorm; RMSNorm drops mean(g))
    """
    N, D = x.shape
    zero, inv_d = x.dtype.type(0), x.dtype.type(1.0 / D)
    for n in range(N):
        mu, r = mean[n], rstd[n]
        mg = zero
        mgx = zero
        for i in range(D):
            g = dout[n, i] * w[i]
            mg += g
            mgx += g * (x[n, i] - mu) * r
        mg = mg * inv_d if center else zero
        mgx *= inv_d
        for i in range(D):
            xhat = (x[n, i] - mu) * r
            dx[n, i] += r * (dout[n, i] * w[i] - mg - xhat * mgx)
            dw[i] += dout[n, i] * xhat
        if center:
            for i in range(D):
                db[i] += dout[n, i]


# ---------------------------------------------------------------------------------------------
# causal self-attention with grouped-query heads and (Llama) RoPE, fused
#
# One (sequence, key/value head) pair at a time: its keys and values are copied once,
# transposed to (hs, T), so every loop over key positions j runs along contiguous memory and
# vectorises, with the query heads that share them (GQA) taking turns. Row loops run to
# L rounded up to PAD (padding scores -inf, probabilities 0): the vectorised loop body then does
# all the work instead of a scalar remainder of up to PAD - 1 exp calls per row.

PAD = 8


@njit(inline="always")
def _rotate(a, row, col, hs, cos, sin, t, sign):
    """Rotate the interleaved pairs of a[row, col:col+hs] by sign * angle(t) (sign -1: the inverse
    rotation, which is also the rotation's backward)."""
    for i in range(hs // 2):
        c, s = cos[t, i], sin[t, i] * sign
        x0, x1 = a[row, col + 2 * i], a[row, col + 2 * i + 1]
        a[row, col + 2 * i] = x0 * c - x1 * s
        a[row, col + 2 * i + 1] = x0 * s + x1 * c


@njit(**KERNEL_JIT)
def _dots(out, a, row, col, mt, hs, L, scale):
    """out[j] = scale * sum_d a[row, col + d] * mt[d, j] for j < L: four d per pass over j, so the
    partial sums travel through memory hs/4 times instead of hs times."""
    d = 0
    while d < hs:
        if d + 4 <= hs:
            a0, a1 = a[row, col + d] * scale, a[row, col + d + 1] * scale
            a2, a3 = a[row, col + d + 2] * scale, a[row, col + d + 3] * scale
            if d == 0:
                for j in range(L):
                    out[j] = a0 * mt[d, j] + a1 * mt[d + 1, j] + a2 * mt[d + 2, j] + a3 * mt[d + 3, j]
            else:
                for j in range(L):
                    out[j] += a0 * mt[d, j] + a1 * mt[d + 1, j] + a2 * mt[d + 2, j] + a3 * mt[d + 3, j]
            d += 4
        else:
            a0 = a[row, col + d] * scale
            if d == 0:
                for j in range(L):
                    out[j] = a0 * mt[d, j]
            else:
                for j in range(L):
                    out[j] += a0 * mt[d, j]
            d += 1


@njit(**KERNEL_JIT)
def _weighted_sums(dst, row, col, p, mt, hs, L):
    """dst[row, col + d] = sum_j p[j] * mt[d, j] for j < L, four d per pass."""
    zero = p.dtype.type(0)
    d = 0
    while d < hs:
        if d + 4 <= hs:
            s0 = s1 = s2 = s3 = zero
            for j in range(L):
                pj = p[j]
                s0 += pj * mt[d, j]
                s1 += pj * mt[d + 1, j]
                s2 += pj * mt[d + 2, j]
                s3 += pj * mt[d + 3, j]
            dst[row, col + d], dst[row, col + d + 1], dst[row, col + d + 2], dst[row, col + d + 3] = s0, s1, s2, s3
            d += 4
        else:
            s0 = zero
            for j in range(L):
                s0 += p[j] * mt[d, j]
            dst[row, col + d] = s0
            d += 1


@njit(**KERNEL_JIT)
def _outer_add(acc, a, row, col, p, hs, L):
    """acc[d, j] += a[row, col + d] * p[j] for j < L (a rank-one update, four d per pass)."""
    d = 0
    while d < hs:
        if d + 4 <= hs:
            a0, a1, a2, a3 = a[row, col + d], a[row, col + d + 1], a[row, col + d + 2], a[row, col + d + 3]
            for j in range(L):
                pj = p[j]
                acc[d, j] += a0 * pj
                acc[d + 1, j] += a1 * pj
                acc[d + 2, j] += a2 * pj
                acc[d + 3, j] += a3 * pj
            d += 4
        else:
            a0 = a[row, col + d]
            for j in range(L):
                acc[d, j] += a0 * p[j]
            d += 1


def row_max(s, L):
    """max(s[:L]); see the overload."""
    return s[:L].max()


@overload(row_max, jit_options=KERNEL_JIT)
def _row_max(s, L):
    if s.dtype == types.float32:
        def max_f32(s, L):
            # LLVM vectorises no float max reduction unless NaN is ruled out (which would hide a
            # NaN score), but it does vectorise an integer one: a float's bits, with the
            # magnitude bits flipped when negative, sort as int32 in the float's order (NaN above
            # everything, so it still propagates).
            bits = s.view(np.int32)
            m = np.int32(-2147483648)
            for j in range(L):
                m = max(m, np.int32(bits[j] ^ ((bits[j] >> 31) & 0x7FFFFFFF)))
            return _f32_from_bits(m ^ ((m >> 31) & 0x7FFFFFFF))
        return max_f32

    def max_any(s, L):
        m = s[0]
        for j in range(1, L):
            m = max(m, s[j])
        return m
    return max_any


@njit(**KERNEL_JIT)
def _group_forward(qkv, b, g, T, n_heads, n_kv_heads, hs, cos, sin, att, out, kt, vt, s):
    """attention_forward for sequence b and key/value head g (its kv_mul query heads)."""
    Q, KV = n_heads * hs, n_kv_heads * hs
    kv_mul = n_heads // n_kv_heads
    rope = cos.shape[0] > 0
    one, zero, ninf = qkv.dtype.type(1), qkv.dtype.type(0), qkv.dtype.type(-np.inf)
    scale = qkv.dtype.type(1.0 / math.sqrt(hs))
    r0, ko, vo = b * T, Q + g * hs, Q + KV + g * hs
    for t in range(T):
        if rope:
            _rotate(qkv, r0 + t, ko, hs, cos, sin, t, one)
        for d in range(hs):
            kt[d, t] = qkv[r0 + t, ko + d]
            vt[d, t] = qkv[r0 + t, vo + d]
    for h in range(g * kv_mul, (g + 1) * kv_mul):
        qo, keep = h * hs, att[b, h]
        for t in range(T):
            row, L, base = r0 + t, t + 1, t * (t + 1) // 2
            Lp = (L + PAD - 1) // PAD * PAD
            if rope:
                _rotate(qkv, row, qo, hs, cos, sin, t, one)
            _dots(s, qkv, row, qo, kt, hs, L, scale)  # (L,) scores q . k_j / sqrt(hs)
            mx = row_max(s, L)
            for j in range(L, Lp):
                s[j] = ninf  # the causal mask, and the padding
            total = zero
            for j in range(Lp):
                e = fexp_softmax(s[j] - mx)
                s[j] = e
                total += e
            inv = one / total
            for j in range(L):  # (Lp,) probabilities (0 past t: exp(-inf) is exactly 0)
                p = s[j] * inv
                s[j] = p
                keep[base + j] = p
            _weighted_sums(out, row, qo, s, vt, hs, Lp)  # (hs,) sum_j p_j v_j


@kernel
def attention_forward(qkv, T, n_heads, n_kv_heads, hs, cos, sin, att, out):
    """Causal softmax(q k^T / sqrt(hs)) v per head; query head h reads key/value head
    h // (n_heads / n_kv_heads).

    qkv (N, Q + 2 KV): each row [q heads | k heads | v heads]; RoPE (when cos has rows) is applied
    to q and k IN PLACE, so the backward reads the rotated vectors. att (B, H, T(T+1)/2): the
    probabilities of row t at t(t+1)/2 .. (the causal triangle only). out (N, Q).
    """
    B = qkv.shape[0] // T
    Tp = (T + PAD - 1) // PAD * PAD
    for item in range(B * n_kv_heads):
        kt = np.zeros((hs, Tp), qkv.dtype)  # zero past T: padded positions add nothing
        vt = np.zeros((hs, Tp), qkv.dtype)
        s = np.empty(Tp, qkv.dtype)
        _group_forward(qkv, item // n_kv_heads, item % n_kv_heads, T, n_heads, n_kv_heads, hs, cos, sin, att, out,
                       kt, vt, s)


@njit(**KERNEL_JIT)
def _group_backward(dout, qkv, att, b, g, T, n_heads, n_kv_heads, hs, cos, sin, dqkv, kt, vt, dkt, dvt, p, ds):
    """attention_backward for sequence b and key/value head g."""
    Q, KV = n_heads * hs, n_kv_heads * hs
    kv_mul = n_heads // n_kv_heads
    rope = cos.shape[0] > 0
    one, zero = qkv.dtype.type(1), qkv.dtype.type(0)
    scale = qkv.dtype.type(1.0 / math.sqrt(hs))
    r0, ko, vo = b * T, Q + g * hs, Q + KV + g * hs
    for t in range(T):
        for d in range(hs):
            kt[d, t] = qkv[r0 + t, ko + d]
            vt[d, t] = qkv[r0 + t, vo + d]
    for h in range(g * kv_mul, (g + 1) * kv_mul):
        qo = h * hs
        for t in range(T):
            row, L, base = r0 + t, t + 1, t * (t + 1) // 2
            Lp = (L + PAD - 1) // PAD * PAD
            for j in range(L):
                p[j] = att[b, h, base + j]
            for j in range(L, Lp):
                p[j] = zero
            _dots(ds, dout, row, qo, vt, hs, Lp, one)  # dP_j = dO . v_j
            pdp = zero
            for j in range(Lp):
                pdp += p[j] * ds[j]  # sum_j P_j dP_j (= dO . O)
            for j in range(Lp):
                ds[j] = p[j] * (ds[j] - pdp) * scale  # dS_j / sqrt(hs): softmax's backward
            _weighted_sums(dqkv, row, qo, ds, kt, hs, Lp)  # dq = sum_j dS_j k_j / sqrt(hs)
            _outer_add(dkt, qkv, row, qo, ds, hs, Lp)  # dk_j += dS_j q / sqrt(hs)
            _outer_add(dvt, dout, row, qo, p, hs, Lp)  # dv_j += P_j dO
            if rope:
                _rotate(dqkv, row, qo, hs, cos, sin, t, -one)
    for t in range(T):
        for d in range(hs):
            dqkv[r0 + t, ko + d] = dkt[d, t]
            dqkv[r0 + t, vo + d] = dvt[d, t]
        if rope:
            _rotate(dqkv, r0 + t, ko, hs, cos, sin, t, -one)


@kernel
def attention_backward(dout, qkv, att, T, n_heads, n_kv_heads, hs, cos, sin, dqkv):
    """dqkv (N, Q + 2 KV) = the gradient of attention_forward's input (before RoPE), from dout
    (N, Q), the rotated qkv and the probabilities att it saved. With P = softmax(S):
      dP = dO V^T; dS = P * (dP - sum_j P dP); dQ = dS K / sqrt(hs); dK = dS^T Q / sqrt(hs); dV = P^T dO
    then the inverse rotation takes dQ and dK back through RoPE.
    """
    B = qkv.shape[0] // T
    Tp = (T + PAD - 1) // PAD * PAD
    for item in range(B * n_kv_heads):
        kt = np.zeros((hs, Tp), qkv.dtype)
        vt = np.zeros((hs, Tp), qkv.dtype)
        dkt = np.zeros((hs, Tp), qkv.dtype)
        dvt = np.zeros((hs, Tp), qkv.dtype)
        p = np.empty(Tp, qkv.dtype)
        ds = np.empty(Tp, qkv.dtype)
        _group_backward(dout, qkv, att, item // n_kv_heads, item % n_kv_heads, T, n_heads, n_kv_heads, hs, cos, sin,
                        dqkv, kt, vt, dkt, dvt, p, ds)


# ---------------------------------------------------------------------------------------------
# feed-forward activations


@kernel
def swiglu_forward(h13, F, out):
    """out (N, F) = silu(h1) * h3, h13 (N, 2F) = [h1 | h3] (Llama's SwiGLU; Shazeer 2020)."""
    N = h13.shape[0]
    one = h13.dtype.type(1)
    for n in range(N):
        for i in range(F):
            a = h13[n, i]
            out[n, i] = a / (one + fexp(-a)) * h13[n, F + i]


@kernel
def swiglu_backward(dout, h13, F, dh13):
    """dh13 = [d/dh1 | d/dh3] of swiglu_forward: silu'(a) = s (1 + a (1 - s)), s = sigmoid(a)."""
    N = h13.shape[0]
    one = h13.dtype.type(1)
    for n in range(N):
        for i in range(F):
            a, u, dy = h13[n, i], h13[n, F + i], dout[n, i]
            s = one / (one + fexp(-a))
            dh13[n, i] = dy * u * s * (one + a * (one - s))
            dh13[n, F + i] = dy * a * s


GELU_K = math.sqrt(2.0 / math.pi)  # GELU's tanh approximation (Hendrycks & Gimpel 2016), as GPT-2
GELU_C = 0.044715


@kernel
def gelu_forward(h, out):
    """out = 0.5 h (1 + tanh(sqrt(2/pi) (h + 0.044715 h^3))), GPT-2's GELU."""
    N, F = h.shape
    k, c, half, one = h.dtype.type(GELU_K), h.dtype.type(GELU_C), h.dtype.type(0.5), h.dtype.type(1)
    for n in range(N):
        for i in range(F):
            x = h[n, i]
            out[n, i] = half * x * (one + ftanh(k * (x + c * x * x * x)))


@kernel
def gelu_backward(dout, h, dh):
    """dh = dout * gelu'(h)."""
    N, F = h.shape
    k, c, half, one = h.dtype.type(GELU_K), h.dtype.type(GELU_C), h.dtype.type(0.5), h.dtype.type(1)
    three = h.dtype.type(3)
    for n in range(N):
        for i in range(F):
            x = h[n, i]
            th = ftanh(k * (x + c * x * x * x))
            dh[n, i] = dout[n, i] * (half * (one + th) + half * x * (one - th * th) * k * (one + three * c * x * x))


# ---------------------------------------------------------------------------------------------
# the loss


@kernel
def cross_entropy(logits, targets, scale, losses, grad):
    """losses[n] = logsumexp(logits[n]) - logits[n, targets[n]]; with grad, logits is overwritten
    by d(scale * sum of losses)/d(logits) = scale * (softmax - onehot): the logits are not needed
    again, and the (N, V) buffer is the largest of the step."""
    N, V = logits.shape
    zero = logits.dtype.type(0)
    for n in range(N):
        mx = logits[n, 0]
        for v in range(1, V):
            mx = max(mx, logits[n, v])
        total = zero
        for v in range(V):
            total += fexp(logits[n, v] - mx)
        tgt = targets[n]
        losses[n] = mx + math.log(total) - logits[n, tgt]
        if grad:
            k = logits.dtype.type(scale) / total
            for v in range(V):
                logits[n, v] = fexp(logits[n, v] - mx) * k
            logits[n, tgt] -= logits.dtype.type(scale)
