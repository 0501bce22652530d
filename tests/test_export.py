"""Conversions (babyllama.convert, formats/ckpt, hf, meta, `babyllama export|quantize`): every weight
and hyperparameter survives torch / .bin / Hugging Face / Meta round trips, the HF RoPE
permutation gives llama2.c's attention scores, transformers loads what we write, and outputs
that are inputs or cannot be written are refused in one line with nothing left behind."""

import json
import os
import stat
import struct
from dataclasses import replace

import numpy as np
import pytest

from conftest import random_weights, shared_file

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")

from babyllama.arch.llama import Weights, permute_from_hf, permute_to_hf  # noqa: E402
from babyllama.cli import main as cli_main  # noqa: E402
from babyllama.config import ModelConfig, RopeScaling  # noqa: E402
from babyllama.convert import convert, export_bin, quantize_file  # noqa: E402
from babyllama.errors import CheckpointError, OutputError, TokenizerError  # noqa: E402
from babyllama.formats import detect_format, load_model  # noqa: E402
from babyllama.formats.ckpt import (  # noqa: E402
    CKPT_FORMAT, CKPT_VERSION, load_weights, save_train_checkpoint, summary,
)
from babyllama.formats.hf import export_hf, load_hf  # noqa: E402
from babyllama.formats.llama2c import load_checkpoint, write_checkpoint  # noqa: E402
from babyllama.formats.meta import load_meta, meta_hidden_dim  # noqa: E402

# Llama 3's hyperparameters, which llama2.c's v0 cannot hold: theta, eps, a head_dim that is not
# dim / n_heads (q_dim 64 != dim 48), and llama3 rope scaling (original context 32, so it matters here)
LLAMA3_LIKE = ModelConfig(dim=48, hidden_dim=128, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, seq_len=64,
                          shared_classifier=False, head_dim=16, rope_theta=500000.0, norm_eps=1e-6,
                          rope_scaling=RopeScaling(8.0, 1.0, 4.0, 32))


@pytest.fixture(params=[True, False], ids=["tied", "untied"])
def model(request, tiny_config):
    cfg = replace(tiny_config, shared_classifier=request.param)  # GQA: 4 query heads, 2 kv heads
    return cfg, Weights.from_dict(cfg, random_weights(cfg, seed=1))


def assert_same(a: Weights, b: Weights):
    for name, arr in a.items():
        np.testing.assert_array_equal(np.asarray(getattr(b, name)), arr, err_msg=name)


def assert_one_line_error(capsys, command: str, *needles):
    err = capsys.readouterr().err
    assert err.startswith(f"babyllama {command}: error: ") and err.count("\n") == 1, err
    for needle in needles:
        assert str(needle) in err, err


def torch_checkpoint(path, cfg, weights, prefix="", **extra):
    """A checkpoint in the trainer's schema, built by hand from the fixed state_dict names."""
    sd = {f"{prefix}token_embedding.weight": torch.from_numpy(weights.token_embedding.copy()),
          f"{prefix}rms_final.weight": torch.from_numpy(weights.rms_final.copy())}
    for i in range(cfg.n_layers):
        for name in ("rms_att", "wq", "wk", "wv", "wo", "rms_ffn", "w1", "w2", "w3"):
            sd[f"{prefix}layers.{i}.{name}.weight"] = torch.from_numpy(getattr(weights, name)[i].copy())
    sd[f"{prefix}wcls.weight"] = (sd[f"{prefix}token_embedding.weight"] if cfg.shared_classifier
                                  else torch.from_numpy(weights.wcls.copy()))
    ckpt = {"format": CKPT_FORMAT, "version": CKPT_VERSION, "model": sd, "model_config": cfg.to_dict(),
            "iter_num": 7, **extra}
    torch.save(ckpt, path)
    return path


# ---------------------------------------------------------------------------------------------
# round trips


@pytest.mark.parametrize("version", [0, 1, 2, 3])
def test_bin_write_read_every_version(tmp_path, model, version):
    cfg, w = model
    path = export_bin(tmp_path / "m.bin", cfg, w, version)
    ckpt = load_checkpoint(path)
    assert (ckpt.version, ckpt.config) == (version, cfg)
    if version < 2:
        assert_same(w, ckpt.weights)
    else:  # the default group size: the largest <= 64 dividing dim 32 and hidden 64
        assert ckpt.group_size == 32


