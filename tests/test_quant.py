"""Quantized models: the v2 (int8, llama2.c Q8_0) and v3 (int4) formats, the engine, quality, bad files."""

import json
import struct
import subprocess
import sys

import numpy as np
import pytest
from conftest import cpu_vendor, random_weights, shared_file, shared_fixture

from babyllama.arch.llama import Weights
from babyllama.formats.llama2c import (
    load_checkpoint,
    write_checkpoint,
    write_quantized_checkpoint,
)
from babyllama.config import ModelConfig
from babyllama.engine import Engine
from babyllama.simd.ofast import EXACT_OFAST
from babyllama.errors import CheckpointError
from babyllama.quant import QuantWeights, choose_group_size, dequantize, quantize
from babyllama.reference import ReferenceEngine
from babyllama.convert import quantize_file

CLI = [sys.executable, "-m", "babyllama"]


def _cli(*args):
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True)


# ---------------------------------------------------------------------------------------------
# the math


@pytest.mark.parametrize("bits, gs", [(8, 4), (8, 64), (4, 4), (4, 32)])
def test_round_trip_error_is_at_most_half_a_step(bits, gs):
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((16, 128)) * rng.random((16, 1)) * 3).astype(np.float32)
    w[0, :gs] = 0  # an all-zero group must come back as zeros, not NaN
    values, scales = quantize(w, gs, bits)
    assert values.nbytes == w.size * bits // 8 and scales.shape == (w.size // gs,)
    back = dequantize(values, scales, gs, bits).reshape(w.shape)
    step = np.repeat(scales, gs).reshape(w.shape)  # one quantization step per weight
    assert np.all(np.abs(back - w) <= step / 2 * (1 + 1e-5))
    np.testing.assert_array_equal(back[0, :gs], 0)
    qmax = 127 if bits == 8 else 7
    np.testing.assert_allclose(scales, np.abs(w).reshape(-1, gs).max(1) / qmax, rtol=1e-6)


def test_int4_nibble_layout():
    # group of 4: byte j = value j (low nibble) | value j + 2 (high nibble), each stored as q + 8
    w = np.array([7, -7, 0, 7], np.float32)  # scale 1
    packed, scales = quantize(w, 4, 4)
    assert scales[0] == 1.0
    assert list(packed) == [(7 + 8) | ((0 + 8) << 4), (-7 + 8) | ((7 + 8) << 4)]


def _shape(dim, hidden):
    return ModelConfig(dim=dim, hidden_dim=hidden, n_layers=1, n_heads=dim // 2, n_kv_heads=dim // 2, vocab_size=8,
                       seq_len=8)


@pytest.mark.parametrize("dim, hidden, bits, expected", [
    (768, 2048, 8, 64), (288, 768, 8, 48), (512, 1376, 8, 32), (64, 172, 8, 4), (64, 172, 4, 4),
    (36, 60, 4, 12), (30, 45, 8, 15),
])
def test_group_size_is_the_largest_that_divides_dim_and_hidden(dim, hidden, bits, expected):
    cfg = _shape(dim, hidden)
    assert choose_group_size(cfg, bits) == expected


@pytest.mark.parametrize("dim, hidden, bits", [(66, 70, 8), (30, 45, 4)])
def test_group_size_refused_when_none_fits(tmp_path, dim, hidden, bits):
    cfg = _shape(dim, hidden)
    with pytest.raises(CheckpointError, match=rf"no group size in \[4, 64\] divides both dim \({dim}\) and hidden_dim"):
        choose_group_size(cfg, bits)
    src = tmp_path / "m.bin"
    write_checkpoint(src, cfg, Weights.from_dict(cfg, random_weights(cfg)))
    out = _cli("quantize", src, tmp_path / "q.bin", "--bits", bits)
    assert out.returncode == 1 and "no group size" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "q.bin").exists()


# ---------------------------------------------------------------------------------------------
# the engine against babyllama/reference.py doing runq's arithmetic


def reference_logits(cfg, w: dict, tokens, gs: int, bits: int) -> np.ndarray:
    """babyllama/reference.py in float64 over the same quantized weights: dequantized weights
    times activations quantized per group like runq."""
    qw = QuantWeights.from_float(Weights.from_dict(cfg, w), gs, bits)
    return ReferenceEngine(cfg, qw, np.float64).logits(tokens)


CONFIGS = [
    (ModelConfig(dim=64, hidden_dim=128, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, seq_len=16), 64),
    (ModelConfig(dim=48, hidden_dim=96, n_layers=2, n_heads=4, n_kv_heads=4, vocab_size=50, seq_len=16,
                 shared_classifier=False), 16),
    (ModelConfig(dim=64, hidden_dim=172, n_layers=1, n_heads=8, n_kv_heads=4, vocab_size=40, seq_len=16), 4),
]


