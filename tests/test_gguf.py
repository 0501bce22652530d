"""GGUF files run (formats/gguf.py, assemble.py's repack, tokenizers/gguf.py): llama.cpp's own
stories260K.gguf gives stories260K.bin's tokens, files the gguf package writes from random
models run in F32/F16/Q8_0/Q4_0, Q8_0/Q4_0 blocks are repacked value for value, `export --to
gguf` writes what llama.cpp runs (checked against llama-cpp-python where it is installed), and
broken or absurd files are one-line errors without reading or allocating what they claim."""

import base64
import json
import os
import struct
import subprocess
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from conftest import random_weights, shared_file, shared_fixture
from hfmodels import HARD, byte_level_bpe, hf_llama

gguf = pytest.importorskip("gguf")

from babyllama.api import Model  # noqa: E402
from babyllama.arch.llama import GGUF_NAMES, Weights, stored_tensors  # noqa: E402
from babyllama.cli import main as cli_main  # noqa: E402
from babyllama.config import ModelConfig, RopeScaling  # noqa: E402
from babyllama.convert import convert, quantize_file  # noqa: E402
from babyllama.engine import Engine  # noqa: E402
from babyllama.errors import CheckpointError  # noqa: E402
from babyllama.formats import load_for_inference  # noqa: E402
from babyllama.formats.gguf import _add_value as add_value  # noqa: E402
from babyllama.formats.gguf import llama3_frequency_factors, read_header  # noqa: E402
from babyllama.formats.llama2c import load_checkpoint, write_checkpoint  # noqa: E402
from babyllama.tokenizers import load_tokenizer  # noqa: E402
from babyllama.tokenizers.gguf import gguf_vocab  # noqa: E402

T = gguf.GGMLQuantizationType
CFG = ModelConfig(dim=64, hidden_dim=128, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, seq_len=64,
                  shared_classifier=False)  # every row a whole number of 32-value blocks
PROMPT = [1, 17, 42, 99, 7]


def write_with_gguf_package(path, cfg, weights, qtype=T.F32, tokenizer=None, md=None, drop=(), extra=None):
    """A llama GGUF written by the gguf package itself (not by babyllama's exporter): the config as
    llama.* metadata (`md` overrides or, with None, removes entries; general.architecture too),
    the tokenizer's vocabulary, the tensors (less `drop`, plus `extra`) as `qtype`."""
    md = dict(md or {})
    w = gguf.GGUFWriter(str(path), md.pop("general.architecture", "llama"))
    meta = {"llama.context_length": cfg.seq_len, "llama.embedding_length": cfg.dim, "llama.block_count": cfg.n_layers,
            "llama.feed_forward_length": cfg.hidden_dim, "llama.attention.head_count": cfg.n_heads,
            "llama.attention.head_count_kv": cfg.n_kv_heads, "llama.attention.layer_norm_rms_epsilon": cfg.norm_eps,
            "llama.rope.freq_base": cfg.rope_theta}
    meta.update(gguf_vocab(tokenizer) if tokenizer is not None else {})
    meta.update(md)
    for key, value in meta.items():
        if value is not None:
            add_value(w, key, value)  # typed as llama.cpp reads it: ids uint32, floats float32
    for name in stored_tensors(cfg):
        key, arr = GGUF_NAMES[name], getattr(weights, name)
        for i, a in enumerate(arr if "{i}" in key else [arr]):
            a = np.ascontiguousarray(a, np.float32)
            if key.format(i=i) in drop:
                continue
            if a.ndim == 1 or qtype == T.F32:
                w.add_tensor(key.format(i=i), a)
            elif qtype == T.F16:
                w.add_tensor(key.format(i=i), a.astype(np.float16))
            else:
                w.add_tensor(key.format(i=i), gguf.quants.quantize(a, qtype), raw_dtype=qtype)
    for k, a in (extra or {}).items():
        w.add_tensor(k, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)


@pytest.fixture(scope="module")
def weights():
    return Weights.from_dict(CFG, random_weights(CFG, seed=3, scale=0.2))