@pytest.mark.parametrize("prefix", ["", "_orig_mod.", "module._orig_mod."])
def test_torch_checkpoint_to_bin(tmp_path, model, prefix):
    cfg, w = model
    pt = torch_checkpoint(tmp_path / "ckpt.pt", cfg, w, prefix)
    for version in (0, 1):
        out = convert(pt, tmp_path / f"m{version}.bin", "bin", version)
        ckpt = load_checkpoint(out)
        assert (ckpt.version, ckpt.config) == (version, cfg)
        assert_same(w, ckpt.weights)


def test_bin_to_pt_to_bin(tmp_path, model):
    cfg, w = model
    src = export_bin(tmp_path / "a.bin", cfg, w, 1)
    convert(src, tmp_path / "b.pt", "pt")
    cfg2, w2 = load_weights(tmp_path / "b.pt")
    assert cfg2 == cfg
    assert_same(w, w2)


def test_trainers_resumable_checkpoint_exports(tmp_path, model):
    cfg, w = model
    from babyllama.formats.ckpt import weights_to_state_dict

    save_train_checkpoint(tmp_path / "ckpt.pt", cfg, weights_to_state_dict(cfg, w), optimizer={}, scaler=None,
                          train_config={}, iter_num=3, best_val_loss=2.5, world_size=1, rng_states=[None])
    assert cli_main(["export", str(tmp_path / "ckpt.pt"), str(tmp_path / "m.bin")]) == 0
    assert_same(w, load_checkpoint(tmp_path / "m.bin").weights)


def test_hf_round_trip_keeps_weights_and_gqa(tmp_path, model):
    cfg, w = model
    export_bin(tmp_path / "m.bin", cfg, w, 0)
    out = convert(tmp_path / "m.bin", tmp_path / "hf", "hf")
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

    cfg2, w2 = load_model(out)
    assert cfg2 == cfg
    assert_same(w, w2)
    # and back to a .bin through the CLI
    assert cli_main(["export", str(out), str(tmp_path / "back.bin"), "--to", "bin", "--version", "1"]) == 0
    assert_same(w, load_checkpoint(tmp_path / "back.bin").weights)


def test_safetensors_file_mode_is_the_same_as_every_other_output(tmp_path, model):
    cfg, w = model
    out = export_hf(tmp_path / "hf", cfg, w)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    bin_mode = stat.S_IMODE(export_bin(tmp_path / "m.bin", cfg, w).stat().st_mode)
    assert set(modes.values()) == {bin_mode}, modes


# ---------------------------------------------------------------------------------------------
# #10: hyperparameters llama2.c's v0 cannot hold travel, or the write is refused


def test_hf_llama3_hyperparameters_refused_by_v0_and_kept_by_v1(tmp_path, capsys):
    cfg = LLAMA3_LIKE
    w = Weights.from_dict(cfg, random_weights(cfg, seed=2))
    folder = export_hf(tmp_path / "hf", cfg, w)
    config = json.loads((folder / "config.json").read_text())
    assert (config["rope_theta"], config["rms_norm_eps"], config["head_dim"]) == (500000.0, 1e-6, 16)
    assert config["rope_scaling"]["rope_type"] == "llama3"
    assert load_hf(folder)[0] == cfg

    assert cli_main(["export", str(folder), str(tmp_path / "m.bin")]) == 1  # --version 0 by default
    assert_one_line_error(capsys, "export", "rope_theta 500000.0", "norm_eps 1e-06", "head_dim 16",
                          "write --version 1, 2 or 3 instead")
    assert not (tmp_path / "m.bin").exists()

    for version in (1, 2, 3):
        assert cli_main(["export", str(folder), str(tmp_path / f"m{version}.bin"), "--version", str(version)]) == 0
        assert load_checkpoint(tmp_path / f"m{version}.bin").config == cfg
    assert_same(w, load_checkpoint(tmp_path / "m1.bin").weights)
    # and back out to HF from the .bin: the same config.json
    convert(tmp_path / "m1.bin", tmp_path / "hf2", "hf")
    assert json.loads((tmp_path / "hf2" / "config.json").read_text()) == config


def test_hf_transformers5_rope_parameters_are_read(tmp_path):
    cfg = LLAMA3_LIKE
    folder = export_hf(tmp_path / "hf", cfg, Weights.from_dict(cfg, random_weights(cfg)))
    config = json.loads((folder / "config.json").read_text())
    config["rope_parameters"] = {**config.pop("rope_scaling"), "rope_theta": config.pop("rope_theta")}
    (folder / "config.json").write_text(json.dumps(config))
    assert load_hf(folder)[0] == cfg


