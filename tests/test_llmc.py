"""llm.c's files (formats/llmc.py, tokenizers/gpt2.py): gpt2_124M.bin and gpt2_tokenizer.bin
written and read back bit for bit, the header checked before the data, bf16 (version 5) read,
the engine on a read file against the torch GPT-2, and the CLI's routing and one-line errors.
(llm.c's own C and Python code is checked by bench/llmc_interop.sh.)"""

import struct

import numpy as np
import pytest

from babyllama.arch import gpt2
from babyllama.cli import main as cli_main
from babyllama.config import ModelConfig
from babyllama.engine import Engine
from babyllama.errors import CheckpointError, TokenizerError
from babyllama.formats import detect_format, load_for_inference, load_model
from babyllama.formats.llmc import (
    HEADER_BYTES, load_llmc, padded_vocab, read_llmc_tokenizer, write_llmc, write_llmc_tokenizer,
)
from babyllama.testing import random_weights
from babyllama.tokenizers import load_tokenizer

CFG = ModelConfig(dim=32, hidden_dim=128, n_layers=2, n_heads=4, n_kv_heads=4, vocab_size=200, seq_len=24,
                  arch="gpt2")


def _weights(cfg=CFG, seed=0):
    return gpt2.Weights.from_dict(cfg, random_weights(cfg, seed=seed, scale=0.2))


def _pieces(n=CFG.vocab_size):
    """n distinct tokens: the 256 bytes first (as GPT-2's BPE starts), eot last as its text."""
    pieces = [bytes([i]) for i in range(min(n - 1, 256))]
    pieces += [b"t%d " % i for i in range(n - 1 - len(pieces))]
    return pieces + [b"<|endoftext|>"]


@pytest.fixture
def model_dir(tmp_path):
    write_llmc(tmp_path / "gpt2.bin", CFG, _weights())
    write_llmc_tokenizer(tmp_path / "gpt2_tokenizer.bin", _pieces(), CFG.vocab_size - 1)
    return tmp_path


def one_line(capsys, *needles):
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for n in needles:
        assert str(n) in err, (n, err)


def test_round_trip_is_bit_exact_and_the_layout_is_llmcs(model_dir):
    path = model_dir / "gpt2.bin"
    data = path.read_bytes()
    vp = padded_vocab(CFG.vocab_size)
    assert vp == 256 and padded_vocab(50257) == 50304
    header = struct.unpack_from("<8i", data)
    assert header == (20240326, 3, CFG.seq_len, CFG.vocab_size, CFG.n_layers, CFG.n_heads, CFG.dim, vp)
    assert data[32:HEADER_BYTES] == bytes(HEADER_BYTES - 32)
    w = _weights()
    # wte first, padded with zero rows, then wpe: llm.c's order
    wte = np.frombuffer(data, "<f4", vp * CFG.dim, HEADER_BYTES).reshape(vp, CFG.dim)
    assert np.array_equal(wte[: CFG.vocab_size], w.token_embedding) and not wte[CFG.vocab_size:].any()
    wpe = np.frombuffer(data, "<f4", CFG.seq_len * CFG.dim, HEADER_BYTES + wte.nbytes)
    assert np.array_equal(wpe.reshape(CFG.seq_len, CFG.dim), w.position_embedding)
    cfg, back = load_llmc(path)
    assert cfg == CFG and detect_format(path) == "llmc"
    for name, arr in w.items():
        assert np.array_equal(getattr(back, name), arr), name
    assert not back.wqkv.flags.writeable  # a view of the mapped file, not a copy
    write_llmc(model_dir / "again.bin", cfg, back)
    assert (model_dir / "again.bin").read_bytes() == data


def test_bf16_version_5_is_read_as_fp32(tmp_path):
    w = _weights(seed=3)
    vp = padded_vocab(CFG.vocab_size)
    header = np.zeros(256, "<i4")
    header[:8] = (20240326, 5, CFG.seq_len, CFG.vocab_size, CFG.n_layers, CFG.n_heads, CFG.dim, vp)
    parts, rounded = [header.tobytes()], {}
    for name, _ in gpt2.LLMC_ORDER:
        arr = getattr(w, name)
        if name == "token_embedding":
            arr = np.concatenate([arr, np.zeros((vp - CFG.vocab_size, CFG.dim), np.float32)])
        bits = (np.ascontiguousarray(arr, np.float32).view(np.uint32) >> 16).astype("<u2")  # truncating to bf16
        parts.append(bits.tobytes())
        rounded[name] = (bits.astype(np.uint32) << 16).view(np.float32)
    (tmp_path / "bf16.bin").write_bytes(b"".join(parts))
    cfg, back = load_llmc(tmp_path / "bf16.bin")
    assert cfg == CFG
    assert np.array_equal(back.token_embedding, rounded["token_embedding"][: CFG.vocab_size])
    assert np.array_equal(back.w2, rounded["w2"]) and not np.array_equal(back.w2, w.w2)


