"""engine/ofast.py: llama2.c's float code as gcc -Ofast -march=native compiles it.

The end-to-end evidence is runq's fixture (tests/test_quant.py) and run.c's (tests/test_cli.py);
these tests pin the pieces against independent numpy models of the same compiled order.
"""


import numpy as np
import pytest
from conftest import libm_expf
from numba import njit

from babyllama.simd import ofast
from babyllama.engine.qkernels import quantize_activations

F32 = np.float32


@njit(cache=False)
def _dot(a, ao, b, bo, n):
    return ofast.dot(a, ao, b, bo, n)


@njit(cache=False)
def _fma_array(a, b, c):
    out = np.empty_like(c)
    for i in range(c.shape[0]):
        out[i] = ofast.fma(a[i], b[i], c[i])
    return out


def _fma(a, b, c):
    return _fma_array(np.atleast_1d(F32(a)), np.atleast_1d(F32(b)), np.atleast_1d(F32(c)))[0]


def _vector_dot_model(a, b):
    """gcc's vectorized `s += a[i] * b[i]`, written as whole-vector numpy steps."""
    n = len(a)
    n16, rem = divmod(n, 16)
    v8 = np.zeros(8, F32)
    if n16:
        acc = np.zeros(16, F32)
        for c in range(n16):
            acc = _fma_array(a[16 * c : 16 * c + 16], b[16 * c : 16 * c + 16], acc)
        v8 = acc[8:] + acc[:8]
    j = 16 * n16
    if rem >= 8:
        v8 = _fma_array(a[j : j + 8], b[j : j + 8], v8)
        j += 8
    v4 = v8[4:] + v8[:4]
    v2 = v4[2:] + v4[:2]
    s = v2[1] + v2[0]
    for i in range(j, n):
        s = _fma(a[i], b[i], s)
    return s


@pytest.mark.parametrize("n", [0, 1, 5, 7, 8, 9, 15, 16, 17, 23, 24, 31, 40, 64, 100, 172, 288])
def test_dot_is_the_vectorized_order(n):
    rng = np.random.default_rng(n)
    a = (rng.standard_normal(n) * 3).astype(F32)
    b = rng.standard_normal(n).astype(F32)
    got = F32(_dot(a, 0, b, 0, n))
    assert got.view(np.int32) == F32(_vector_dot_model(a, b)).view(np.int32)
    # and the offsets address the same elements
    pad = np.concatenate([np.ones(3, F32), a])
    assert F32(_dot(pad, 3, b, 0, n)).view(np.int32) == got.view(np.int32)


def test_dot_order_differs_from_left_to_right():
    """The model is not vacuous: on these values the vectorized order rounds differently."""
    rng = np.random.default_rng(1)
    differs = 0
    for _ in range(50):
        a = (rng.standard_normal(100) * 1e3).astype(F32)
        b = rng.standard_normal(100).astype(F32)
        seq = F32(0.0)
        for x, y in zip(a, b):
            seq = F32(seq + x * y)
        differs += seq != _dot(a, 0, b, 0, 100)
    assert differs > 10


@pytest.mark.parametrize("peel", [False, True])
def test_short_softmax_is_libm_expf_and_reciprocal(peel):
    """Below 8 elements (9 when peeled) nothing is vectorized: libm's expf, a running sum, and
    every element times 1/sum (what -Ofast makes of x[i] /= sum)."""
    expf = libm_expf()
    x = np.array([0.3, -1.25, 2.5, 0.0, -7.0, 1.0, 2.0], F32)
    got = x.copy()
    ofast.softmax(got, 0, len(x), peel)
    m = x.max()
    e = [F32(expf(float(v - m))) for v in x]
    total = F32(0.0)
    for v in e:
        total = F32(total + v)
    inv = F32(1.0) / total
    assert np.array_equal(got, np.array([v * inv for v in e], F32))


def test_long_softmax_is_a_distribution():
    x = (np.random.default_rng(3).standard_normal(1000) * 4).astype(F32)
    got = x.copy()
    ofast.softmax(got, 0, 1000, True)
    assert abs(float(got.sum()) - 1.0) < 1e-5
    assert np.argmax(got) == np.argmax(x)
    np.testing.assert_allclose(got, np.exp(x - x.max()) / np.exp(x - x.max()).sum(), rtol=1e-5)


