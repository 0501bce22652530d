"""The PyTorch Transformer: names, shapes, llama2.c's conventions, and the KV-cached sampler."""

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from babyllama.arch.llama import Weights, tensor_shapes  # noqa: E402
from babyllama.config import ModelConfig, RopeScaling  # noqa: E402
from babyllama.errors import GenerationError  # noqa: E402
from babyllama.training.model import Transformer, apply_rope, rope_frequencies  # noqa: E402
from conftest import random_weights  # noqa: E402

torch.set_num_threads(1)

LAYER_NAMES = ("rms_att", "wq", "wk", "wv", "wo", "rms_ffn", "w1", "w2", "w3")


# head_dim 12 with dim 32: q_dim 48 differs from dim, as in Gemma-style or Llama 3 HF exports
WIDE_HEADS = ModelConfig(dim=32, hidden_dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, seq_len=32,
                         head_dim=12, rope_theta=500000.0, norm_eps=1e-6)


def model_from_random(cfg, seed=0, scale=0.1):
    return Transformer.from_weights(cfg, Weights.from_dict(cfg, random_weights(cfg, seed, scale))).eval()


@pytest.mark.parametrize("wide", [False, True], ids=["head_dim=dim/heads", "head_dim=12"])
def test_state_dict_keys_and_shapes_are_the_file_format_names(tiny_config, wide):
    cfg = WIDE_HEADS if wide else tiny_config
    sd = Transformer(cfg).state_dict()
    expected = ["token_embedding.weight"]
    expected += [f"layers.{i}.{n}.weight" for i in range(cfg.n_layers) for n in LAYER_NAMES]
    expected += ["rms_final.weight", "wcls.weight"]
    assert list(sd) == expected
    shapes = tensor_shapes(cfg)
    for key, t in sd.items():
        name = key.split(".")[-2]
        want = shapes[name][1:] if key.startswith("layers.") else shapes[name]
        assert tuple(t.shape) == want, key


def test_tied_classifier_is_the_embedding_parameter(tiny_config):
    tied = Transformer(tiny_config)
    assert tied.wcls.weight is tied.token_embedding.weight
    assert sum(p.numel() for p in tied.parameters()) == tiny_config.n_params

    untied_cfg = ModelConfig(**{**tiny_config.to_dict(), "shared_classifier": False})
    untied = Transformer(untied_cfg)
    assert untied.wcls.weight is not untied.token_embedding.weight
    assert sum(p.numel() for p in untied.parameters()) == untied_cfg.n_params


def test_forward_shapes_and_initial_loss(tiny_config):
    cfg = tiny_config
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    tokens = torch.randint(0, cfg.vocab_size, (3, 10))
    targets = torch.randint(0, cfg.vocab_size, (3, 10))
    logits, loss = model(tokens, targets)
    assert logits.shape == (3, 10, cfg.vocab_size)
    # small initial weights -> near-uniform predictions -> loss ~ ln(vocab)
    assert torch.isfinite(loss) and abs(loss.item() - math.log(cfg.vocab_size)) < 0.3
    last, no_loss = model(tokens)
    assert last.shape == (3, 1, cfg.vocab_size) and no_loss is None
    torch.testing.assert_close(last[:, 0], logits[:, -1])


def test_loss_ignores_targets_of_minus_one(tiny_config):
    torch.manual_seed(0)
    model = Transformer(tiny_config).eval()
    tokens = torch.randint(0, tiny_config.vocab_size, (2, 8))
    targets = torch.randint(0, tiny_config.vocab_size, (2, 8))
    masked = targets.clone()
    masked[:, :5] = -1
    logits, loss = model(tokens, masked)
    expected = torch.nn.functional.cross_entropy(logits[:, 5:].reshape(-1, tiny_config.vocab_size), targets[:, 5:].reshape(-1))
    torch.testing.assert_close(loss, expected)


def test_initialisation_scales_residual_projections(tiny_config):
    cfg = ModelConfig(dim=64, hidden_dim=128, n_layers=8, n_heads=4, n_kv_heads=4, vocab_size=64, seq_len=16)
    torch.manual_seed(0)
    model = Transformer(cfg)
    residual = 0.02 / math.sqrt(2 * cfg.n_layers)  # 0.005
    layer = model.layers[3]
    for name, std in (("wo", residual), ("w3", residual), ("wq", 0.02), ("w1", 0.02), ("w2", 0.02)):
        assert getattr(layer, name).weight.std().item() == pytest.approx(std, rel=0.1), name
    assert torch.all(layer.rms_att.weight == 1) and torch.all(model.rms_final.weight == 1)


