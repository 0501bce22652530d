"""The hand-written trainer's operations (training/grad/ops.py, adamw.py), one by one, against torch
autograd: float64 to 1e-12 (the same formulas, so only rounding differs), float32 against the same
float64 reference (see FLOAT32_TOL)."""

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from babyllama.training.grad import ops  # noqa: E402
from babyllama.training.grad.adamw import AdamW  # noqa: E402
from grad_reference import attention, gelu_tanh, layer_norm, rms_norm, rope  # noqa: E402

torch.set_num_threads(1)

# float32 results against the float64 reference, as max |error| / max |reference| per tensor.
# float32 rounds to 6e-8; these reductions have at most a few hundred terms and our sums are
# reassociated (vectorised) differently from torch's, so errors of 1e-6 are expected; 2e-5 leaves
# a margin of ~20x over the worst seen while any wrong formula is off by 1e-2 or more.
FLOAT32_TOL = 2e-5
FLOAT64_TOL = 1e-12
DTYPES = [pytest.param(np.float64, FLOAT64_TOL, id="float64"), pytest.param(np.float32, FLOAT32_TOL, id="float32")]


def rel(a, b) -> float:
    b = np.asarray(b, np.float64)
    return float(np.abs(np.asarray(a, np.float64) - b).max() / max(np.abs(b).max(), 1e-300))


def t64(a, grad=True):
    return torch.tensor(np.asarray(a, np.float64), requires_grad=grad)


@pytest.mark.parametrize("center", [False, True], ids=["rmsnorm", "layernorm"])
@pytest.mark.parametrize("dtype, tol", DTYPES)
def test_norm_forward_and_backward(dtype, tol, center):
    rng = np.random.default_rng(0)
    N, D = 13, 37  # odd width: vector remainders
    x, w, b, dout = (rng.standard_normal(s) for s in ((N, D), D, D, (N, D)))
    x += 0.5  # a mean for LayerNorm to remove
    out, mean, rstd = np.zeros((N, D), dtype), np.zeros(N, dtype), np.zeros(N, dtype)
    xd, wd, bd, dd = (a.astype(dtype) for a in (x, w, b, dout))
    ops.norm_forward(xd, wd, bd, 1e-5, center, out, mean, rstd)
    dx, dw, db = np.full((N, D), 0.5, dtype), np.zeros(D, dtype), np.zeros(D, dtype)  # dx accumulates
    ops.norm_backward(dd, xd, wd, mean, rstd, center, dx, dw, db)

    tx, tw, tb = t64(x), t64(w), t64(b)
    ref = layer_norm(tx, tw, tb, 1e-5) if center else rms_norm(tx, tw, 1e-5)
    (ref * torch.tensor(dout)).sum().backward()
    assert rel(out, ref.detach()) < tol
    assert rel(dx - 0.5, tx.grad) < tol
    assert rel(dw, tw.grad) < tol
    if center:
        assert rel(db, tb.grad) < tol
    else:
        assert not db.any()  # RMSNorm has no bias


ATTENTION_SHAPES = [
    pytest.param(dict(B=2, T=37, H=4, KV=2, hs=6, rope=True), id="gqa-rope-T37"),  # T past one PAD of 32
    pytest.param(dict(B=1, T=70, H=3, KV=1, hs=4, rope=True), id="multi-query-rope-T70"),
    pytest.param(dict(B=2, T=9, H=3, KV=3, hs=5, rope=False), id="mha-odd-head-no-rope"),  # GPT-2
]