def test_inv_sqrt_is_accurate_after_the_newton_step():
    x = np.abs(np.random.default_rng(4).standard_normal(2000).astype(F32)) * F32(100) + F32(1e-5)
    got = np.array([_inv_sqrt(v) for v in x], F32)
    want = 1.0 / np.sqrt(x.astype(np.float64))
    assert np.max(np.abs(got / want - 1)) < 4e-7  # ~23 bits: one Newton step from rsqrtss's 12


@njit(cache=False)
def _inv_sqrt(x):
    return ofast.inv_sqrt(x)


def test_quantize_uses_gcc_inline_round_and_reciprocal():
    """q = trunc(v + copysign(0.49999997, v)) with v = x * (127 / max|x|), scale = max * (1/127)."""
    rng = np.random.default_rng(5)
    x = (rng.standard_normal(4096) * rng.choice([1e-3, 1.0, 30.0], 4096)).astype(F32)
    x[:8] = 0.0  # an all-zero group: scale 0, q 0
    gs = 8
    xq = np.empty(4096, np.int8)
    xs = np.empty(4096 // gs, F32)
    xsum = np.empty(4096 // gs, np.int32)
    quantize_activations(xq, 0, xs, 0, xsum, x[None], 0, gs)
    g = x.reshape(-1, gs)
    wmax = np.abs(g).max(axis=1)
    assert np.array_equal(xs, (wmax * F32(1 / 127)).astype(F32))
    with np.errstate(divide="ignore", invalid="ignore"):
        v = (g * (F32(127.0) / wmax)[:, None]).astype(F32)
        r = (v + np.copysign(F32(0.49999997), v)).astype(F32)
    want = np.where(wmax[:, None] > 0, np.trunc(np.nan_to_num(r)), 0).astype(np.int8).reshape(-1)
    assert np.array_equal(xq, want)
    assert np.abs(xq).max() == 127
    assert np.array_equal(xsum, xq.astype(np.int32).reshape(-1, gs).sum(axis=1))  # the VNNI kernels' group sums


def test_exact_primitives_where_the_cpu_has_them():
    """On x86-64 with AVX-512 and libmvec the primitives are the hardware's; the fallback is exact
    math. Either way 1/x and exp(x) come out within their documented error."""
    x = np.linspace(0.1, 40.0, 24).astype(F32)  # one 16-block, one 8-block
    r = x.copy()
    _rcp(r)
    assert np.max(np.abs(r * x - 1)) < (2.0**-11 if ofast.EXACT_OFAST else 1e-6)
    e = -x.copy()
    _exp(e)
    np.testing.assert_allclose(e, np.exp(-x.astype(np.float64)), rtol=4e-7)


@njit(cache=False)
def _rcp(x):
    ofast.rcp16(x, 0)
    ofast.rcp8(x, 16)


@njit(cache=False)
def _exp(x):
    ofast.exp16(x, 0)
    ofast.exp8(x, 16)


@njit(cache=False)
def _dot8_rows(out, w, x, n):
    ofast.dot8(out, 0, w, 0, x, 0, n)


@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 15, 16, 17, 24, 31, 48, 64, 100, 172, 288])
def test_dot8_is_eight_dots(n):
    """Eight rows side by side, the fold transposed: still each row's dot(), bit for bit."""
    rng = np.random.default_rng(n + 100)
    w = (rng.standard_normal((8, n)) * rng.uniform(0.1, 1e3, (8, 1))).astype(F32)
    x = rng.standard_normal(n).astype(F32)
    got = np.full(8, np.nan, F32)
    _dot8_rows(got, w, x, n)
    want = np.array([_dot(w, r * n, x, 0, n) for r in range(8)], F32)
    assert got.view(np.int32).tolist() == want.view(np.int32).tolist()


@njit(cache=False)
def _chains(out, oo, w, wo, v, vo, vstride, n, pages, page_stride):
    ofast.fma_chains(out, oo, w, wo, v, vo, vstride, n, pages, 0, page_stride)


