"""export.py: torch / .bin / Hugging Face / Meta conversions keep every weight, and the HF RoPE
permutation gives the same attention scores as llama2.c's convention."""

import json
import struct
from dataclasses import replace

import numpy as np
import pytest

from conftest import random_weights

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")

from babyllama import export  # noqa: E402
from babyllama.checkpoint import Weights, load_checkpoint  # noqa: E402
from babyllama.errors import CheckpointError, TokenizerError  # noqa: E402


@pytest.fixture(params=[True, False], ids=["tied", "untied"])
def model(request, tiny_config):
    cfg = replace(tiny_config, shared_classifier=request.param)  # GQA: 4 query heads, 2 kv heads
    return cfg, Weights.from_dict(cfg, random_weights(cfg, seed=1))


def assert_same(a: Weights, b: Weights):
    for name, arr in a.items():
        np.testing.assert_array_equal(np.asarray(getattr(b, name)), arr, err_msg=name)


def torch_checkpoint(path, cfg, weights, prefix="", extra=None):
    """A checkpoint as train.py writes it, built by hand from the fixed state_dict names."""
    sd = {f"{prefix}token_embedding.weight": torch.from_numpy(weights.token_embedding.copy()),
          f"{prefix}rms_final.weight": torch.from_numpy(weights.rms_final.copy())}
    for i in range(cfg.n_layers):
        for name in ("rms_att", "wq", "wk", "wv", "wo", "rms_ffn", "w1", "w2", "w3"):
            sd[f"{prefix}layers.{i}.{name}.weight"] = torch.from_numpy(getattr(weights, name)[i].copy())
    sd[f"{prefix}wcls.weight"] = (sd[f"{prefix}token_embedding.weight"] if cfg.shared_classifier
                                  else torch.from_numpy(weights.wcls.copy()))
    sd.update(extra or {})
    torch.save({"model": sd, "model_config": cfg.to_dict(), "step": 7}, path)
    return path


@pytest.mark.parametrize("version", [0, 1])
def test_bin_write_read_keeps_tensors(tmp_path, model, version):
    cfg, w = model
    path = export.export_bin(tmp_path / "m.bin", cfg, w, version)
    ckpt = load_checkpoint(path)
    assert (ckpt.version, ckpt.config) == (version, cfg)
    assert_same(w, ckpt.weights)


@pytest.mark.parametrize("prefix", ["", "_orig_mod.", "module._orig_mod."])
def test_torch_checkpoint_to_bin(tmp_path, model, prefix):
    cfg, w = model
    pt = torch_checkpoint(tmp_path / "ckpt.pt", cfg, w, prefix)
    for version in (0, 1):
        out = export.convert(pt, tmp_path / f"m{version}.bin", "bin", version)
        ckpt = load_checkpoint(out)
        assert (ckpt.version, ckpt.config) == (version, cfg)
        assert_same(w, ckpt.weights)


def test_bin_to_pt_to_bin(tmp_path, model):
    cfg, w = model
    src = export.export_bin(tmp_path / "a.bin", cfg, w, 1)
    export.convert(src, tmp_path / "b.pt", "pt")
    cfg2, w2 = export.load_torch_checkpoint(tmp_path / "b.pt")
    assert cfg2 == cfg
    assert_same(w, w2)


def test_hf_round_trip_keeps_weights_and_gqa(tmp_path, model):
    cfg, w = model
    export.export_bin(tmp_path / "m.bin", cfg, w, 0)
    out = export.convert(tmp_path / "m.bin", tmp_path / "hf", "hf")
    config = json.loads((out / "config.json").read_text())
    assert config["num_key_value_heads"] == 2 and config["num_attention_heads"] == 4
    assert config["tie_word_embeddings"] is cfg.shared_classifier
    from safetensors.numpy import load_file

    tensors = load_file(out / "model.safetensors")
    assert ("lm_head.weight" in tensors) is (not cfg.shared_classifier)
    assert tensors["model.layers.1.self_attn.k_proj.weight"].shape == (cfg.kv_dim, cfg.dim)
    # q/k rows are stored in HF's rotate_half order, v is not touched
    assert not np.array_equal(tensors["model.layers.0.self_attn.q_proj.weight"], w.wq[0])
    np.testing.assert_array_equal(tensors["model.layers.0.self_attn.v_proj.weight"], w.wv[0])

    cfg2, w2 = export.load_model(out)
    assert cfg2 == cfg
    assert_same(w, w2)
    # and back to a .bin through the CLI
    assert export.main([str(out), str(tmp_path / "back.bin"), "--to", "bin", "--version", "1"]) == 0
    assert_same(w, load_checkpoint(tmp_path / "back.bin").weights)