@pytest.mark.parametrize("shape", ATTENTION_SHAPES)
@pytest.mark.parametrize("dtype, tol", DTYPES)
def test_attention_forward_and_backward(dtype, tol, shape):
    B, T, H, KV, hs = (shape[k] for k in ("B", "T", "H", "KV", "hs"))
    rng = np.random.default_rng(1)
    N, Q = B * T, H * hs
    qkv = rng.standard_normal((N, (H + 2 * KV) * hs))
    dout = rng.standard_normal((N, Q))
    angles = np.outer(np.arange(T), 100.0 ** (-np.arange(0, hs, 2) / hs)) if shape["rope"] else np.zeros((0, hs // 2))
    cos, sin = np.cos(angles), np.sin(angles)

    a = qkv.astype(dtype)
    att, out = np.zeros((B, H, T * (T + 1) // 2), dtype), np.zeros((N, Q), dtype)
    c, s = cos.astype(dtype), sin.astype(dtype)
    ops.attention_forward(a, T, H, KV, hs, c, s, att, out)
    dqkv = np.zeros_like(a)
    ops.attention_backward(dout.astype(dtype), a, att, T, H, KV, hs, c, s, dqkv)

    t = t64(qkv)
    q = t[:, :Q].reshape(B, T, H, hs)
    k = t[:, Q:Q + KV * hs].reshape(B, T, KV, hs)
    v = t[:, Q + KV * hs:].reshape(B, T, KV, hs)
    if shape["rope"]:
        q, k = rope(q, torch.tensor(cos), torch.tensor(sin)), rope(k, torch.tensor(cos), torch.tensor(sin))
    ref = attention(q, k, v).reshape(N, Q)
    (ref * torch.tensor(dout)).sum().backward()
    assert rel(out, ref.detach()) < tol
    assert rel(dqkv, t.grad) < tol
    # the probabilities kept for the backward: each causal row sums to 1
    rows = [att[0, 0, t * (t + 1) // 2: (t + 1) * (t + 2) // 2].sum() for t in range(T)]
    assert np.allclose(rows, 1, atol=10 * tol)


@pytest.mark.parametrize("dtype, tol", DTYPES)
def test_swiglu_and_gelu(dtype, tol):
    rng = np.random.default_rng(2)
    N, F = 7, 45
    h13, dg = 3 * rng.standard_normal((N, 2 * F)), rng.standard_normal((N, F))
    g, dh13 = np.zeros((N, F), dtype), np.zeros((N, 2 * F), dtype)
    ops.swiglu_forward(h13.astype(dtype), F, g)
    ops.swiglu_backward(dg.astype(dtype), h13.astype(dtype), F, dh13)
    t = t64(h13)
    ref = torch.nn.functional.silu(t[:, :F]) * t[:, F:]
    (ref * torch.tensor(dg)).sum().backward()
    assert rel(g, ref.detach()) < tol and rel(dh13, t.grad) < tol

    h = 4 * rng.standard_normal((N, F))  # both tails of tanh
    out, dh = np.zeros((N, F), dtype), np.zeros((N, F), dtype)
    ops.gelu_forward(h.astype(dtype), out)
    ops.gelu_backward(dg.astype(dtype), h.astype(dtype), dh)
    t = t64(h)
    ref = gelu_tanh(t)
    (ref * torch.tensor(dg)).sum().backward()
    assert rel(out, ref.detach()) < tol and rel(dh, t.grad) < tol
    assert torch.allclose(ref, torch.nn.functional.gelu(t, approximate="tanh"))  # the reference is torch's GELU


@pytest.mark.parametrize("dtype, tol", DTYPES)
def test_cross_entropy_and_its_gradient_in_place(dtype, tol):
    rng = np.random.default_rng(3)
    N, V = 11, 53
    logits, targets = 4 * rng.standard_normal((N, V)), rng.integers(0, V, N)
    buf, losses = logits.astype(dtype), np.zeros(N, dtype)
    ops.cross_entropy(buf, targets, 0.25, losses, True)
    t = t64(logits)
    ref = torch.nn.functional.cross_entropy(t, torch.tensor(targets), reduction="none")
    (0.25 * ref.sum()).backward()
    assert rel(losses, ref.detach()) < tol
    assert rel(buf, t.grad) < tol  # the logits buffer now holds 0.25 * d(sum of losses)/d(logits)
    kept, none = logits.astype(dtype), np.zeros(N, dtype)
    ops.cross_entropy(kept, targets, 0.0, none, False)
    assert np.array_equal(kept, logits.astype(dtype)) and rel(none, ref.detach()) < tol


def test_embedding_with_and_without_positions():
    rng = np.random.default_rng(4)
    V, D, B, T = 10, 6, 3, 5
    wte, wpe = rng.standard_normal((V, D)), rng.standard_normal((T, D))
    tokens = rng.integers(0, V, B * T)
    tokens[:4] = 7  # repeated ids must accumulate, not overwrite
    out = np.zeros((B * T, D))
    ops.embedding_forward(tokens, T, wte, wpe, out)
    assert np.array_equal(out, wte[tokens] + np.tile(wpe, (B, 1)))
    ops.embedding_forward(tokens, T, wte, np.zeros((0, D)), out)
    assert np.array_equal(out, wte[tokens])
    dout = rng.standard_normal((B * T, D))
    dwte, dwpe = np.zeros((V, D)), np.zeros((T, D))
    ops.embedding_backward(tokens, T, dout, dwte, dwpe)
    expected = np.zeros((V, D))
    np.add.at(expected, tokens, dout)
    assert np.allclose(dwte, expected, rtol=0, atol=1e-14)
    assert np.allclose(dwpe, dout.reshape(B, T, D).sum(0), rtol=0, atol=1e-14)


def test_float32_exp_is_accurate_and_keeps_nan_and_the_mask():
    from numba import njit

    @njit
    def exp_all(x, softmax):
        out = np.empty_like(x)
        for i in range(x.shape[0]):
            out[i] = ops.fexp_softmax(x[i]) if softmax else ops.fexp(x[i])
        return out

    x = np.concatenate([np.linspace(-87, 88, 200001), [-1e-7, 0.0, 1e-7]]).astype(np.float32)
    ref = np.exp(x.astype(np.float64))
    assert np.abs(exp_all(x, False) / ref - 1).max() < 3e-7  # ~2 float32 ulps
    neg = x <= 0  # the softmax's exp: only ever given x - max
    assert np.abs(exp_all(x[neg], True) / ref[neg] - 1).max() < 3e-7
    for softmax in (False, True):
        special = exp_all(np.array([-np.inf, -100.0, np.nan, np.inf], np.float32), softmax)
        assert special[0] == 0.0 and special[1] == 0.0  # masked scores: exactly 0, never a denormal
        assert np.isnan(special[2]) and not np.isfinite(special[3])  # a diverging run still shows


def test_float32_row_max_orders_negatives_and_propagates_nan():
    from numba import njit

    @njit
    def rmax(s, L):
        return ops.row_max(s, L)

    rng = np.random.default_rng(5)
    for _ in range(20):
        s = (rng.standard_normal(40) * 10 ** rng.uniform(-3, 3)).astype(np.float32)
        L = int(rng.integers(1, 41))
        assert rmax(s, L) == s[:L].max()
    assert rmax(np.array([-3.0, -0.0, -1.0], np.float32), 3) == 0.0
    assert np.isnan(rmax(np.array([1.0, np.nan, 2.0], np.float32), 3))


@pytest.mark.parametrize("dtype, tol", [pytest.param(np.float64, 1e-12, id="float64"),
                                        pytest.param(np.float32, 1e-6, id="float32")])
def test_adamw_and_clipping_follow_torch(dtype, tol):
    """torch.optim.AdamW with the torch trainer's two groups and clip_grad_norm_, five steps; the
    float32 check is against torch in float32 (the same rounding steps), hence 1e-6."""
    rng = np.random.default_rng(6)
    matrix, vector = rng.standard_normal((5, 4)), rng.standard_normal(3)
    tdt = torch.float64 if dtype == np.float64 else torch.float32
    tm, tv = (torch.nn.Parameter(torch.tensor(a, dtype=tdt)) for a in (matrix, vector))
    opt_t = torch.optim.AdamW([{"params": [tm], "weight_decay": 0.1}, {"params": [tv], "weight_decay": 0.0}],
                              lr=1e-2, betas=(0.9, 0.95))
    flat = np.concatenate([matrix.ravel(), vector]).astype(dtype)  # decayed first, as layout.Layout
    opt = AdamW(flat.size, matrix.size, 0.1, 0.9, 0.95, dtype)
    for step in range(5):
        lr = 1e-2 * (step + 1) / 5
        g = rng.standard_normal(flat.size) * (3 if step % 2 else 0.1)  # clipped on odd steps only
        tm.grad = torch.tensor(g[:matrix.size].reshape(5, 4), dtype=tdt)
        tv.grad = torch.tensor(g[matrix.size:], dtype=tdt)
        torch.nn.utils.clip_grad_norm_([tm, tv], 1.0)
        for group in opt_t.param_groups:
            group["lr"] = lr
        opt_t.step()
        grads = g.astype(dtype)
        coef = opt.clip_coefficient(grads, 1.0)
        assert (coef < 1) == bool(step % 2)
        opt.step(flat, grads, lr, coef)
        ref = np.concatenate([tm.detach().numpy().ravel(), tv.detach().numpy()])
        assert rel(flat, ref) < tol, step
    state = opt_t.state[tm]
    assert opt.step_count == int(state["step"]) == 5
    assert rel(opt.m[:matrix.size], state["exp_avg"].numpy().ravel()) < tol
    assert rel(opt.v[:matrix.size], state["exp_avg_sq"].numpy().ravel()) < tol
    assert math.isclose(opt.clip_coefficient(np.zeros(3, dtype), 0.0), 1.0)  # --grad_clip 0: none
