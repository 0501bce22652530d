"""The engine against babyllama/reference.py (plain NumPy, float64), and its run state (pages, slots)."""

import numpy as np
import pytest
from conftest import random_weights, shared_file

from babyllama.arch.llama import Weights
from babyllama.formats.llama2c import load_checkpoint, write_checkpoint
from babyllama.config import ModelConfig
from babyllama.engine import Engine
from babyllama.errors import GenerationError
from babyllama.reference import ReferenceEngine


def reference_logits(cfg: ModelConfig, w: dict, tokens) -> np.ndarray:
    """babyllama/reference.py's forward in float64: the independent model of the same function."""
    return ReferenceEngine(cfg, Weights.from_dict(cfg, w), np.float64).logits(tokens)


CONFIGS = [
    ModelConfig(dim=32, hidden_dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, seq_len=32),
    ModelConfig(dim=48, hidden_dim=100, n_layers=3, n_heads=6, n_kv_heads=6, vocab_size=80, seq_len=24,
                shared_classifier=False),
    ModelConfig(dim=64, hidden_dim=172, n_layers=1, n_heads=8, n_kv_heads=1, vocab_size=50, seq_len=16),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=["gqa", "untied-mha", "mqa"])
@pytest.mark.parametrize("parallel", [False, True], ids=["serial", "parallel"])
def test_engine_matches_reference(cfg, parallel):
    w = random_weights(cfg, seed=1, scale=0.2)
    tokens = np.random.default_rng(2).integers(0, cfg.vocab_size, cfg.seq_len)
    engine = Engine(cfg, Weights.from_dict(cfg, w), parallel=parallel)
    got = engine.logits(tokens)
    want = reference_logits(cfg, w, tokens)
    assert got.shape == (cfg.seq_len, cfg.vocab_size)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-4 * np.abs(want).max())


@pytest.mark.parametrize("cfg", [
    *CONFIGS,  # and odd sizes: rows and columns past multiples of 8, heads of 6 and 12 dims
    ModelConfig(dim=36, hidden_dim=100, n_layers=2, n_heads=6, n_kv_heads=3, vocab_size=61, seq_len=40),
    ModelConfig(dim=60, hidden_dim=84, n_layers=1, n_heads=5, n_kv_heads=5, vocab_size=75, seq_len=20),
], ids=["gqa", "untied-mha", "mqa", "hs6", "hs12"])
def test_threads_and_row_blocks_give_the_same_bits(cfg):
    """Serial or threaded, rows one by one or eight side by side: each logit is the same sum in
    the same order, so the bits agree (the engine picks by model size; all four must be exact)."""
    w = Weights.from_dict(cfg, random_weights(cfg, seed=3, scale=0.3))
    tokens = np.random.default_rng(4).integers(0, cfg.vocab_size, cfg.seq_len)
    runs = {(p, b): Engine(cfg, w, parallel=p, blocked=b).logits(tokens) for p in (False, True) for b in (False, True)}
    want = runs[False, False]
    assert np.isfinite(want).all()
    for key, got in runs.items():
        assert got.view(np.int32).tolist() == want.view(np.int32).tolist(), key


def test_prefill_equals_token_by_token(tiny_config):
    cfg = tiny_config
    engine = Engine(cfg, Weights.from_dict(cfg, random_weights(cfg, scale=0.3)))
    tokens = list(range(3, 3 + 12))
    state = engine.new_state()
    for pos, t in enumerate(tokens):
        last = engine.forward([t], pos, state).copy()
    prefilled = engine.forward(tokens, 0, engine.new_state())
    np.testing.assert_array_equal(prefilled, last)
    assert state.pos == len(tokens)


def test_forward_refuses_positions_beyond_context(tiny_config):
    engine = Engine(tiny_config, Weights.from_dict(tiny_config, random_weights(tiny_config)))
    state = engine.new_state()
    with pytest.raises(GenerationError, match="context of 32"):
        engine.forward([1, 2], tiny_config.seq_len - 1, state)
    with pytest.raises(GenerationError, match=r"\[0, 64\)"):
        engine.forward([64], 0, state)