def llama3_scaled(freq: float, s: RopeScaling) -> float:
    """Meta's apply_scaling for one frequency, written out branch by branch."""
    wavelen, original = 2 * math.pi / freq, s.original_max_position_embeddings
    if wavelen < original / s.high_freq_factor:
        return freq
    if wavelen > original / s.low_freq_factor:
        return freq / s.factor
    smooth = (original / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    return (1 - smooth) * freq / s.factor + smooth * freq


def rope_reference(vec: np.ndarray, pos: int, head_size: int, theta: float = 10000.0, scaling=None) -> np.ndarray:
    """run.c's RoPE loop: each (v[i], v[i+1]) pair rotated by pos * theta^(-(i % head_size) / head_size)."""
    out = vec.astype(np.float64).copy()
    for i in range(0, len(vec), 2):
        freq = 1.0 / theta ** ((i % head_size) / head_size)
        if scaling is not None:
            freq = llama3_scaled(freq, scaling)
        c, s = math.cos(pos * freq), math.sin(pos * freq)
        v0, v1 = out[i], out[i + 1]
        out[i], out[i + 1] = v0 * c - v1 * s, v0 * s + v1 * c
    return out


@pytest.mark.parametrize("scaling", [None, RopeScaling(8.0, 1.0, 4.0, 64)], ids=["plain", "llama3-scaled"])
def test_rope_matches_llama2c_interleaved_pairs(tiny_config, scaling):
    cfg = ModelConfig(**{**tiny_config.to_dict(), "seq_len": 256, "head_dim": 32, "rope_theta": 500000.0,
                         "rope_scaling": scaling})
    cos, sin = rope_frequencies(cfg)
    T = 256
    x = torch.randn(1, T, cfg.n_heads, cfg.head_size)
    got = apply_rope(x, cos[:T], sin[:T]).numpy()
    for pos in range(0, T, 15):
        want = rope_reference(x[0, pos].reshape(-1).numpy(), pos, cfg.head_size, cfg.rope_theta, scaling)
        np.testing.assert_allclose(got[0, pos].reshape(-1), want, rtol=1e-5, atol=1e-5)
    if scaling is not None:  # the scaling changes the long-wavelength pairs, so the test can tell
        plain_cos, _ = rope_frequencies(ModelConfig(**{**cfg.to_dict(), "rope_scaling": None}))
        assert not torch.allclose(plain_cos[T - 1], cos[T - 1], atol=1e-3)


def reference_forward(cfg: ModelConfig, w, tokens) -> np.ndarray:
    """A token-at-a-time NumPy forward written like run.c, for cross-checking the torch model."""
    hs, kv_mul = cfg.head_size, cfg.kv_mul
    rope = dict(head_size=hs, theta=cfg.rope_theta, scaling=cfg.rope_scaling)

    def rmsnorm(x, g):
        return g * (x / np.sqrt(np.mean(x * x) + cfg.norm_eps))

    k_cache = np.zeros((cfg.n_layers, len(tokens), cfg.kv_dim))
    v_cache = np.zeros_like(k_cache)
    out = []
    for pos, tok in enumerate(tokens):
        x = w.token_embedding[tok].astype(np.float64)
        for l in range(cfg.n_layers):
            xb = rmsnorm(x, w.rms_att[l])
            q = rope_reference(w.wq[l] @ xb, pos, **rope)
            k_cache[l, pos] = rope_reference(w.wk[l] @ xb, pos, **rope)
            v_cache[l, pos] = w.wv[l] @ xb
            att_out = np.zeros(cfg.q_dim)
            for h in range(cfg.n_heads):
                kvh = h // kv_mul
                qh = q[h * hs : (h + 1) * hs]
                keys = k_cache[l, : pos + 1, kvh * hs : (kvh + 1) * hs]
                scores = keys @ qh / math.sqrt(hs)
                p = np.exp(scores - scores.max())
                p /= p.sum()
                att_out[h * hs : (h + 1) * hs] = p @ v_cache[l, : pos + 1, kvh * hs : (kvh + 1) * hs]
            x = x + w.wo[l] @ att_out
            xb = rmsnorm(x, w.rms_ffn[l])
            a, b = w.w1[l] @ xb, w.w3[l] @ xb
            x = x + w.w2[l] @ (a / (1 + np.exp(-a)) * b)
        out.append(w.wcls @ rmsnorm(x, w.rms_final))
    return np.array(out)


@pytest.mark.parametrize("shape", ["tied", "untied", "wide-heads", "llama3-scaled"])
def test_forward_matches_runc_style_reference(tiny_config, shape):
    cfg = {  # GQA: 4 heads, 2 kv heads
        "tied": tiny_config,
        "untied": ModelConfig(**{**tiny_config.to_dict(), "shared_classifier": False}),
        "wide-heads": WIDE_HEADS,
        "llama3-scaled": ModelConfig(**{**WIDE_HEADS.to_dict(), "rope_scaling": RopeScaling(8.0, 1.0, 4.0, 16)}),
    }[shape]
    model = model_from_random(cfg, seed=1, scale=0.2)
    tokens = [1, 5, 9, 33, 2, 60, 7, 7, 12]
    logits, _ = model(torch.tensor([tokens]), torch.tensor([tokens]))
    want = reference_forward(cfg, model.to_weights(), tokens)
    np.testing.assert_allclose(logits[0].detach().numpy(), want, rtol=1e-4, atol=1e-4)


def test_gqa_equals_mha_with_repeated_kv_heads(tiny_config):
    cfg = tiny_config  # 4 query heads share 2 kv heads: heads 0,1 -> kv 0; heads 2,3 -> kv 1
    gqa = model_from_random(cfg, seed=2, scale=0.2)
    mha_cfg = ModelConfig(**{**cfg.to_dict(), "n_kv_heads": cfg.n_heads})
    mha = Transformer(mha_cfg).eval()
    sd = gqa.state_dict()
    hs = cfg.head_size
    for i in range(cfg.n_layers):
        for name in ("wk", "wv"):
            w = sd[f"layers.{i}.{name}.weight"].view(cfg.n_kv_heads, hs, cfg.dim)
            sd[f"layers.{i}.{name}.weight"] = w.repeat_interleave(cfg.kv_mul, dim=0).reshape(cfg.dim, cfg.dim)
    mha.load_state_dict(sd)
    tokens = torch.randint(0, cfg.vocab_size, (2, 12))
    torch.testing.assert_close(gqa(tokens, tokens)[0], mha(tokens, tokens)[0])


def greedy_by_recomputing(model, idx, n):
    for _ in range(n):
        logits, _ = model(idx)
        idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return idx


def test_kv_cached_generate_matches_full_recompute(tiny_config):
    cfg = tiny_config
    model = model_from_random(cfg, seed=3, scale=0.3)
    prompt = torch.tensor([[1, 17, 4], [1, 40, 41]])
    n = cfg.seq_len - prompt.shape[1]  # fill the whole context
    got = model.generate(prompt, n, temperature=0.0)
    assert got.shape == (2, cfg.seq_len)
    assert torch.equal(got, greedy_by_recomputing(model, prompt, n))
    assert len(set(got[0, 3:].tolist())) > 3  # a non-degenerate continuation, so the test means something
    # top_k=1 sampling is greedy too
    assert torch.equal(model.generate(prompt, 8, temperature=1.0, top_k=1), got[:, :11])


def test_generate_sampling_is_seeded_and_leaves_mode_alone(tiny_config):
    model = model_from_random(tiny_config, seed=4, scale=0.3).train()
    prompt = torch.tensor([[1, 2]])
    a = model.generate(prompt, 10, temperature=0.8, top_k=20, generator=torch.Generator().manual_seed(7))
    b = model.generate(prompt, 10, temperature=0.8, top_k=20, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b) and a.shape == (1, 12)
    assert model.training


def test_generate_and_forward_reject_sequences_beyond_seq_len(tiny_config):
    model = Transformer(tiny_config)
    with pytest.raises(GenerationError, match="seq_len"):
        model.generate(torch.zeros(1, 30, dtype=torch.long), 3)
    with pytest.raises(GenerationError, match="seq_len"):
        model(torch.zeros(1, tiny_config.seq_len + 1, dtype=torch.long))


@pytest.mark.parametrize("shared", [True, False])
def test_weights_round_trip(tiny_config, shared):
    cfg = ModelConfig(**{**tiny_config.to_dict(), "shared_classifier": shared})
    w = Weights.from_dict(cfg, random_weights(cfg, seed=5))
    model = Transformer.from_weights(cfg, w)
    back = model.to_weights()
    for name, arr in w.items():
        np.testing.assert_array_equal(getattr(back, name), arr, err_msg=name)
    assert (back.wcls is back.token_embedding) == shared
    with torch.no_grad():  # copies, not views of the live parameters
        model.token_embedding.weight.zero_()
        model.rms_final.weight.zero_()
    np.testing.assert_array_equal(back.token_embedding, w.token_embedding)
    np.testing.assert_array_equal(back.rms_final, w.rms_final)


def test_dropout_is_active_only_in_training(tiny_config):
    torch.manual_seed(0)
    model = Transformer(tiny_config, dropout=0.5)
    tokens = torch.randint(0, tiny_config.vocab_size, (2, 8))
    model.train()
    assert not torch.equal(model(tokens, tokens)[0], model(tokens, tokens)[0])
    model.eval()
    assert torch.equal(model(tokens, tokens)[0], model(tokens, tokens)[0])