@pytest.mark.parametrize("key, value, match", [
    ("rope_scaling", {"rope_type": "linear", "factor": 2.0}, r"rope_scaling\.rope_type: expected 'default' or "
                                                             r"'llama3' .*found 'linear'"),
    ("rope_scaling", {"type": "dynamic", "factor": 2.0}, r"rope_scaling\.rope_type: .*found 'dynamic'"),
    ("rope_scaling", {"rope_type": "llama3", "factor": 8.0}, r"rope_scaling: expected keys low_freq_factor, "),
    ("rope_parameters", {"rope_type": "yarn", "rope_theta": 1e6}, r"rope_parameters\.rope_type: .*found 'yarn'"),
    ("hidden_act", "gelu", "hidden_act: expected 'silu'"),
])
def test_hf_configs_babyllama_cannot_run_name_the_field(tmp_path, tiny_config, key, value, match):
    folder = export_hf(tmp_path / "hf", tiny_config, Weights.from_dict(tiny_config, random_weights(tiny_config)))
    config = json.loads((folder / "config.json").read_text())
    config[key] = value
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=match) as err:
        load_hf(folder)
    assert "\n" not in str(err.value)


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


def _bf16_weights(cfg, seed):
    """Random weights rounded to bf16 first, so a bf16 checkpoint holds exactly these values."""
    raw = random_weights(cfg, seed=seed)
    return Weights.from_dict(cfg, {k: torch.from_numpy(v).to(torch.bfloat16).float().numpy() for k, v in raw.items()})


def test_meta_import(tmp_path, tiny_config):
    hidden = meta_hidden_dim(tiny_config.dim, 32)
    assert hidden == 96  # int(2 * 128 / 3) = 85 rounded up to a multiple of 32
    cfg = replace(tiny_config, hidden_dim=hidden, shared_classifier=False, seq_len=2048)
    w = _bf16_weights(cfg, 3)
    folder = _meta_folder(tmp_path, cfg, w)
    assert detect_format(folder) == "meta"
    out = convert(folder, tmp_path / "meta.bin", "bin", 0)
    ckpt = load_checkpoint(out)
    assert ckpt.config == cfg  # vocab from the embedding (params say -1), hidden from multiple_of
    assert_same(w, ckpt.weights)  # no RoPE permutation: Meta and llama2.c agree

    (folder / "consolidated.01.pth").write_bytes(b"")
    with pytest.raises(CheckpointError, match="found 2 model-parallel shard"):
        load_meta(folder)


def test_meta_llama3_hyperparameters_refused_by_v0_and_kept_by_v1(tmp_path, tiny_config, capsys):
    cfg = replace(tiny_config, hidden_dim=96, shared_classifier=False, seq_len=128, rope_theta=500000.0,
                  norm_eps=1e-6, rope_scaling=RopeScaling(8.0, 1.0, 4.0, 8192))
    w = _bf16_weights(cfg, 4)
    folder = _meta_folder(tmp_path, cfg, w, {"rope_theta": 500000.0, "norm_eps": 1e-6, "use_scaled_rope": True})
    assert load_meta(folder, seq_len=128)[0] == cfg  # Meta's apply_scaling constants
    assert cli_main(["export", str(folder), str(tmp_path / "m.bin"), "--seq-len", "128"]) == 1
    assert_one_line_error(capsys, "export", "rope_theta 500000.0", "norm_eps 1e-06", "llama3 rope_scaling")
    assert cli_main(["export", str(folder), str(tmp_path / "m.bin"), "--seq-len", "128", "--version", "1"]) == 0
    ckpt = load_checkpoint(tmp_path / "m.bin")
    assert ckpt.config == cfg
    assert_same(w, ckpt.weights)


def test_meta_hidden_dim_disagreeing_with_weights(tmp_path, tiny_config):
    cfg = replace(tiny_config, hidden_dim=96, shared_classifier=False)
    w = Weights.from_dict(cfg, random_weights(cfg))
    folder = _meta_folder(tmp_path, cfg, w, {"multiple_of": 64})  # says hidden 128
    with pytest.raises(CheckpointError, match=r"feed_forward.w1.weight: expected shape \(128, 32\).*found \(96, 32\)"):
        load_meta(folder)