def test_permutations_are_inverse():
    w = np.arange(8 * 6 * 3, dtype=np.float32).reshape(48, 3)
    for heads in (1, 2, 6):
        np.testing.assert_array_equal(export.permute_from_hf(export.permute_to_hf(w, heads), heads), w)
    # one head of size 4: rows (0, 1, 2, 3) -> evens then odds
    np.testing.assert_array_equal(export.permute_to_hf(w[:4], 1)[:, 0], w[[0, 2, 1, 3], 0])


def _rope_llama2c(v, pos, head_size, theta):
    """llama2.c/Meta: rotate interleaved pairs (2j, 2j+1) by pos * theta^(-2j/head_size)."""
    out = v.copy()
    j = np.arange(head_size // 2)
    ang = pos * theta ** (-2.0 * j / head_size)
    a, b = v[..., 0::2], v[..., 1::2]
    out[..., 0::2] = a * np.cos(ang) - b * np.sin(ang)
    out[..., 1::2] = a * np.sin(ang) + b * np.cos(ang)
    return out


def _rope_hf(v, pos, head_size, theta):
    """transformers' apply_rotary_pos_emb: v * cos + rotate_half(v) * sin, frequencies duplicated."""
    inv_freq = 1.0 / theta ** (np.arange(0, head_size, 2) / head_size)
    emb = np.concatenate([pos * inv_freq, pos * inv_freq])
    half = head_size // 2
    rotate_half = np.concatenate([-v[..., half:], v[..., :half]], axis=-1)
    return v * np.cos(emb) + rotate_half * np.sin(emb)


def _scores(wq, wk, x, cfg, rope):
    """q.k attention scores of every query head at position 5 against every position 0..5."""
    hs = cfg.head_size
    q = (wq @ x[5]).reshape(cfg.n_heads, hs)
    q = np.stack([rope(q[h], 5, hs, cfg.rope_theta) for h in range(cfg.n_heads)])
    k = (x @ wk.T).reshape(len(x), cfg.n_kv_heads, hs)
    k = np.stack([[rope(k[t, h], t, hs, cfg.rope_theta) for h in range(cfg.n_kv_heads)] for t in range(len(x))])
    kv_of = np.arange(cfg.n_heads) // cfg.kv_mul  # grouped-query attention
    return np.einsum("hd,thd->ht", q, k[:, kv_of])


def test_hf_permutation_gives_llama2c_attention_scores(tiny_config):
    # transformers is not a dependency: an independent reference of both conventions instead
    cfg = tiny_config
    rng = np.random.default_rng(0)
    wq = rng.standard_normal((cfg.dim, cfg.dim))
    wk = rng.standard_normal((cfg.kv_dim, cfg.dim))
    x = rng.standard_normal((6, cfg.dim))
    ours = _scores(wq, wk, x, cfg, _rope_llama2c)
    hf_wq, hf_wk = export.permute_to_hf(wq, cfg.n_heads), export.permute_to_hf(wk, cfg.n_kv_heads)
    np.testing.assert_allclose(_scores(hf_wq, hf_wk, x, cfg, _rope_hf), ours, rtol=1e-9, atol=1e-9)
    # without the permutation the scores differ: the test can tell
    assert not np.allclose(_scores(wq, wk, x, cfg, _rope_hf), ours, atol=1e-3)
    # wk permuted with n_heads instead of n_kv_heads is wrong too
    bad_wk = export.permute_to_hf(wk, cfg.n_heads)
    assert not np.allclose(_scores(hf_wq, bad_wk, x, cfg, _rope_hf), ours, atol=1e-3)


def _meta_folder(tmp_path, cfg, w, params_extra=None):
    folder = tmp_path / "meta"
    folder.mkdir()
    sd = {"tok_embeddings.weight": w.token_embedding, "norm.weight": w.rms_final, "output.weight": w.wcls,
          "rope.freqs": np.ones(cfg.head_size // 2, dtype=np.float32)}
    for i in range(cfg.n_layers):
        for ours, theirs in [("rms_att", "attention_norm"), ("rms_ffn", "ffn_norm"), ("wq", "attention.wq"),
                             ("wk", "attention.wk"), ("wv", "attention.wv"), ("wo", "attention.wo"),
                             ("w1", "feed_forward.w1"), ("w2", "feed_forward.w2"), ("w3", "feed_forward.w3")]:
            sd[f"layers.{i}.{theirs}.weight"] = getattr(w, ours)[i]
    # Meta ships bf16 weights (callers pass bf16-representable values so comparisons stay exact)
    torch.save({k: torch.from_numpy(np.array(v)).to(torch.bfloat16) for k, v in sd.items()}, folder / "consolidated.00.pth")
    params = {"dim": cfg.dim, "multiple_of": 32, "n_heads": cfg.n_heads, "n_kv_heads": cfg.n_kv_heads,
              "n_layers": cfg.n_layers, "norm_eps": 1e-5, "vocab_size": -1, **(params_extra or {})}
    (folder / "params.json").write_text(json.dumps(params))
    return folder


def test_meta_import(tmp_path, tiny_config):
    hidden = export.meta_hidden_dim(tiny_config.dim, 32)
    assert hidden == 96  # int(2 * 128 / 3) = 85 rounded up to a multiple of 32
    cfg = replace(tiny_config, hidden_dim=hidden, shared_classifier=False, seq_len=2048)
    raw = random_weights(cfg, seed=3)
    # round to bf16 first so the bf16 checkpoint holds exactly these values
    w = Weights.from_dict(cfg, {k: torch.from_numpy(v).to(torch.bfloat16).float().numpy() for k, v in raw.items()})
    folder = _meta_folder(tmp_path, cfg, w)
    assert export.detect_format(folder) == "meta"
    out = export.convert(folder, tmp_path / "meta.bin", "bin", 0)
    ckpt = load_checkpoint(out)
    assert ckpt.config == cfg  # vocab from the embedding (params say -1), hidden from multiple_of
    assert_same(w, ckpt.weights)  # no RoPE permutation: Meta and llama2.c agree

    (folder / "consolidated.01.pth").write_bytes(b"")
    with pytest.raises(CheckpointError, match="found 2 model-parallel shard"):
        export.load_meta(folder)


def test_meta_hidden_dim_disagreeing_with_weights(tmp_path, tiny_config):
    cfg = replace(tiny_config, hidden_dim=96, shared_classifier=False)
    w = Weights.from_dict(cfg, random_weights(cfg))
    folder = _meta_folder(tmp_path, cfg, w, {"multiple_of": 64})  # says hidden 128
    with pytest.raises(CheckpointError, match=r"feed_forward.w1.weight: expected shape \(128, 32\).*found \(96, 32\)"):
        export.load_meta(folder)


def test_bad_inputs(tmp_path, model, capsys):
    cfg, w = model
    with pytest.raises(CheckpointError, match="no such model file"):
        export.convert(tmp_path / "nope.pt", tmp_path / "o.bin")
    (tmp_path / "junk.pt").write_bytes(b"this is not a checkpoint at all")
    with pytest.raises(CheckpointError, match="not a torch checkpoint"):
        export.load_torch_checkpoint(tmp_path / "junk.pt")
    torch.save({"weights": {}}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="expected a train.py checkpoint with keys 'model' and 'model_config'"):
        export.load_torch_checkpoint(tmp_path / "other.pt")

    pt = torch_checkpoint(tmp_path / "ok.pt", cfg, w)
    ckpt = torch.load(pt, weights_only=True)
    del ckpt["model"]["layers.1.w2.weight"]
    torch.save(ckpt, tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match=r"missing tensors: expected layers\.1\.w2\.weight"):
        export.load_torch_checkpoint(tmp_path / "missing.pt")
    ckpt = torch.load(pt, weights_only=True)
    ckpt["model_config"]["hidden_dim"] = 48
    torch.save(ckpt, tmp_path / "shape.pt")
    with pytest.raises(CheckpointError, match=r"layers\.0\.w1\.weight: expected shape \(48, 32\).*found \(64, 32\)"):
        export.load_torch_checkpoint(tmp_path / "shape.pt")

    with pytest.raises(CheckpointError, match="unknown export target 'gguf': expected one of bin, hf, pt"):
        export.convert(pt, tmp_path / "o", "gguf")
    with pytest.raises(CheckpointError, match="unknown .bin version 7: expected one of 0, 1"):
        export.convert(pt, tmp_path / "o.bin", "bin", 7)
    assert not (tmp_path / "o.bin").exists()

    # the CLI turns errors into one line on stderr and exit status 1
    assert export.main([str(tmp_path / "junk.pt"), str(tmp_path / "o.bin")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("babyllama export: error: ") and "not a torch checkpoint" in err and err.count("\n") == 1


def _tokenizer_bin(path, n):
    with open(path, "wb") as f:
        f.write(struct.pack("<i", 6))
        for i in range(n):
            b = f"t{i}".encode()
            f.write(struct.pack("<fi", -float(i), len(b)) + b)
    return path


def test_tokenizer_written_next_to_model(tmp_path, tiny_config):
    cfg = tiny_config
    pt = torch_checkpoint(tmp_path / "ckpt.pt", cfg, Weights.from_dict(cfg, random_weights(cfg)))
    tok = _tokenizer_bin(tmp_path / "tok64.bin", cfg.vocab_size)
    (tmp_path / "out").mkdir()
    assert export.main([str(pt), str(tmp_path / "out" / "m.bin"), "--tokenizer", str(tok)]) == 0
    assert (tmp_path / "out" / "tokenizer.bin").read_bytes() == tok.read_bytes()
    with pytest.raises(TokenizerError, match="expected 64 tokens for this model, found 63"):
        export.convert(pt, tmp_path / "out" / "m.bin", tokenizer=_tokenizer_bin(tmp_path / "t63.bin", 63))


def test_version_writers_are_pluggable(tmp_path, model):
    cfg, w = model
    seen = {}
    export.register_bin_writer(99, lambda path, c, weights, **opts: seen.update(path=path, opts=opts))
    try:
        export.export_bin(tmp_path / "q.bin", cfg, w, 99, group_size=32)
    finally:
        del export.BIN_WRITERS[99]
    assert seen == {"path": tmp_path / "q.bin", "opts": {"group_size": 32}}


def test_real_model_state_dict_compiled_and_ddp_wrapped(tmp_path, model):
    """The state_dict of babyllama.model.Transformer, as torch.compile + DDP would prefix it."""
    model_mod = pytest.importorskip("babyllama.model")
    cfg, w = model
    net = model_mod.Transformer.from_weights(cfg, w)
    sd = {f"module._orig_mod.{k}": v for k, v in net.state_dict().items()}
    torch.save({"model": sd, "model_config": cfg.to_dict(), "optimizer": {}}, tmp_path / "ckpt.pt")
    assert export.main([str(tmp_path / "ckpt.pt"), str(tmp_path / "m.bin")]) == 0
    assert_same(w, load_checkpoint(tmp_path / "m.bin").weights)
    assert_same(w, model_mod.Transformer.from_weights(*export.load_model(tmp_path / "m.bin")).to_weights())
