"""babyllama/reference.py, the plain-NumPy teaching forward: it computes the engine's function."""

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import random_weights

from babyllama.arch.llama import Weights
from babyllama.config import ModelConfig
from babyllama.engine import Engine
from babyllama.generation import generate_ids
from babyllama.quant import QuantWeights
from babyllama.reference import ReferenceEngine, XorShift, generate, sample
from babyllama.sampling import Sampler, random_u32

CFG = ModelConfig(dim=48, hidden_dim=100, n_layers=2, n_heads=6, n_kv_heads=3, vocab_size=80, seq_len=40,
                  shared_classifier=False)


@pytest.mark.parametrize("bits", [32, 8, 4])
def test_float32_reference_is_the_engine_within_rounding(bits):
    w = Weights.from_dict(CFG, random_weights(CFG, seed=1, scale=0.2))
    weights = w if bits == 32 else QuantWeights.from_float(w, 4, bits)
    tokens = np.random.default_rng(2).integers(0, CFG.vocab_size, 30)
    got = ReferenceEngine(CFG, weights).logits(tokens)
    want = Engine(CFG, weights).logits(tokens)
    assert got.dtype == np.float32
    # float32 throughout, another summation order: ~1e-6 relative, more where int8 rounding flips
    tol = 1e-4 if bits == 32 else 2e-2
    np.testing.assert_allclose(got, want, rtol=0, atol=tol * np.abs(want).max())


def test_xorshift_is_run_c_rng():
    rng, state = XorShift(1234), np.array([1234], np.uint64)
    assert [rng.u32() for _ in range(50)] == [int(random_u32(state)) for _ in range(50)]


def test_sampler_picks_what_the_engine_sampler_picks():
    """Same coin, same nucleus rule: the pick agrees except where a probability differs in its
    last bit across a boundary (the compiled softmax sums in another order)."""
    rng = np.random.default_rng(3)
    agree = 0
    for seed in range(1, 201):
        logits = (rng.standard_normal(64) * 3).astype(np.float32)
        topp = (0.0, 0.5, 0.9)[seed % 3]
        ours = sample(logits.copy(), 0.8, topp, XorShift(seed))
        theirs = Sampler(64, temperature=0.8, topp=topp, seed=seed)(logits.copy())
        agree += ours == theirs
    assert agree >= 198, agree
    logits = rng.standard_normal(64).astype(np.float32)
    assert sample(logits, 0.0, 0.9, XorShift(1)) == int(np.argmax(logits))


def test_greedy_generation_matches_the_engine():
    w = Weights.from_dict(CFG, random_weights(CFG, seed=4, scale=0.3))
    prompt = [1, 7, 9]
    engine = Engine(CFG, w)
    want = list(generate_ids(engine, engine.new_state(), prompt, 30, lambda lg: int(np.argmax(lg))))
    assert generate(ReferenceEngine(CFG, w), prompt, 30, temperature=0.0) == want


def test_run_reference_flag_gives_the_engine_tokens(tiny_model):
    def run(*flags):
        out = subprocess.run([sys.executable, "-m", "babyllama", "run", str(tiny_model), "-t", "0", "-n", "24",
                              "-i", "the cat", "--json", *flags], capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)["tokens"]

    assert run("--reference") == run()