# ---------------------------------------------------------------------------------------------
# RoPE conventions


def test_permutations_are_inverse():
    w = np.arange(8 * 6 * 3, dtype=np.float32).reshape(48, 3)
    for heads in (1, 2, 6):
        np.testing.assert_array_equal(permute_from_hf(permute_to_hf(w, heads), heads), w)
    # one head of size 4: rows (0, 1, 2, 3) -> evens then odds
    np.testing.assert_array_equal(permute_to_hf(w[:4], 1)[:, 0], w[[0, 2, 1, 3], 0])


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
    # an independent reference of both conventions (the transformers test below checks the real thing)
    cfg = tiny_config
    rng = np.random.default_rng(0)
    wq = rng.standard_normal((cfg.dim, cfg.dim))
    wk = rng.standard_normal((cfg.kv_dim, cfg.dim))
    x = rng.standard_normal((6, cfg.dim))
    ours = _scores(wq, wk, x, cfg, _rope_llama2c)
    hf_wq, hf_wk = permute_to_hf(wq, cfg.n_heads), permute_to_hf(wk, cfg.n_kv_heads)
    np.testing.assert_allclose(_scores(hf_wq, hf_wk, x, cfg, _rope_hf), ours, rtol=1e-9, atol=1e-9)
    # without the permutation the scores differ: the test can tell
    assert not np.allclose(_scores(wq, wk, x, cfg, _rope_hf), ours, atol=1e-3)
    # wk permuted with n_heads instead of n_kv_heads is wrong too
    bad_wk = permute_to_hf(wk, cfg.n_heads)
    assert not np.allclose(_scores(hf_wq, bad_wk, x, cfg, _rope_hf), ours, atol=1e-3)


# ---------------------------------------------------------------------------------------------
# transformers reads what we write (skipped where it is not installed)


def _transformers():
    return pytest.importorskip("transformers", reason="transformers is not installed (pip install transformers)")


def test_transformers_logits_match_the_engine(tmp_path):
    transformers = _transformers()
    from babyllama.engine import Engine

    cfg = LLAMA3_LIKE
    w = Weights.from_dict(cfg, random_weights(cfg, seed=5))
    write_checkpoint(tmp_path / "m.bin", cfg, w, version=1)
    folder = convert(tmp_path / "m.bin", tmp_path / "hf", "hf")
    hf = transformers.LlamaForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, cfg.seq_len)
    with torch.no_grad():
        theirs = hf(torch.from_numpy(tokens[None])).logits[0].numpy()
    ours = Engine(cfg, w).logits(tokens)
    assert np.abs(ours).max() > 1  # logits that mean something
    assert np.abs(theirs - ours).max() <= 1e-4


def test_transformers_auto_tokenizer_loads_the_exported_folder(tmp_path):
    transformers = _transformers()
    from babyllama.tokenizers import Llama2cTokenizer

    cfg = LLAMA3_LIKE  # 512 tokens, as tok512.model
    write_checkpoint(tmp_path / "m.bin", cfg, Weights.from_dict(cfg, random_weights(cfg)), version=1)
    folder = convert(tmp_path / "m.bin", tmp_path / "hf", "hf", tokenizer=shared_file("tok512.model"))
    assert {"tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.bin"} <= {
        p.name for p in folder.iterdir()}
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    assert (tok.bos_token, tok.eos_token, tok.unk_token) == ("<s>", "</s>", "<unk>")
    ours = Llama2cTokenizer.load(folder / "tokenizer.bin", cfg.vocab_size)
    for text in ["Once upon a time, there was a little girl named Lily.", "The end!\n\nCafé 123"]:
        assert tok(text)["input_ids"] == ours.encode(text)


# ---------------------------------------------------------------------------------------------
# bad inputs


