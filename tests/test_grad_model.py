"""The hand-written trainer's whole models (training/grad/llama.py, gpt2.py) against a float64
autograd reference (grad_reference.py): the loss and the gradient of every tensor, on random
configs (GQA, odd widths, head_dim != dim / n_heads, tied and untied classifiers, GPT-2); and its
parameter layout against the torch models' parameters."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from babyllama.arch import module as arch_module  # noqa: E402
from babyllama.arch.tensors import stored_tensors  # noqa: E402
from babyllama.config import ModelConfig  # noqa: E402
from babyllama.training.grad.gpt2 import GPT2  # noqa: E402
from babyllama.training.grad.layout import Layout  # noqa: E402
from babyllama.training.grad.llama import Llama  # noqa: E402
from babyllama.training.grad.workers import Workers  # noqa: E402
from babyllama.training.model import build_model  # noqa: E402
from babyllama.training.rope import rope_tables  # noqa: E402
from grad_reference import loss_and_grads, random_tensors  # noqa: E402
from test_grad_ops import FLOAT32_TOL, rel  # noqa: E402

torch.set_num_threads(1)

CONFIGS = [  # seq_len > 32 crosses the attention kernels' row padding
    pytest.param(ModelConfig(dim=35, hidden_dim=50, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=6, vocab_size=67,
                             seq_len=37, shared_classifier=False, rope_theta=500.0, norm_eps=1e-6),
                 id="llama-gqa-odd-dim-head6-untied"),
    pytest.param(ModelConfig(dim=32, hidden_dim=44, n_layers=2, n_heads=4, n_kv_heads=4, vocab_size=50, seq_len=12),
                 id="llama-mha-tied"),
    pytest.param(ModelConfig(arch="gpt2", dim=18, hidden_dim=40, n_layers=2, n_heads=3, n_kv_heads=3, vocab_size=53,
                             seq_len=35), id="gpt2-odd-hidden"),
]
MODELS = {"llama": Llama, "gpt2": GPT2}


def hand_written(cfg, arrays, tokens, targets, dtype, threads=1):
    """(loss, {name: gradient}) of the hand-written model, run through the trainer's Workers."""
    layout = Layout(cfg, MODELS[cfg.arch].FUSED)
    params = layout.zeros(dtype)
    views = layout.arch_views(params)
    for name, value in arrays.items():
        views[name][...] = value
    workers = Workers(MODELS[cfg.arch], cfg, layout, tokens.shape[0], threads, dtype)
    try:
        loss = workers.forward_backward(layout.views(params), tokens, targets, 1.0 / tokens.size)
        grads = workers.gradient(layout.zeros(dtype))
    finally:
        workers.close()
    return loss, {name: g for name, g in layout.arch_views(grads).items() if name in arrays}


def batch(cfg, seed=0, rows=3):
    rng = np.random.default_rng(seed)
    return tuple(rng.integers(0, cfg.vocab_size, (rows, cfg.seq_len)) for _ in range(2))


@pytest.mark.parametrize("cfg", CONFIGS)
def test_loss_and_every_gradient_match_float64_autograd(cfg):
    arrays = random_tensors(cfg, seed=1)
    tokens, targets = batch(cfg)
    cos, sin = rope_tables(cfg)
    ref_loss, ref = loss_and_grads(cfg, arrays, tokens, targets, cos, sin)
    assert set(ref) == set(stored_tensors(cfg))

    loss64, g64 = hand_written(cfg, arrays, tokens, targets, np.float64)
    assert abs(loss64 - ref_loss) < 1e-12 * ref_loss
    for name in ref:
        assert rel(g64[name], ref[name]) < 1e-12, name  # the same formulas: rounding only (2e-15 seen)

    # float32 parameters and arithmetic against the same float64 reference (FLOAT32_TOL says why)
    loss32, g32 = hand_written(cfg, {k: v.astype(np.float32) for k, v in arrays.items()}, tokens, targets,
                               np.float32, threads=2)
    assert abs(loss32 - ref_loss) < 1e-6 * ref_loss
    for name in ref:
        assert rel(g32[name], ref[name]) < FLOAT32_TOL, name


def test_threads_split_the_batch_into_the_same_sums():
    cfg = CONFIGS[0].values[0]
    arrays = random_tensors(cfg, seed=2)
    tokens, targets = batch(cfg, rows=5)  # 5 rows: shares of 3 and 2
    one = hand_written(cfg, arrays, tokens, targets, np.float64, threads=1)
    two = hand_written(cfg, arrays, tokens, targets, np.float64, threads=2)
    assert abs(one[0] - two[0]) < 1e-14
    for name in one[1]:
        assert rel(two[1][name], one[1][name]) < 1e-13, name


@pytest.mark.parametrize("cfg", [c.values[0] for c in CONFIGS] + [
    ModelConfig(arch="gpt2", dim=16, hidden_dim=64, n_layers=1, n_heads=2, n_kv_heads=2, vocab_size=30, seq_len=8)])
def test_layout_matches_the_torch_models_parameters(cfg):
    """One buffer holds every torch parameter once; the decayed prefix is exactly torch's dim >= 2
    group; the arch torch_parameters order is the torch model's."""
    model = build_model(cfg)
    names = [n for n, _ in model.named_parameters()]
    assert arch_module(cfg.arch).torch_parameters(cfg) == names
    layout = Layout(cfg, MODELS[cfg.arch].FUSED)
    assert layout.size == sum(p.numel() for p in model.parameters()) == cfg.n_params
    assert layout.n_decay == sum(p.numel() for p in model.parameters() if p.dim() >= 2)
    flat = np.arange(layout.size, dtype=np.float64)
    views = layout.arch_views(flat)
    seen = np.concatenate([v.ravel() for k, v in views.items() if not (k == "wcls" and cfg.shared_classifier)])
    assert np.array_equal(np.sort(seen), flat)  # every element in exactly one tensor
    assert all(np.shares_memory(v, flat) for v in views.values())