def test_engine_on_a_read_file_matches_the_torch_gpt2(model_dir):
    torch = pytest.importorskip("torch")
    from babyllama.training.gpt2_model import GPT2

    cfg, w = load_llmc(model_dir / "gpt2.bin")
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, cfg.seq_len)
    t = torch.from_numpy(tokens)[None]
    with torch.no_grad():
        want = GPT2.from_weights(cfg, w).eval()(t, t)[0][0].numpy()
    got = Engine(cfg, w).logits(tokens)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * max(1.0, np.abs(want).max()))


def _header(**changes):
    h = dict(magic=20240326, version=3, maxT=CFG.seq_len, V=CFG.vocab_size, L=CFG.n_layers, NH=CFG.n_heads,
             C=CFG.dim, Vp=256)
    h.update(changes)
    return struct.pack("<8i", *h.values()) + bytes(HEADER_BYTES - 32)


@pytest.mark.parametrize("make, needles", [
    (lambda good: good[:-4], ["llm.c model truncated", "(V 200, Vp 256, L 2, C 32, maxT 24) implies 138752 bytes, "
                              "found 138748"]),
    (lambda good: good + b"\0" * 8, ["has trailing bytes"]),
    (lambda good: good[:100], ["expected a 1024-byte header, found 100 bytes"]),
    (lambda good: _header(version=4) + good[HEADER_BYTES:], ["version: expected 3 (fp32) or 5 (bf16), found 4"]),
    (lambda good: _header(L=1 << 30) + good[HEADER_BYTES:], ["header L: expected a positive integer up to 16777216",
                                                             "found 1073741824"]),
    (lambda good: _header(L=100000, C=4096) + good[HEADER_BYTES:], ["truncated", "found 138752"]),
    (lambda good: _header(V=0) + good[HEADER_BYTES:], ["header V: expected a positive integer"]),
    (lambda good: _header(Vp=100) + good[HEADER_BYTES:], ["expected padded vocab Vp >= V (200), found 100"]),
    (lambda good: _header(NH=5) + good[HEADER_BYTES:], ["dim (32) must be divisible by n_heads (5)"]),
])
def test_bad_files_are_one_line_errors_before_any_data_is_read(model_dir, make, needles):
    good = (model_dir / "gpt2.bin").read_bytes()
    bad = model_dir / "bad.bin"
    bad.write_bytes(make(good))
    with pytest.raises(CheckpointError) as e:
        load_model(bad)
    msg = str(e.value)
    assert "\n" not in msg and str(bad) in msg
    for n in needles:
        assert n in msg, (n, msg)


def test_the_cli_says_a_truncated_file_in_one_line(model_dir, capsys):
    path = model_dir / "gpt2.bin"
    path.write_bytes(path.read_bytes()[:5000])
    assert cli_main(["run", str(path), "-n", "4"]) == 1
    one_line(capsys, "llm.c model truncated")
    assert cli_main(["export", str(path), str(model_dir / "hf"), "--to", "hf"]) == 1
    one_line(capsys, "llm.c model truncated")