@pytest.mark.parametrize("cfg, gs", CONFIGS, ids=["gs64-gqa", "gs16-untied", "gs4-260K-like"])
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("parallel", [False, True], ids=["serial", "parallel"])
def test_engine_matches_numpy_reference(tmp_path, cfg, gs, bits, parallel):
    w = random_weights(cfg, scale=0.2)
    path = tmp_path / "q.bin"
    assert write_quantized_checkpoint(path, cfg, Weights.from_dict(cfg, w), {8: 2, 4: 3}[bits], gs) == gs
    ck = load_checkpoint(path)
    assert (ck.version, ck.group_size, ck.config) == ({8: 2, 4: 3}[bits], gs, cfg)
    engine = Engine.from_checkpoint(ck, parallel)
    tokens = [1, 5, 9, 2, 33, 7, 7, 30]
    got = engine.logits(tokens)
    ref = reference_logits(cfg, w, tokens, gs, bits)
    # float32 vs float64 rounding can move an activation across a rounding boundary now and
    # then: compare with a tolerance a wrong scale, group or nibble would blow far past
    assert np.abs(got - ref).max() < 2e-2 * np.abs(ref).max()
    # the file and the in-memory quantization are the same model
    mem = Engine(cfg, QuantWeights.from_float(Weights.from_dict(cfg, w), gs, bits), parallel)
    np.testing.assert_array_equal(mem.logits(tokens), got)
    # prefill and token-by-token decoding fill the cache identically
    state = engine.new_state()
    engine.forward(tokens[:5], 0, state)
    for p, t in enumerate(tokens[5:], start=5):
        last = engine.step(t, p, state)
    np.testing.assert_array_equal(last, got[-1])


def test_quantized_copy_generates_the_same_tokens_as_its_reread(tmp_path):
    """quantize -> file -> reread samples exactly what quantizing the weights in memory does."""
    from babyllama.generation import generate_ids
    from babyllama.sampling import Sampler

    cfg = CONFIGS[0][0]
    src = tmp_path / "m.bin"
    weights = Weights.from_dict(cfg, random_weights(cfg, scale=0.3))
    write_checkpoint(src, cfg, weights, version=1)
    for bits in (8, 4):
        dst = tmp_path / f"q{bits}.bin"
        assert quantize_file(src, dst, bits) == 64
        engines = [Engine.from_checkpoint(load_checkpoint(dst)),
                   Engine(cfg, QuantWeights.from_float(weights, 64, bits))]
        runs = [list(generate_ids(e, e.new_state(), [1, 3], 16, Sampler(cfg.vocab_size, 1.0, 0.9, 42))) for e in engines]
        assert runs[0] == runs[1] and len(set(runs[0])) > 3


# ---------------------------------------------------------------------------------------------
# llama2.c's files and runq's output


def test_quantize_is_byte_identical_to_llama2c_export(tmp_path):
    out = _cli("quantize", shared_file("stories260K.bin"), tmp_path / "q.bin")
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "q.bin").read_bytes() == shared_file("stories260K_q80_gs4.bin").read_bytes()


def _runq_cases():
    return json.loads(shared_fixture("generate_stories260K_q80.json").read_text())["cases"]