def test_fma_chains_are_sequential_fmas_across_pages():
    """Each of the 4 x 8 outputs is fma(w_t, v_t, acc) for t = 0, 1, ... starting from 0, with
    position t read from page pages[t // 16], row t % 16 (a paged KV cache, pages out of order)."""
    rng = np.random.default_rng(7)
    n, stride = 37, 24
    page_stride = 16 * stride + 8  # pages apart from each other
    pages = np.array([2, 0, 1], np.int32)
    w = rng.standard_normal(3 * n).astype(F32)
    v = rng.standard_normal(3 * page_stride).astype(F32)
    oo, wo, vo = (0, 8, 16, 8), (0, n, 2 * n, n), (0, 8, 16, 8)  # a repeated unit, as padding does
    out = np.full(24, np.nan, F32)
    _chains(out, oo, w, wo, v, vo, stride, n, pages, page_stride)
    for k in range(4):
        for i in range(8):
            acc = F32(0.0)
            for t in range(n):
                at = vo[k] + pages[t // 16] * page_stride + (t % 16) * stride + i
                acc = _fma(w[wo[k] + t], v[at], acc)
            assert out[oo[k] + i].view(np.int32) == F32(acc).view(np.int32)


@njit(cache=False)
def _vmax(x, o, n):
    return ofast.vmax(x, o, n)


@pytest.mark.parametrize("n", [1, 2, 15, 16, 17, 33, 100])
def test_vmax_is_the_maximum(n):
    x = np.random.default_rng(n).standard_normal(n + 3).astype(F32)
    for o in (0, 3):
        assert _vmax(x, o, n) == x[o : o + n].max()


@njit(cache=False)
def _gates(hb, hb2):
    ofast.gate16(hb, hb2, 0)
    ofast.gate8(hb, hb2, 16)


@njit(cache=False)
def _gates_from_primitives(hb, hb2):
    """The same blocks as loops over the vector primitives (what the fused gates replaced)."""
    t = np.empty(24, np.float32)
    for j in range(24):
        t[j] = -hb[j]
    ofast.exp16(t, 0)
    ofast.exp8(t, 16)
    for j in range(24):
        t[j] = t[j] + np.float32(1.0)
    d = t.copy()
    ofast.rcp16(t, 0)
    ofast.rcp8(t, 16)
    for j in range(24):
        inv = ofast.newton_recip(t[j], d[j])
        hb[j] = (inv * hb[j]) * hb2[j] if j < 16 else inv * (hb[j] * hb2[j])


def test_gates_are_the_primitives_composed():
    rng = np.random.default_rng(8)
    hb = (rng.standard_normal(24) * 4).astype(F32)
    hb2 = rng.standard_normal(24).astype(F32)
    got, want = hb.copy(), hb.copy()
    _gates(got, hb2)
    _gates_from_primitives(want, hb2)
    assert got.view(np.int32).tolist() == want.view(np.int32).tolist()
    silu = hb / (1 + np.exp(-hb.astype(np.float64))) * hb2
    np.testing.assert_allclose(got, silu, rtol=1e-5, atol=1e-6)


@njit(cache=False)
def _columns(out, oo, q, k, ko, d, stride, scale):
    ofast.dot16_columns(out, oo, q, 0, k, ko, d, stride, scale)


@pytest.mark.parametrize("d", [1, 6, 8, 12, 16, 24, 40, 48, 64, 100])
def test_dot16_columns_are_dots_of_the_columns(d):
    """Attention's scores: 16 positions' dot products at once, each exactly dot() times scale."""
    rng = np.random.default_rng(d + 200)
    stride = 37
    k = rng.standard_normal((d, stride)).astype(F32)
    q = (rng.standard_normal(d) * 10).astype(F32)
    scale = F32(0.125)
    out = np.full(20, np.nan, F32)
    _columns(out, 2, q, k, 5, d, stride, scale)  # columns 5..20 into out[2:18]
    for j in range(16):
        col = np.ascontiguousarray(k[:, 5 + j])
        want = F32(_dot(q, 0, col, 0, d)) * scale
        assert out[2 + j].view(np.int32) == F32(want).view(np.int32)
    assert np.isnan(out[:2]).all() and np.isnan(out[18:]).all()