def engine(path, quantize=None):
    loaded = load_for_inference(path, quantize, own_tokenizer=False)
    return Engine(loaded.config, loaded.weights)


# ---------------------------------------------------------------------------------------------
# llama.cpp's stories260K.gguf


def test_stories260k_gguf_is_stories260k_bin():
    g = load_for_inference(shared_file("stories260K.gguf"))
    b = load_checkpoint(shared_file("stories260K.bin"))
    for name, arr in b.weights.items():  # q/k already interleaved: not a single value moved
        np.testing.assert_array_equal(getattr(g.weights, name), arr, err_msg=name)
    assert (g.config.dim, g.config.n_layers, g.config.n_kv_heads, g.config.vocab_size) == (64, 5, 4, 512)
    tok = load_tokenizer(shared_file("tok512.bin"), 512)
    for s in ["Once upon a time", "Héllo wörld 日本語 🦙 12345  x", "", " a  b "]:
        assert g.tokenizer.encode(s) == tok.encode(s), s


def test_stories260k_gguf_gives_llama2c_fixture_tokens():
    model = Model.load(shared_file("stories260K.gguf"))
    cases = json.loads(shared_fixture("generate_stories260K.json").read_text())["cases"]
    for case in cases:
        a = case["args"]
        ids = [p.id for p in model.pieces(a["prompt"] or "", a["steps"], a["temperature"], a["topp"], a["seed"])
               if p.id >= 0]
        # llama2.c stops at BOS (id 1); the GGUF's stop token is EOS (2): compare what llama2.c generated
        assert ids[: len(case["generated_ids"])] == case["generated_ids"], a
        if case["generated_ids"][-1] != 1:
            text = base64.b64decode(case["stdout_b64"]).decode("utf-8", "replace")
            assert text.startswith("".join(model.generate(a["prompt"] or "", a["steps"], a["temperature"], a["topp"],
                                                          a["seed"]))[:200])


# ---------------------------------------------------------------------------------------------
# files the gguf package writes


def test_f32_and_f16_files_run_as_the_same_bin(tmp_path, weights):
    write_checkpoint(tmp_path / "m.bin", CFG, weights, version=1)
    ref = Engine.from_checkpoint(load_checkpoint(tmp_path / "m.bin")).logits(PROMPT)
    np.testing.assert_array_equal(engine(write_with_gguf_package(tmp_path / "f32.gguf", CFG, weights)).logits(PROMPT), ref)
    half = Weights.from_dict(CFG, {n: a if n.startswith("rms") else np.asarray(a).astype(np.float16).astype(np.float32)
                                   for n, a in weights.items()})  # the norms stay F32 in the file
    write_checkpoint(tmp_path / "h.bin", CFG, half, version=1)
    np.testing.assert_array_equal(engine(write_with_gguf_package(tmp_path / "f16.gguf", CFG, weights, T.F16)).logits(PROMPT),
                                  Engine.from_checkpoint(load_checkpoint(tmp_path / "h.bin")).logits(PROMPT))


@pytest.mark.parametrize("qtype, bits", [(T.Q8_0, 8), (T.Q4_0, 4)])
def test_q8_0_and_q4_0_are_repacked_value_for_value(tmp_path, weights, qtype, bits):
    path = write_with_gguf_package(tmp_path / "q.gguf", CFG, weights, qtype)
    loaded = load_for_inference(path, own_tokenizer=False)
    assert (loaded.weights.bits, loaded.weights.group_size) == (bits, 32) and loaded.description == f"gguf int{bits} gs32"
    for name in ("token_embedding", "wq", "w2", "wcls"):
        ours = getattr(loaded.weights, name).dequantize()
        stack = [gguf.quants.quantize(np.ascontiguousarray(m, np.float32), qtype)
                 for m in np.asarray(getattr(weights, name)).reshape(-1, *ours.shape[-2:])]
        theirs = np.stack([gguf.quants.dequantize(q, qtype) for q in stack]).reshape(ours.shape)
        np.testing.assert_array_equal(ours, theirs, err_msg=name)  # ggml's own dequantization, bit for bit
    logits = Engine(loaded.config, loaded.weights).logits(PROMPT)
    assert np.isfinite(logits).all()
    fp32 = Engine(CFG, weights).logits(PROMPT)
    assert np.abs(logits - fp32).max() < (0.05 if bits == 8 else 0.5) * np.abs(fp32).max()