def test_bad_inputs(tmp_path, model, capsys):
    cfg, w = model
    with pytest.raises(CheckpointError, match="no such model file"):
        convert(tmp_path / "nope.pt", tmp_path / "o.bin")
    (tmp_path / "junk.pt").write_bytes(b"this is not a checkpoint at all")
    with pytest.raises(CheckpointError, match="not a torch checkpoint"):
        load_weights(tmp_path / "junk.pt")
    torch.save({"weights": {}}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match=r"expected a babyllama checkpoint \(format 'babyllama-train'\), "
                                              r"found format None with keys \['weights'\]"):
        load_weights(tmp_path / "other.pt")
    torch_checkpoint(tmp_path / "v9.pt", cfg, w, version=9)
    with pytest.raises(CheckpointError, match="expected checkpoint version 1, found 9"):
        load_weights(tmp_path / "v9.pt")

    pt = torch_checkpoint(tmp_path / "ok.pt", cfg, w)
    ckpt = torch.load(pt, weights_only=True)
    del ckpt["model"]["layers.1.w2.weight"]
    torch.save(ckpt, tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match=r"missing tensors: expected layers\.1\.w2\.weight"):
        load_weights(tmp_path / "missing.pt")
    ckpt = torch.load(pt, weights_only=True)
    ckpt["model_config"]["hidden_dim"] = 48
    torch.save(ckpt, tmp_path / "shape.pt")
    with pytest.raises(CheckpointError, match=r"layers\.0\.w1\.weight: expected shape \(48, 32\).*found \(64, 32\)"):
        load_weights(tmp_path / "shape.pt")
    ckpt["model_config"]["n_heads"] = 3
    torch.save(ckpt, tmp_path / "config.pt")
    with pytest.raises(CheckpointError, match=r"config.pt: invalid model_config \(n_heads \(3\) must be divisible"):
        load_weights(tmp_path / "config.pt")

    with pytest.raises(CheckpointError, match="unknown export target 'onnx': expected one of bin, hf, pt, gguf"):
        convert(pt, tmp_path / "o", "onnx")
    with pytest.raises(CheckpointError, match="unknown .bin version 7: expected one of 0, 1, 2, 3"):
        convert(pt, tmp_path / "o.bin", "bin", 7)
    assert not (tmp_path / "o.bin").exists()

    # the CLI turns errors into one line on stderr and exit status 1
    assert cli_main(["export", str(tmp_path / "junk.pt"), str(tmp_path / "o.bin")]) == 1
    assert_one_line_error(capsys, "export", "not a torch checkpoint")


def test_library_messages_are_cut_at_a_boundary_or_named_by_type():
    assert summary(ValueError("short and sweet")) == "ValueError: short and sweet"
    assert summary(RuntimeError("first line\nsecond line")) == "RuntimeError: first line"
    long = "Weights only load failed. " + "x" * 300
    assert summary(RuntimeError(long)) == "RuntimeError: Weights only load failed."
    assert summary(EOFError("y" * 300)) == "EOFError"
    assert summary(EOFError()) == "EOFError"
    assert summary(RuntimeError("\x1b[1mbold\x1b[0m words")) == "RuntimeError: bold words"


def test_torch_errors_are_not_quoted_mid_sentence(tmp_path):
    from fractions import Fraction

    # weights_only refuses to unpickle a class it does not know, with a message of many long lines
    torch.save({"x": Fraction(1, 3)}, tmp_path / "custom.pt")
    with pytest.raises(CheckpointError, match="not a torch checkpoint") as err:
        load_weights(tmp_path / "custom.pt")
    message = str(err.value)
    quoted = message[message.index("(") + 1 : -1]
    assert "\n" not in message and "\x1b" not in message and len(quoted) <= 200
    assert quoted == "UnpicklingError" or quoted.endswith("."), quoted


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
    assert cli_main(["export", str(pt), str(tmp_path / "out" / "m.bin"), "--tokenizer", str(tok)]) == 0
    assert (tmp_path / "out" / "tokenizer.bin").read_bytes() == tok.read_bytes()
    # a tokenizer of the wrong size is refused before anything is written
    with pytest.raises(TokenizerError, match="expected 64 tokens, the file holds 63"):
        convert(pt, tmp_path / "out" / "m2.bin", tokenizer=_tokenizer_bin(tmp_path / "t63.bin", 63))
    assert not (tmp_path / "out" / "m2.bin").exists()
    # the tokenizer already in place is left alone
    assert convert(pt, tmp_path / "out" / "m.bin", tokenizer=tmp_path / "out" / "tokenizer.bin")
    assert (tmp_path / "out" / "tokenizer.bin").read_bytes() == tok.read_bytes()
    with pytest.raises(OutputError, match="overwritten by the tokenizer.bin"):
        convert(pt, tmp_path / "out" / "tokenizer.bin", tokenizer=tok)


