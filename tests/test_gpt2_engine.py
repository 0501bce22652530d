"""The GPT-2 inference engine (engine/gpt2.py) against transformers' GPT2LMHeadModel, and its
batch invariance."""

import numpy as np
import pytest

from babyllama.arch import gpt2
from babyllama.config import ModelConfig
from babyllama.engine import Engine
from babyllama.testing import random_weights

CONFIGS = {
    "small": ModelConfig(dim=48, hidden_dim=192, n_layers=2, n_heads=4, n_kv_heads=4, vocab_size=97, seq_len=40,
                         arch="gpt2"),
    "odd": ModelConfig(dim=36, hidden_dim=100, n_layers=3, n_heads=6, n_kv_heads=6, vocab_size=61, seq_len=33,
                       arch="gpt2"),
}


def _weights(cfg, seed=0):
    return gpt2.Weights.from_dict(cfg, random_weights(cfg, seed=seed, scale=0.2))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers(name):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers", reason="GPT2LMHeadModel comes from transformers")
    cfg = CONFIGS[name]
    w = _weights(cfg)
    hf_cfg = transformers.GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.seq_len, n_embd=cfg.dim,
                                     n_layer=cfg.n_layers, n_head=cfg.n_heads, n_inner=cfg.hidden_dim,
                                     layer_norm_epsilon=cfg.norm_eps, activation_function="gelu_new",
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(hf_cfg).eval()
    state = {k: torch.from_numpy(v) for k, v in gpt2.spread(cfg, w, gpt2.HF_NAMES, gpt2.hf_transforms(cfg, True)).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith((".attn.bias", ".attn.masked_bias", "lm_head.weight")) for k in missing)
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, cfg.seq_len)
    with torch.no_grad():
        want = model(torch.from_numpy(tokens)[None]).logits[0].numpy()
    got = Engine(cfg, w).logits(tokens)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * max(1.0, np.abs(want).max()))


@pytest.mark.parametrize("parallel", [False, True], ids=["serial", "parallel"])
def test_a_block_is_token_by_token_bit_for_bit(parallel):
    cfg = CONFIGS["odd"]
    engine = Engine(cfg, _weights(cfg, 2), parallel=parallel)
    tokens = np.random.default_rng(3).integers(0, cfg.vocab_size, cfg.seq_len)
    state = engine.new_state()
    steps = np.stack([engine.step(int(t), i, state).copy() for i, t in enumerate(tokens)])
    assert np.array_equal(engine.logits(tokens).view(np.int32), steps.view(np.int32))


def test_quantized_gpt2_weights_are_refused():
    from babyllama.errors import CheckpointError

    cfg = CONFIGS["small"]
    with pytest.raises(CheckpointError, match="expected fp32 GPT-2 Weights for arch gpt2"):
        Engine(cfg, {"token_embedding": None})