def test_v0_and_v1_give_identical_logits(tmp_path, tiny_config):
    cfg = tiny_config
    w = random_weights(cfg, scale=0.3)
    for version in (0, 1):
        write_checkpoint(tmp_path / f"m{version}.bin", cfg, Weights.from_dict(cfg, w), version=version)
    tokens = [1, 5, 9, 33, 2, 7]
    l0 = Engine.from_checkpoint(load_checkpoint(tmp_path / "m0.bin")).logits(tokens)
    l1 = Engine.from_checkpoint(load_checkpoint(tmp_path / "m1.bin")).logits(tokens)
    np.testing.assert_array_equal(l0, l1)


def test_stories260k_matches_reference():
    ck = load_checkpoint(shared_file("stories260K.bin"))
    w = {name: np.asarray(a) for name, a in ck.weights.items()}
    tokens = [1, 403, 407, 261, 378, 432, 383, 286, 261, 376]
    got = Engine.from_checkpoint(ck).logits(tokens)
    want = reference_logits(ck.config, w, tokens)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-3)


_CACHED_MODULE = """
from numba import njit

@njit(cache=True)
def add_one(x):
    return x + 1
"""

_PROBE = """
import sys
sys.path.insert(0, sys.argv[1])
import cached_mod
from babyllama.simd.jitcache import compiles_on_first_call
print(compiles_on_first_call(cached_mod.add_one))
"""


def test_compiles_on_first_call_sees_the_disk_cache(tmp_path):
    """`babyllama run` warns before a first-ever compile; the check must see Numba's cache."""
    import subprocess
    import sys

    (tmp_path / "cached_mod.py").write_text(_CACHED_MODULE)

    def probe(code):
        out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        return out.stdout.split()

    assert probe(_PROBE) == ["True"]  # nothing cached yet
    assert probe(_PROBE + "cached_mod.add_one(1)\nprint(compiles_on_first_call(cached_mod.add_one))") == ["True", "False"]
    assert probe(_PROBE) == ["False"]  # a new process finds the cache the last one wrote


_SYNC_PROBE = """
import sys
sys.path.insert(0, sys.argv[1])
import cached_mod
from babyllama.simd import jitcache
cached_mod.add_one(1)  # compiled (or loaded) and cached
print(jitcache.sync([cached_mod.add_one], sys.argv[2]))
"""


def test_jitcache_drops_code_compiled_from_other_sources(tmp_path):
    """Numba trusts a cache whose own source file is unchanged, even when a kernel it inlined
    changed; babyllama keeps a digest of all its sources beside the cache and drops on change."""
    import subprocess
    import sys

    (tmp_path / "cached_mod.py").write_text(_CACHED_MODULE)

    def probe(code, *args):
        out = subprocess.run([sys.executable, "-c", code, str(tmp_path), *args], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        return out.stdout.split()

    def cold_after(digest):  # sync in one process, then does a new one find code to load?
        dropped = probe(_SYNC_PROBE, digest) == ["True"]
        assert probe(_PROBE) == [str(dropped)]
        return dropped

    assert cold_after("aaa")  # no digest stored yet: dropped, so the next run compiles
    assert not cold_after("aaa")  # same sources: the cache is kept
    assert cold_after("bbb")  # sources changed: dropped again
    assert (tmp_path / "__pycache__" / "babyllama-sources.sha256").read_text().strip() == "bbb"


def test_jitcache_knows_every_cached_function():
    from babyllama.simd import jitcache

    names = {f.py_func.__name__ for f in jitcache.cached_functions()}
    assert {"forward", "rope_table", "sample", "random_f32"} <= names
    # kernels are compiled into the forward that calls them, never loaded from disk on their own
    assert not names & {"matmul", "attention", "softmax", "qmatmul", "dot8", "sample_topp", "embed", "linear"}
    assert len(jitcache.sources_digest()) == 64



def test_head_dim_rope_theta_and_llama3_scaling_follow_the_config():
    """A head_dim other than dim / n_heads, Llama 3's theta and eps, and llama3 rope scaling: the
    engine computes the same function as the reference."""
    from babyllama.config import RopeScaling

    cfg = ModelConfig(dim=48, hidden_dim=96, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=70, seq_len=40,
                      head_dim=16, rope_theta=500000.0, norm_eps=1e-6,
                      rope_scaling=RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                               original_max_position_embeddings=8))
    assert cfg.q_dim == 64 != cfg.dim
    w = random_weights(cfg, seed=5, scale=0.2)
    tokens = np.random.default_rng(6).integers(0, cfg.vocab_size, cfg.seq_len)
    got = Engine(cfg, Weights.from_dict(cfg, w)).logits(tokens)
    want = reference_logits(cfg, w, tokens)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-4 * np.abs(want).max())
    # and the settings matter: the default theta gives other logits
    plain = ModelConfig(**{**cfg.to_dict(), "rope_theta": 10000.0, "rope_scaling": None})
    assert np.abs(reference_logits(plain, w, tokens) - want).max() > 1e-2