def test_tokenizer_round_trip_and_checks(tmp_path):
    pieces = _pieces()
    path = write_llmc_tokenizer(tmp_path / "tok.bin", pieces, len(pieces) - 1)
    data = path.read_bytes()
    assert struct.unpack_from("<4I", data) == (20240328, 2, len(pieces), len(pieces) - 1)
    assert read_llmc_tokenizer(path) == (pieces, len(pieces) - 1)
    tok = load_tokenizer(path, len(pieces))
    assert tok.bos_id == tok.eos_ids[0] == tok.stop_ids[0] == len(pieces) - 1
    assert tok.decode([72, 105, 32, 199]) == "Hi "  # eot prints nothing
    assert tok.encode("") == [199]
    with pytest.raises(TokenizerError, match="can only decode: it holds no BPE merges"):
        tok.encode("Hi")
    cases = [
        (data[:-3], "token 199 of 200: expected 1..255 bytes, found length 13 with 10 bytes left"),
        (data[:500], "truncated llm.c tokenizer: expected a 1024-byte header, found 500 bytes"),
        (data + b"x", "trailing bytes"),
        (struct.pack("<4I", 20240328, 3, 200, 199) + data[16:], "version: expected 1 or 2, found 3"),
        (struct.pack("<4I", 20240328, 2, 1 << 30, 0) + data[16:], "1073741824 tokens cannot fit"),
        (struct.pack("<4I", 20240328, 1, 200, 0) + data[16:], "holds GPT-2's 50257 tokens, found 200"),
        (struct.pack("<4I", 20240328, 2, 200, 200) + data[16:], "eot token 200 is out of range"),
    ]
    for bad, needle in cases:
        (tmp_path / "bad.bin").write_bytes(bad)
        with pytest.raises(TokenizerError) as e:
            read_llmc_tokenizer(tmp_path / "bad.bin")
        assert needle in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(TokenizerError, match="expected 300 tokens for this model, the llm.c tokenizer holds 200"):
        load_tokenizer(path, 300)
    with pytest.raises(TokenizerError, match="1..255 bytes per token, found 0"):
        write_llmc_tokenizer(tmp_path / "t.bin", [b"a", b""], 0)


def test_run_generates_from_eot_and_refuses_a_prompt_it_cannot_encode(model_dir, capsys):
    assert cli_main(["run", str(model_dir / "gpt2.bin"), "-n", "8", "-s", "3", "--json"]) == 0
    import json

    out = json.loads(capsys.readouterr().out)
    assert out["tokens"][0] == 199 and len(out["tokens"]) <= 9  # eot, then up to 8 positions
    # the same tokens as the Python API, whose logits are the engine's
    from babyllama.api import Model

    model = Model.load(model_dir / "gpt2.bin")
    assert [p.id for p in model.pieces("", 8, seed=3)][: len(out["tokens"]) - 1] == out["tokens"][1:]
    assert cli_main(["run", str(model_dir / "gpt2.bin"), "-i", "Hello"]) == 1
    one_line(capsys, "can only decode", "tokenizer.json or vocab.json")


def test_routing_and_refusals(model_dir, tiny_model, capsys):
    tok = model_dir / "gpt2_tokenizer.bin"
    with pytest.raises(CheckpointError, match="is llm.c's tokenizer file"):
        detect_format(tok)
    loaded = load_for_inference(model_dir / "gpt2.bin")
    assert loaded.kind == "llmc" and loaded.tokenizer.vocab_size == CFG.vocab_size
    with pytest.raises(CheckpointError, match="the GPT-2 engine runs fp32 weights only"):
        load_for_inference(model_dir / "gpt2.bin", quantize=8)
    assert cli_main(["quantize", str(model_dir / "gpt2.bin"), str(model_dir / "q.bin")]) == 1
    one_line(capsys, "GPT-2 engine runs fp32 weights only")
    assert cli_main(["export", str(tiny_model), str(model_dir / "l.bin"), "--to", "llmc"]) == 1
    one_line(capsys, "llm.c's files hold GPT-2 models; this one is 'llama'")
    assert cli_main(["export", str(model_dir / "gpt2.bin"), str(model_dir / "g.bin")]) == 1
    one_line(capsys, "a GPT-2 model (arch 'gpt2') exports to llmc, hf or pt; found --to bin")
    (model_dir / "gpt2_tokenizer.bin").unlink()
    with pytest.raises(TokenizerError, match="expected gpt2_tokenizer.bin, tokenizer.json or vocab.json"):
        load_for_inference(model_dir / "gpt2.bin")
    wide = ModelConfig(dim=32, hidden_dim=100, n_layers=1, n_heads=4, n_kv_heads=4, vocab_size=50, seq_len=8,
                       arch="gpt2")
    with pytest.raises(CheckpointError, match=r"hidden = 4 \* dim \(128\); this model's hidden_dim is 100"):
        write_llmc(model_dir / "w.bin", wide, _weights(wide))
    assert not (model_dir / "w.bin").exists()