def _run_case(args, model):
    flags = ["-z", shared_file("tok512.bin"), "-t", args["temperature"], "-p", args["topp"], "-s", args["seed"],
             "-n", args["steps"]]
    if args["prompt"] is not None:
        flags += ["-i", args["prompt"]]
    out = _cli("run", model, *flags, "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)["tokens"][1:]


@pytest.mark.skipif(not EXACT_OFAST, reason="runq's fixture was recorded by a gcc -Ofast -march=native build on an "
                    "AVX-512 CPU: its rsqrtss/rcp14ps/libmvec rounding needs such a CPU and glibc's libmvec")
@pytest.mark.skipif(cpu_vendor() != "AuthenticAMD", reason=f"runq's fixture was recorded on an AMD (Zen 4) CPU; the "
                    "approximate rsqrtss/rcpps results its -Ofast build uses are vendor-specific, so on this "
                    f"{cpu_vendor() or 'unknown'} CPU int8 tokens drift from the AMD run (runq.c built here with "
                    "-mtune=znver3 gives exactly babyllama's tokens)")
@pytest.mark.parametrize("case", range(3))
def test_runq_fixture_tokens(case):
    c = _runq_cases()[case]
    got = _run_case(c["args"], shared_file("stories260K_q80_gs4.bin"))
    assert got == c["generated_ids"]


def test_stories260k_perplexity_int8_within_1pct_int4_within_10pct(tmp_path):
    from babyllama.evaluate import perplexity
    from babyllama.api import Model
    from babyllama.tokenizers.llama2c import Llama2cTokenizer as Tokenizer

    text = shared_file("tinystories_excerpt.txt").read_text(encoding="utf-8")[:20000]
    tok = Tokenizer.load(shared_file("tok512.bin"), 512)
    src = shared_file("stories260K.bin")
    ppl = {32: perplexity(Model(Engine.from_checkpoint(load_checkpoint(src)), tok), text, 3000)[0]}
    for bits in (8, 4):
        quantize_file(src, tmp_path / f"q{bits}.bin", bits)
        engine = Engine.from_checkpoint(load_checkpoint(tmp_path / f"q{bits}.bin"))
        ppl[bits] = perplexity(Model(engine, tok), text, 3000)[0]
    assert 3 < ppl[32] < 8, ppl
    assert abs(ppl[8] / ppl[32] - 1) < 0.01, ppl
    assert abs(ppl[4] / ppl[32] - 1) < 0.10, ppl


# ---------------------------------------------------------------------------------------------
# bad files


def _q80_copy(tmp_path):
    data = bytearray(shared_file("stories260K_q80_gs4.bin").read_bytes())
    return data, tmp_path / "bad.bin"


@pytest.mark.parametrize("gs, message", [
    (64, r"group size 64 must divide both dim \(64\) and hidden_dim \(172\)"),
    (0, r"group size must be a positive integer, got 0"),
    (-4, r"group size must be a positive integer, got -4"),
    (3, r"group size 3 must divide both dim"),
])
def test_corrupt_group_size(tmp_path, gs, message):
    data, path = _q80_copy(tmp_path)
    struct.pack_into("<i", data, 37, gs)
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="invalid v2 header: " + message):
        load_checkpoint(path)
    out = _cli("run", path, "-z", shared_file("tok512.bin"), "-n", 4)
    assert out.returncode == 1 and "group size" in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_truncated_scale_block(tmp_path):
    data, path = _q80_copy(tmp_path)
    path.write_bytes(bytes(data[:-10]))  # the last tensor's scales lose 10 bytes
    with pytest.raises(CheckpointError, match=r"file truncated: the v2 header implies 521728 bytes, found 521718"):
        load_checkpoint(path)


def test_one_engine_runs_every_format(tmp_path, tiny_config):
    """The weights' type picks the kernels: fp32 for v0/v1, int8/int4 for v2/v3."""
    weights = Weights.from_dict(tiny_config, random_weights(tiny_config))
    kinds = {}
    for version in (0, 1, 2, 3):
        path = tmp_path / f"m{version}.bin"
        if version < 2:
            write_checkpoint(path, tiny_config, weights, version=version)
        else:
            write_quantized_checkpoint(path, tiny_config, weights, version, 32)
        engine = Engine.from_checkpoint(load_checkpoint(path))
        kinds[version] = (engine.quantized, engine.bits)
    assert kinds == {0: (False, 32), 1: (False, 32), 2: (True, 8), 3: (True, 4)}
    with pytest.raises(CheckpointError, match="expected fp32 Weights or QuantWeights"):
        Engine(tiny_config, {"wq": None})


def test_quantize_refuses_quantized_input_and_bad_group_size(tmp_path):
    out = _cli("quantize", shared_file("stories260K_q80_gs4.bin"), tmp_path / "x.bin")
    assert out.returncode == 1 and "already a quantized v2 model" in out.stderr
    out = _cli("quantize", shared_file("stories260K.bin"), tmp_path / "x.bin", "--bits", 4, "--group-size", 64)
    assert out.returncode == 1 and "group size 64 must divide both dim (64) and hidden_dim (172)" in out.stderr
    assert not (tmp_path / "x.bin").exists()


def test_quantize_says_when_it_will_not_pay(tmp_path):
    """A model whose fp32 weights stay in the CPU caches decodes slower quantized (#9.11): the
    command says so; one that streams from memory gets no note."""
    from babyllama.cli.quantize import CACHE_RESIDENT_BYTES, wont_pay
    from babyllama.testing import SHAPES

    small = ModelConfig(dim=64, hidden_dim=192, n_layers=2, n_heads=8, n_kv_heads=4, vocab_size=128, seq_len=32)
    write_checkpoint(tmp_path / "m.bin", small, Weights.from_dict(small, random_weights(small)), version=0)
    out = _cli("quantize", tmp_path / "m.bin", tmp_path / "q.bin")
    assert out.returncode == 0, out.stderr
    assert "note: this model's fp32 weights (0.4 MB) fit in the CPU caches" in out.stderr
    assert 4 * SHAPES["15M"].n_params > CACHE_RESIDENT_BYTES and wont_pay(SHAPES["15M"]) is None
