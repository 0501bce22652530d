"""GPT-2 across formats: Hugging Face GPT2LMHeadModel folders read and written (formats/hf_gpt2.py)
against transformers' logits, the byte-level BPE (vocab.json + merges.txt, tokenizer.json)
against GPT2TokenizerFast, and a `babyllama train --arch gpt2` checkpoint through `export --to
llmc` and `run`."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")
tokenizers = pytest.importorskip("tokenizers")

from babyllama.arch import gpt2  # noqa: E402
from babyllama.cli import main as cli_main  # noqa: E402
from babyllama.config import ModelConfig  # noqa: E402
from babyllama.engine import Engine  # noqa: E402
from babyllama.errors import CheckpointError  # noqa: E402
from babyllama.formats import load_for_inference, load_model  # noqa: E402
from babyllama.formats.hf import export_hf  # noqa: E402
from babyllama.formats.llmc import load_llmc  # noqa: E402
from babyllama.testing import random_weights  # noqa: E402
from babyllama.tokenizers import load_tokenizer  # noqa: E402

torch.set_num_threads(1)
TEXT = ("The quick brown fox jumps over the lazy dog. Ünïcödé, emoji 🦊 and tabs\tand  spaces. "
        "Numbers 12345 and don't, we'll, it's. ") * 30
SAMPLES = ["The quick brown fox", " leading space", "Ünïcödé 🦊🦊", "a<|endoftext|>b", "don't\n\nstop  now", ""]


def hf_model(n_inner=None, seed=0, vocab=97):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=vocab, n_positions=24, n_embd=32, n_layer=2, n_head=4, n_inner=n_inner,
                                  activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # the default init (std 0.02) makes near-zero logits: a weak test
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def hf_logits(model, tokens):
    with torch.no_grad():
        return model(torch.from_numpy(np.asarray(tokens))[None]).logits[0].float().numpy()


def close(got, want):
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * max(1.0, np.abs(want).max()))


@pytest.mark.parametrize("n_inner", [None, 72], ids=["4d", "n_inner72"])
def test_hf_folder_logits_match_transformers(tmp_path, n_inner):
    model = hf_model(n_inner)
    model.save_pretrained(tmp_path / "m")
    loaded = load_for_inference(tmp_path / "m", own_tokenizer=False)
    assert loaded.config.arch == "gpt2" and loaded.config.hidden_dim == (n_inner or 128)
    tokens = np.random.default_rng(1).integers(0, 97, 24)
    close(Engine(loaded.config, loaded.weights).logits(tokens), hf_logits(model, tokens))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_folders_are_read_exactly(tmp_path, dtype):
    model = hf_model(seed=2).to(getattr(torch, dtype))
    model.save_pretrained(tmp_path / "m")
    cfg, w = load_model(tmp_path / "m")
    sd = model.state_dict()
    assert np.array_equal(w.wqkv[1], sd["transformer.h.1.attn.c_attn.weight"].float().numpy().T)
    assert np.array_equal(w.token_embedding, sd["transformer.wte.weight"].float().numpy())


def test_gpt2model_style_names_and_mask_buffers_are_read(tmp_path):
    """The hub's original gpt2 files name tensors without "transformer." and carry attn.bias masks."""
    import safetensors.numpy

    model = hf_model(seed=3)
    model.save_pretrained(tmp_path / "m")
    tensors = safetensors.numpy.load_file(str(tmp_path / "m" / "model.safetensors"))
    renamed = {k.removeprefix("transformer."): v for k, v in tensors.items() if k != "lm_head.weight"}
    renamed["h.0.attn.bias"] = np.tril(np.ones((1, 1, 24, 24), np.float32))
    renamed["lm_head.weight"] = tensors["transformer.wte.weight"]  # tied, and saved: must equal wte
    safetensors.numpy.save_file(renamed, str(tmp_path / "m" / "model.safetensors"), metadata={"format": "pt"})
    cfg, w = load_model(tmp_path / "m")
    tokens = [5, 9, 3, 96, 0]
    close(Engine(cfg, w).logits(tokens), hf_logits(model, tokens))
    renamed["lm_head.weight"] = renamed["lm_head.weight"] + 1
    safetensors.numpy.save_file(renamed, str(tmp_path / "m" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="lm_head.weight differs from transformer.wte.weight"):
        load_model(tmp_path / "m")


@pytest.mark.parametrize("key, value, needle", [
    ("activation_function", "gelu", "activation_function: expected 'gelu_new'"),
    ("scale_attn_by_inverse_layer_idx", True, "scale_attn_by_inverse_layer_idx: expected False"),
    ("tie_word_embeddings", False, "tie_word_embeddings: expected True"),
    ("n_embd", None, "missing key 'n_embd'"),
    ("n_layer", 1 << 20, "n_layer 1048576 needs"),
])
def test_what_gpt2_here_cannot_run_is_refused_naming_the_field(tmp_path, key, value, needle):
    hf_model().save_pretrained(tmp_path / "m")
    c = json.loads((tmp_path / "m" / "config.json").read_text())
    if value is None:
        c.pop(key)
    else:
        c[key] = value
    (tmp_path / "m" / "config.json").write_text(json.dumps(c))
    with pytest.raises(CheckpointError) as e:
        load_model(tmp_path / "m")
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_export_writes_a_folder_transformers_loads(tmp_path):
    cfg = ModelConfig(dim=32, hidden_dim=128, n_layers=2, n_heads=4, n_kv_heads=4, vocab_size=101, seq_len=20,
                      arch="gpt2", norm_eps=1e-5)
    w = gpt2.Weights.from_dict(cfg, random_weights(cfg, seed=4, scale=0.2))
    export_hf(tmp_path / "out", cfg, w)
    model = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "out").eval()
    tokens = np.random.default_rng(5).integers(0, 101, 20)
    close(Engine(cfg, w).logits(tokens), hf_logits(model, tokens))
    cfg2, w2 = load_model(tmp_path / "out")
    assert cfg2 == cfg and all(np.array_equal(getattr(w2, n), a) for n, a in w.items())


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    """A small byte-level BPE trained here, as vocab.json + merges.txt and as GPT2TokenizerFast."""
    folder = tmp_path_factory.mktemp("bpe")
    tk = tokenizers.ByteLevelBPETokenizer()
    tk.train_from_iterator([TEXT], vocab_size=400, min_frequency=2, special_tokens=["<|endoftext|>"])
    tk.save_model(str(folder))
    fast = transformers.GPT2TokenizerFast.from_pretrained(folder)  # the folder holds only vocab.json + merges.txt
    assert len(fast) > 300
    return folder, fast