def test_slots_share_a_page_pool_and_give_each_sequence_its_own_bits(tiny_config):
    """Three sequences interleaved in one state with a pool smaller than their contexts: each gets
    the logits it gets alone (batch invariance through the paged cache), pages come and go."""
    cfg = tiny_config
    engine = Engine(cfg, Weights.from_dict(cfg, random_weights(cfg, seed=8, scale=0.3)))
    rng = np.random.default_rng(9)
    seqs = [rng.integers(0, cfg.vocab_size, n).tolist() for n in (20, 7, 31)]
    alone = [engine.logits(s) for s in seqs]
    state = engine.new_state(n_slots=3, n_pages=4)  # 4 pages of 16 < 3 full contexts of 32
    assert state.free_pages == 4
    got = [[] for _ in seqs]
    for pos in range(max(map(len, seqs))):
        for i, s in enumerate(seqs):
            if pos < len(s):
                state.reserve(i, pos + 1)
                got[i].append(engine.step(s[pos], pos, state, slot=i).copy())
        if pos == len(seqs[1]) - 1:
            state.release(1)  # a sequence leaves: its page goes back (slot 2 needs it at 16)
    for i in range(3):
        assert np.array_equal(np.stack(got[i]).view(np.int32), alone[i].view(np.int32)), i
    assert state.free_pages == 0  # slots 0 and 2 hold 2 pages each; slot 1's page went to slot 2
    with pytest.raises(GenerationError, match="KV cache is full"):
        state.reserve(1, 1)


def test_truncate_rolls_a_sequence_back(tiny_config):
    """After rewinding a slot, feeding other tokens gives what a fresh run of those tokens gives."""
    cfg = tiny_config
    engine = Engine(cfg, Weights.from_dict(cfg, random_weights(cfg, seed=10, scale=0.3)))
    state = engine.new_state()
    engine.forward([1, 5, 9, 11, 13, 17, 19, 23], 0, state)
    state.truncate(0, 3)
    assert state.pos == 3
    got = engine.forward([30, 31, 32], 3, state, all_logits=True)
    want = engine.logits([1, 5, 9, 30, 31, 32])[3:]
    assert np.array_equal(got.view(np.int32), want.view(np.int32))


def test_run_checks_rows_against_the_state(tiny_config):
    cfg = tiny_config
    engine = Engine(cfg, Weights.from_dict(cfg, random_weights(cfg)))
    state = engine.new_state(n_slots=2)
    with pytest.raises(GenerationError, match="slots must be in"):
        engine.run([1], [0], [2], [0], state)
    with pytest.raises(GenerationError, match="continue its 0 cached positions"):
        engine.run([1, 2], [1, 2], [0, 0], [1], state)
    with pytest.raises(GenerationError, match="ascending"):
        engine.run([1, 2], [0, 0], [0, 1], [1, 0], state)
    with pytest.raises(GenerationError, match="no pages reserved"):
        engine.run([1, 1], [0, 0], [0, 1], [0, 1], state)
    state.reserve(0, 1)
    state.reserve(1, 1)
    out = engine.run([1, 1], [0, 0], [0, 1], [0, 1], state)
    assert np.array_equal(out[0], out[1]) and out.shape == (2, cfg.vocab_size)