def test_q8_0_gguf_gives_the_tokens_of_the_equivalent_v2_bin(tmp_path, weights):
    path = write_with_gguf_package(tmp_path / "q8.gguf", CFG, weights, T.Q8_0)
    quantize_file(path, tmp_path / "q8.bin", 8)  # v2 with the GGUF's own integers and scales, group size 32
    ck = load_checkpoint(tmp_path / "q8.bin")
    assert (ck.version, ck.group_size) == (2, 32)
    head = read_header(path)[0]
    q_info = next(t for t in head.tensors if t.name == "blk.0.attn_q.weight")
    raw = np.fromfile(path, np.uint8)[head.data_start + q_info.offset:][: 64 * 64 // 32 * 34].reshape(-1, 34)
    assert ck.weights.wq.values(0).tobytes() == raw[:, 2:].tobytes()  # the very same int8 values
    a, b = engine(path), Engine.from_checkpoint(ck)
    np.testing.assert_array_equal(a.logits(PROMPT), b.logits(PROMPT))
    from babyllama.generation import generate_ids
    argmax = lambda lg: int(np.argmax(lg))  # noqa: E731
    assert list(generate_ids(a, a.new_state(), PROMPT, 40, argmax, ())) == \
        list(generate_ids(b, b.new_state(), PROMPT, 40, argmax, ()))


def test_other_types_are_converted_with_one_note_each(tmp_path, weights):
    path = write_with_gguf_package(tmp_path / "q5.gguf", CFG, weights, T.Q5_0)
    notes = []
    loaded = load_for_inference(path, own_tokenizer=False, note=notes.append)
    assert loaded.description == "gguf fp32" and len(notes) == 1 and "\n" not in notes[0]
    assert notes[0].startswith("16 tensor(s) stored as Q5_0 are dequantized to float32: token_embd.weight")
    notes.clear()
    q = load_for_inference(path, quantize=8, own_tokenizer=False, note=notes.append)
    assert q.weights.bits == 8 and len(notes) == 1 and "requantized to int8" in notes[0]


def test_f16_models_quantize_at_load(tmp_path, weights):
    path = write_with_gguf_package(tmp_path / "f16.gguf", CFG, weights, T.F16)
    for bits in (8, 4):
        e = engine(path, quantize=bits)
        assert e.bits == bits and np.isfinite(e.logits(PROMPT)).all()
    assert cli_main(["run", str(path), "-z", str(_tokenizer_bin(tmp_path)), "-n", "12", "-t", "0", "--quantize", "4"]) == 0


def _tokenizer_bin(tmp_path):
    from babyllama.testing import small_tokenizer

    small_tokenizer(CFG.vocab_size).save(tmp_path / "tokenizer.bin")
    return tmp_path / "tokenizer.bin"


# ---------------------------------------------------------------------------------------------
# babyllama export --to gguf


@pytest.mark.parametrize("out_type", ["F32", "F16", "Q8_0"])
def test_export_to_gguf_round_trips(tmp_path, weights, out_type):
    write_checkpoint(tmp_path / "m.bin", CFG, weights, version=1)
    tok = _tokenizer_bin(tmp_path)
    assert cli_main(["export", str(tmp_path / "m.bin"), str(tmp_path / "m.gguf"), "--to", "gguf",
                     "--gguf-type", out_type]) == 0
    back = load_for_inference(tmp_path / "m.gguf")
    assert back.config == CFG and back.tokenizer.encode("the cat and the hat") == load_tokenizer(tok, 300).encode(
        "the cat and the hat")
    ref = Engine.from_checkpoint(load_checkpoint(tmp_path / "m.bin")).logits(PROMPT)
    got = Engine(back.config, back.weights).logits(PROMPT)
    if out_type == "F32":
        np.testing.assert_array_equal(got, ref)
    else:
        assert np.abs(got - ref).max() < 0.05 * np.abs(ref).max()


def test_llama3_scaling_travels_as_rope_freqs(tmp_path):
    hf_llama(tmp_path / "hf", seed=4, vocab_size=600, num_attention_heads=2, num_key_value_heads=1, rope_theta=500000.0,
             rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                           "original_max_position_embeddings": 16})
    byte_level_bpe(tmp_path / "hf")
    convert(tmp_path / "hf", tmp_path / "m.gguf", "gguf")
    back = load_for_inference(tmp_path / "m.gguf")
    src = load_for_inference(tmp_path / "hf")
    assert back.config == src.config  # theta, head_dim and the llama3 parameters, recovered from rope_freqs
    ids = [0, 5, 9, 200, 17, 3] * 8
    np.testing.assert_array_equal(Engine(back.config, back.weights).logits(ids),
                                  Engine(src.config, src.weights).logits(ids))
    for s in HARD:  # the byte-level BPE vocabulary, rebuilt from GGUF's tokens and merges
        assert back.tokenizer.encode(s) == src.tokenizer.encode(s), s
    assert back.tokenizer.chat_template.source == src.tokenizer.chat_template.source
    # head_dim 8: one frequency on the ramp, so the parameters are found by search; the factors agree
    cfg = ModelConfig(**{**src.config.to_dict(), "n_heads": 8, "n_kv_heads": 2, "head_dim": 0, "rope_scaling": None})
    from babyllama.formats.assemble import Stored
    from babyllama.formats.gguf import llama3_scaling
    want = llama3_frequency_factors(cfg, RopeScaling(8.0, 1.0, 4.0, 16))
    got = llama3_scaling(Stored("rope_freqs.weight", "F32", want.shape, want.view(np.uint8)), cfg, "x")
    np.testing.assert_allclose(llama3_frequency_factors(cfg, got), want, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# llama.cpp itself (llama-cpp-python, where installed; never a dependency)

LLAMA_CPP_PYTHON = os.environ.get("BABYLLAMA_LLAMA_CPP_PYTHON", "/tmp/lcpp/bin/python")
_LLAMA_CPP = r"""
import json, sys, llama_cpp
path, prompt, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
m = llama_cpp.Llama(model_path=path, verbose=False, n_ctx=128, n_threads=1, seed=0)
toks = m.tokenize(prompt.encode(), add_bos=True, special=True)
out = []
for t in m.generate(toks, top_k=1, temp=0.0, repeat_penalty=1.0):
    out.append(int(t))
    if len(out) >= n or t == m.token_eos():
        break
strings = json.loads(sys.stdin.read())
print(json.dumps({"prompt": toks, "out": out, "tok": [m.tokenize(s.encode(), add_bos=True, special=True) for s in strings]}))
"""


_QUANTIZE = r"""
import ctypes, sys, llama_cpp
p = llama_cpp.llama_model_quantize_default_params()
p.ftype = 7  # LLAMA_FTYPE_MOSTLY_Q8_0
sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(p)))
"""


def _python(code, *args, stdin=""):
    return subprocess.run([LLAMA_CPP_PYTHON, "-c", code, *map(str, args)], input=stdin, capture_output=True, text=True,
                          timeout=120)


def llama_cpp(path, prompt, n, strings=(), control=None):
    """llama.cpp's greedy tokens on `path` and its tokenization of `strings`. `control`: where to
    write llama.cpp's own Q8_0 quantization of the model, to tell a crash of llama.cpp's Q8_0 code
    (it crashes on its own file too: skip) from a problem of our file."""
    if not Path(LLAMA_CPP_PYTHON).is_file():
        pytest.skip(f"llama-cpp-python not found at {LLAMA_CPP_PYTHON} (set BABYLLAMA_LLAMA_CPP_PYTHON)")
    out = _python(_LLAMA_CPP, path, prompt, n, stdin=json.dumps(list(strings)))
    if out.returncode != 0:
        if "No module named 'llama_cpp'" in out.stderr:
            pytest.skip(f"{LLAMA_CPP_PYTHON} has no llama_cpp module")
        if out.returncode < 0 and control is not None:
            f32 = control.with_name("control_f32.gguf")
            convert(path, f32, "gguf")
            if _python(_QUANTIZE, f32, control).returncode == 0 and _python(_LLAMA_CPP, control, prompt, n).returncode < 0:
                pytest.skip(f"this llama.cpp build crashes (signal {-out.returncode}) on Q8_0 files, also on the one its "
                            "own llama_model_quantize writes from our F32 export")
        raise AssertionError(f"llama.cpp failed (exit {out.returncode}): {out.stderr[-500:]}")
    return json.loads(out.stdout)


@pytest.mark.parametrize("out_type", ["F32", "F16", "Q8_0"])
def test_llama_cpp_runs_our_export_to_the_same_greedy_tokens(tmp_path, out_type):
    convert(shared_file("stories260K.bin"), tmp_path / "s.gguf", "gguf", tokenizer=shared_file("tok512.bin"),
            gguf_type=out_type)
    theirs = llama_cpp(tmp_path / "s.gguf", "Once upon a time", 60, HARD, control=tmp_path / "control.gguf")
    model = Model.load(tmp_path / "s.gguf")
    assert model.encode("Once upon a time") == theirs["prompt"]
    ours = [p.id for p in model.pieces("Once upon a time", len(theirs["prompt"]) + 59, temperature=0.0)]
    assert ours[len(theirs["prompt"]) - 1:] == theirs["out"]
    assert [model.encode(s) for s in HARD] == theirs["tok"]


def test_llama_cpp_tokenizes_our_byte_level_bpe_export_the_same(tmp_path):
    hf_llama(tmp_path / "hf", seed=5, vocab_size=600)
    byte_level_bpe(tmp_path / "hf")
    convert(tmp_path / "hf", tmp_path / "m.gguf", "gguf")
    theirs = llama_cpp(tmp_path / "m.gguf", "Once upon a time", 1, HARD + ["<|eot_id|> in <|begin_of_text|>text"])
    tok = load_tokenizer(tmp_path / "m.gguf", 600)
    assert [tok.encode(s) for s in HARD + ["<|eot_id|> in <|begin_of_text|>text"]] == theirs["tok"]


# ---------------------------------------------------------------------------------------------
# broken and absurd files: one line each, nothing read or allocated past what the file holds


def kv(key: str, kind: int, payload: bytes) -> bytes:
    return struct.pack("<Q", len(key)) + key.encode() + struct.pack("<I", kind) + payload


def raw_gguf(entries: list[bytes], n_tensors: int = 0, tail: bytes = b"") -> bytes:
    return b"GGUF" + struct.pack("<IQQ", 3, n_tensors, len(entries)) + b"".join(entries) + tail


def one_line_error(path, *needles):
    with pytest.raises(CheckpointError) as e:
        load_for_inference(path)
    msg = str(e.value)
    assert "\n" not in msg, msg
    for n in needles:
        assert n in msg, msg


@pytest.mark.parametrize("data, needles", [
    (raw_gguf([kv("a", 9, struct.pack("<IQ", 0, 2 ** 40))]), ["a (1099511627776 items) needs 1099511627776 bytes"]),
    (raw_gguf([kv("a", 9, struct.pack("<IQ", 8, 2 ** 60))]), ["strings) needs"]),
    (raw_gguf([kv("a", 8, struct.pack("<Q", 2 ** 62))]), ["a needs 4611686018427387904 bytes"]),
    (b"GGUF" + struct.pack("<IQQ", 3, 2 ** 50, 0), ["claims 1125899906842624 tensors"]),
    (b"GGUF" + struct.pack("<IQQ", 1, 0, 0), ["GGUF version 1: expected 2 or 3"]),
    (b"GGUF\x03\x00", ["the fixed header", "truncated"]),
    (raw_gguf([kv("a", 9, struct.pack("<IQ", 9, 1) + struct.pack("<IQ", 0, 0))]), ["a: array of unsupported type 9"]),
    (raw_gguf([kv("a", 77, b"")]), ["unknown value type 77"]),
    (raw_gguf([kv("a", 4, b"\0" * 4), kv("a", 4, b"\0" * 4)]), ["appears twice"]),
    (raw_gguf([], 1, struct.pack("<Q", 1) + b"t" + struct.pack("<I", 9)), ["9 dimensions, expected 1 to 4"]),
])
def test_absurd_headers_are_refused_before_anything_is_read(tmp_path, data, needles):
    path = tmp_path / "bad.gguf"
    path.write_bytes(data)
    tracemalloc.start()
    try:
        one_line_error(path, *needles)
        assert tracemalloc.get_traced_memory()[1] < 4 << 20  # nothing sized by the claimed counts
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("md, drop, extra, needles", [
    ({"general.architecture": "gpt2"}, (), None, ["general.architecture: expected 'llama', found 'gpt2'"]),
    ({"llama.expert_count": 8}, (), None, ["llama.expert_count is 8"]),
    ({"llama.rope.scaling.type": "yarn"}, (), None, ["llama.rope.scaling.type is 'yarn'"]),
    ({"llama.attention.sliding_window": 16}, (), None, ["attention.sliding_window: expected none or at least"]),
    ({"llama.embedding_length": None}, (), None, ["missing metadata 'llama.embedding_length'"]),
    ({"llama.embedding_length": "64"}, (), None, ["llama.embedding_length: expected an integer, found '64'"]),
    ({"llama.context_length": 2 ** 31}, (), None, ["context_length: expected 1 to 16777216"]),
    ({"llama.block_count": 2 ** 32 - 1}, (), None, ["the config's 4294967295 layers need 38654705658 tensors"]),
    ({"llama.feed_forward_length": 256}, (), None, ["expected shape (256, 64) from the config, found (128, 64)"]),
    ({"llama.rope.dimension_count": 8}, (), None, ["rope.dimension_count: expected the head size 16"]),
    ({}, ("blk.1.ffn_up.weight",), None, ["missing tensors: expected blk.1.ffn_up.weight"]),
    ({}, (), {"blk.0.attn_q.bias": np.zeros(64, np.float32)}, ["blk.0.attn_q.bias: biases are not part"]),
    ({}, (), {"blk.0.attn_sinks.weight": np.zeros(4, np.float32)}, ["unexpected tensor blk.0.attn_sinks.weight"]),
    ({}, (), {"rope_freqs.weight": np.array([3] + [1] * 7, np.float32)}, ["rope_freqs.weight: expected llama3"]),
])
def test_files_babyllama_cannot_run_name_the_field(tmp_path, weights, md, drop, extra, needles):
    one_line_error(write_with_gguf_package(tmp_path / "e.gguf", CFG, weights, md=md, drop=drop, extra=extra), *needles)


def test_truncated_and_foreign_files(tmp_path, weights, capsys):
    good = write_with_gguf_package(tmp_path / "g.gguf", CFG, weights).read_bytes()
    (tmp_path / "cut.gguf").write_bytes(good[:-1000])
    one_line_error(tmp_path / "cut.gguf", "lie past the end of the file", "truncated")
    (tmp_path / "head.gguf").write_bytes(good[:300])
    one_line_error(tmp_path / "head.gguf", "invalid GGUF header at byte")
    data = bytearray(good)
    at = good.index(b"blk.0.attn_q.weight") + len("blk.0.attn_q.weight") + 4 + 16
    data[at : at + 4] = struct.pack("<I", 99)  # the tensor's ggml type
    (tmp_path / "type.gguf").write_bytes(bytes(data))
    one_line_error(tmp_path / "type.gguf", "blk.0.attn_q.weight: unknown ggml type 99")
    (tmp_path / "empty.gguf").write_bytes(b"")
    with pytest.raises(CheckpointError, match="is empty"):
        load_checkpoint(tmp_path / "empty.gguf")
    assert cli_main(["run", str(tmp_path / "cut.gguf")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("babyllama run: error: ") and err.count("\n") == 1