def test_bpe_from_vocab_and_merges_encodes_as_gpt2tokenizerfast(bpe, tmp_path):
    folder, fast = bpe
    n = len(fast)
    tok = load_tokenizer(folder / "vocab.json", n)
    eot = fast.convert_tokens_to_ids("<|endoftext|>")
    assert tok.bos_id == eot and tok.eos_ids == (eot,) and tok.add_bos
    for text in SAMPLES:
        ids = fast.encode(text)
        assert tok.encode(text, bos=False) == ids, text
        assert tok.encode(text) == [eot] + ids  # prompts start from <|endoftext|>, as llm.c generates
        assert tok.decode(ids) == fast.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    fast.save_pretrained(tmp_path / "t")  # tokenizer.json: the same ids through tokenizers/hf.py
    tj = load_tokenizer(tmp_path / "t" / "tokenizer.json", n)
    assert all(tj.encode(t, bos=False) == fast.encode(t) for t in SAMPLES)


def test_bpe_becomes_an_llmc_tokenizer_and_an_hf_folder(bpe, tmp_path, capsys):
    from babyllama.formats.llmc import write_llmc

    folder, fast = bpe
    n = len(fast)
    cfg = ModelConfig(dim=32, hidden_dim=128, n_layers=1, n_heads=4, n_kv_heads=4, vocab_size=n, seq_len=16,
                      arch="gpt2")
    write_llmc(tmp_path / "m.bin", cfg, gpt2.Weights.from_dict(cfg, random_weights(cfg, seed=6, scale=0.3)))
    (tmp_path / "out").mkdir()
    assert cli_main(["export", str(tmp_path / "m.bin"), str(tmp_path / "out" / "gpt2.bin"), "--to", "llmc",
                     "--tokenizer", str(folder / "vocab.json")]) == 0
    llmc_tok = load_tokenizer(tmp_path / "out" / "gpt2_tokenizer.bin", n)
    ids = fast.encode(SAMPLES[2] + SAMPLES[0])
    assert llmc_tok.decode(ids) == fast.decode(ids)
    assert llmc_tok.pieces[fast.convert_tokens_to_ids("<|endoftext|>")] == b"<|endoftext|>"
    assert cli_main(["export", str(tmp_path / "m.bin"), str(tmp_path / "hf"), "--to", "hf", "--tokenizer",
                     str(folder / "vocab.json")]) == 0
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert auto.encode(SAMPLES[3]) == fast.encode(SAMPLES[3])
    model = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    assert model.config.eos_token_id == fast.convert_tokens_to_ids("<|endoftext|>")
    capsys.readouterr()
    # run with a prompt: the HF folder encodes it (eot first); the same tokens as the llm.c file
    # with vocab.json given to encode
    assert cli_main(["run", str(tmp_path / "hf"), "-i", "The quick", "-t", "0", "-n", "10", "--json"]) == 0
    a = json.loads(capsys.readouterr().out)
    assert cli_main(["run", str(tmp_path / "out" / "gpt2.bin"), "-z", str(folder / "vocab.json"), "-i", "The quick",
                     "-t", "0", "-n", "10", "--json"]) == 0
    b = json.loads(capsys.readouterr().out)
    assert a["tokens"] == b["tokens"] and a["tokens"][:1] == [fast.convert_tokens_to_ids("<|endoftext|>")]


def test_trained_gpt2_exports_to_llmc_and_runs(excerpt_shards, tmp_path, capsys):
    from conftest import shared_file
    from test_grad_train import run

    out = tmp_path / "train"
    assert run(excerpt_shards, out, "--arch", "gpt2", "--n_kv_heads", "0", "--max_iters", "2", "--eval_interval",
               "2", "--backend", "numba") == 0
    model = tmp_path / "gpt2.bin"
    assert cli_main(["export", str(out / "ckpt.pt"), str(model), "--to", "llmc"]) == 0
    cfg, w = load_llmc(model)
    ck_cfg, ck_w = load_model(out / "ckpt.pt")
    assert cfg.dim == ck_cfg.dim and all(np.array_equal(getattr(w, n), a) for n, a in ck_w.items())
    capsys.readouterr()
    assert cli_main(["run", str(model), "-z", str(shared_file("tok512.bin")), "-i", "Once upon a time", "-t", "0",
                     "-n", "16"]) == 0
    assert capsys.readouterr().out.startswith("Once upon a time")