def test_real_model_state_dict_compiled_and_ddp_wrapped(tmp_path, model):
    """The state_dict of training.model.Transformer, as torch.compile + DDP would prefix it."""
    from babyllama.training.model import Transformer

    cfg, w = model
    net = Transformer.from_weights(cfg, w)
    sd = {f"module._orig_mod.{k}": v for k, v in net.state_dict().items()}
    torch.save({"format": CKPT_FORMAT, "version": CKPT_VERSION, "model": sd, "model_config": cfg.to_dict(),
                "optimizer": {}}, tmp_path / "ckpt.pt")
    assert cli_main(["export", str(tmp_path / "ckpt.pt"), str(tmp_path / "m.bin")]) == 0
    assert_same(w, load_checkpoint(tmp_path / "m.bin").weights)
    assert_same(w, Transformer.from_weights(*load_model(tmp_path / "m.bin")).to_weights())


# ---------------------------------------------------------------------------------------------
# #9: outputs that are the input, and outputs that cannot be written


def _aliases(path):
    """The input itself, a hard link to it and a symlink to it."""
    hard, soft = path.with_name("hard" + path.name), path.with_name("soft" + path.name)
    os.link(path, hard)
    soft.symlink_to(path)
    return [path, hard, soft]


@pytest.mark.parametrize("command", [["export", "--version", "2"], ["export", "--version", "1"], ["quantize"],
                                     ["export", "--to", "pt"]])
def test_output_that_is_the_input_is_refused(tmp_path, model, capsys, command):
    cfg, w = model
    src = export_bin(tmp_path / "m.bin", cfg, w, 1)
    before = src.read_bytes()
    for out in _aliases(src):
        assert cli_main([command[0], str(src), str(out), *command[1:]]) == 1
        assert_one_line_error(capsys, command[0], out, "the output is the input")
    assert src.read_bytes() == before
    assert not list(tmp_path.glob(".*tmp*"))


def test_hf_output_that_is_the_input_folder_is_refused(tmp_path, model, capsys):
    cfg, w = model
    folder = export_hf(tmp_path / "hf", cfg, w)
    (tmp_path / "link").symlink_to(folder)
    before = (folder / "model.safetensors").read_bytes()
    for out in (folder, tmp_path / "link"):
        assert cli_main(["export", str(folder), str(out), "--to", "hf"]) == 1
        assert_one_line_error(capsys, "export", "the output is the input")
    assert (folder / "model.safetensors").read_bytes() == before


def test_quantize_file_refuses_its_input(tmp_path, model):
    cfg, w = model
    src = export_bin(tmp_path / "m.bin", cfg, w, 0)
    for out in _aliases(src):
        with pytest.raises(OutputError, match="the output is the input"):
            quantize_file(src, out)


def test_unwritable_outputs_are_one_line_errors_naming_the_path(tmp_path, model, capsys):
    cfg, w = model
    src = export_bin(tmp_path / "m.bin", cfg, w, 1)
    (tmp_path / "a_file").write_bytes(b"not a folder")
    (tmp_path / "a_folder").mkdir()
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro").chmod(0o500)
    cases = [  # (argv, the path the message names)
        (["export", str(src), str(tmp_path / "missing" / "m.bin")], tmp_path / "missing"),
        (["export", str(src), str(tmp_path / "missing" / "hf"), "--to", "hf"], tmp_path / "missing"),
        (["export", str(src), str(tmp_path / "a_folder")], tmp_path / "a_folder"),
        (["export", str(src), str(tmp_path / "a_file"), "--to", "hf"], tmp_path / "a_file"),
        (["export", str(src), str(tmp_path / "a_folder"), "--to", "pt"], tmp_path / "a_folder"),
        (["quantize", str(src), str(tmp_path / "missing" / "q.bin")], tmp_path / "missing"),
        (["quantize", str(src), str(tmp_path / "a_folder")], tmp_path / "a_folder"),
    ]
    if os.geteuid() != 0:  # root writes into read-only folders anyway
        cases += [(["export", str(src), str(tmp_path / "ro" / "m.bin")], tmp_path / "ro"),
                  (["export", str(src), str(tmp_path / "ro" / "hf"), "--to", "hf"], tmp_path / "ro")]
    for argv, path in cases:
        assert cli_main(argv) == 1, argv
        assert_one_line_error(capsys, argv[0], path)
    assert (tmp_path / "a_file").read_bytes() == b"not a folder"
    assert not list(tmp_path.rglob(".*tmp*"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "a_folder", "m.bin", "ro"]
