"""GPT-2 as babyllama knows it: the config's rules, the tensor inventory (arch/gpt2.py) and its
Hugging Face name map, and the torch model `babyllama train --arch gpt2` trains
(training/gpt2_model.py), checked against transformers' GPT2LMHeadModel."""

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from babyllama.arch import gpt2  # noqa: E402
from babyllama.arch.tensors import collect, spread, stored_tensors  # noqa: E402
from babyllama.config import ModelConfig  # noqa: E402
from babyllama.errors import CheckpointError, ConfigError  # noqa: E402
from babyllama.formats.ckpt import load_weights, save_weights  # noqa: E402
from babyllama.training.gpt2_model import GPT2  # noqa: E402

torch.set_num_threads(1)

CFG = ModelConfig(arch="gpt2", dim=48, hidden_dim=192, n_layers=2, n_heads=4, n_kv_heads=4, vocab_size=96, seq_len=40)


@pytest.mark.parametrize("change, match", [
    ({"n_kv_heads": 2}, r"n_kv_heads must be 4 \(GPT-2 has no grouped-query attention\), found 2"),
    ({"shared_classifier": False}, "shared_classifier must be True"),
    ({"head_dim": 8}, r"n_heads \* head_dim must be 48 \(GPT-2's heads split dim\), found 32"),
    ({"rope_theta": 5e5}, "rope_theta must be 10000.0 .*found 500000.0"),
    ({"arch": "gpt3"}, "arch: expected one of llama, gpt2, found 'gpt3'"),
])
def test_config_refuses_what_gpt2_cannot_be(change, match):
    with pytest.raises(ConfigError, match=match):
        ModelConfig(**{**CFG.to_dict(), **change})


def test_config_fields_and_round_trip():
    odd = ModelConfig(arch="gpt2", dim=21, hidden_dim=50, n_layers=1, n_heads=3, n_kv_heads=3, vocab_size=10,
                      seq_len=5)
    assert odd.head_dim == 7  # no RoPE: an odd head is fine
    assert not odd.has_llama2c_defaults  # never a v0 .bin
    assert ModelConfig.from_dict(CFG.to_dict()) == CFG and CFG.to_dict()["arch"] == "gpt2"
    with pytest.raises(ConfigError, match="head size must be even for RoPE"):  # still required of Llama
        ModelConfig(dim=21, hidden_dim=50, n_layers=1, n_heads=3, n_kv_heads=3, vocab_size=10, seq_len=5)


def test_state_dict_is_the_inventory():
    model = GPT2(CFG)
    sd = model.state_dict()
    shapes = gpt2.tensor_shapes(CFG)
    expected = {}
    for name in shapes:
        key = gpt2.TORCH_NAMES[name]
        for i in range(CFG.n_layers if "{i}" in key else 1):
            expected[key.format(i=i)] = shapes[name][1:] if "{i}" in key else shapes[name]
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected
    assert model.wcls.weight is model.token_embedding.weight
    assert sum(p.numel() for p in model.parameters()) == CFG.n_params


def test_initialisation_is_gpt2s():
    torch.manual_seed(0)
    big = ModelConfig(**{**CFG.to_dict(), "dim": 256, "hidden_dim": 1024, "n_layers": 8, "head_dim": 0,
                         "n_kv_heads": 4})
    model = GPT2(big)
    std = lambda p: p.detach().std().item()  # noqa: E731
    assert std(model.token_embedding.weight) == pytest.approx(0.02, rel=0.05)
    assert std(model.layers[0].wqkv.weight) == pytest.approx(0.02, rel=0.05)
    assert std(model.layers[0].w2.weight) == pytest.approx(0.02 / math.sqrt(16), rel=0.05)  # residual projection
    assert not model.layers[0].wqkv.bias.any() and torch.equal(model.ln_final.weight, torch.ones(256))
    _, loss = model(torch.randint(0, big.vocab_size, (2, 16)), torch.randint(0, big.vocab_size, (2, 16)))
    assert loss.item() == pytest.approx(math.log(big.vocab_size), rel=0.02)  # near-uniform at the start


def hf_model(seed=0):
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.GPT2Config(n_embd=CFG.dim, n_layer=CFG.n_layers, n_head=CFG.n_heads,
                                     n_positions=CFG.seq_len, vocab_size=CFG.vocab_size, n_inner=CFG.hidden_dim,
                                     activation_function="gelu_new", layer_norm_epsilon=CFG.norm_eps,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(hf_cfg).eval()
    with torch.no_grad():  # biases and norms away from their init, so the map is tested for them too
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


def test_hf_names_and_transposes_give_transformers_logits():
    hf = hf_model()
    sd = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    weights = collect(sd.get, gpt2.HF_NAMES, CFG, "hf", gpt2.hf_transforms(CFG, to_hf=False))
    ours = GPT2.from_weights(CFG, weights).eval()
    tokens = torch.randint(0, CFG.vocab_size, (2, CFG.seq_len))
    with torch.no_grad():
        want = hf(tokens).logits
        got, _ = ours(tokens, torch.zeros_like(tokens))
    assert torch.allclose(got, want, rtol=0, atol=1e-5)
    back = spread(CFG, weights, gpt2.HF_NAMES, gpt2.hf_transforms(CFG, to_hf=True))
    assert set(back) == {gpt2.HF_NAMES[n].format(i=i) for n in stored_tensors(CFG)
                         for i in range(CFG.n_layers if "{i}" in gpt2.HF_NAMES[n] else 1)}
    for key, value in back.items():
        assert np.array_equal(value, sd[key]), key
    sd["transformer.h.1.attn.c_attn.weight"] = sd["transformer.h.1.attn.c_attn.weight"].T  # as nn.Linear would
    with pytest.raises(CheckpointError, match=r"c_attn.weight: expected shape \(48, 144\) from the config, "
                                              r"found \(144, 48\)"):
        collect(sd.get, gpt2.HF_NAMES, CFG, "hf", gpt2.hf_transforms(CFG, to_hf=False))


def test_llmc_order_names_every_tensor_once():
    assert [ours for ours, _ in gpt2.LLMC_ORDER] == stored_tensors(CFG)
    assert len({theirs for _, theirs in gpt2.LLMC_ORDER}) == 16  # train_gpt2.c's NUM_PARAMETER_TENSORS


def test_checkpoint_round_trip_keeps_the_arch(tmp_path):
    torch.manual_seed(1)
    weights = GPT2(CFG).to_weights()
    save_weights(tmp_path / "w.pt", CFG, weights)
    cfg, loaded = load_weights(tmp_path / "w.pt")
    assert cfg == CFG and isinstance(loaded, gpt2.Weights)
    for name, value in weights.items():
        assert np.array_equal(getattr(loaded, name), value), name
