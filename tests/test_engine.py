"""The fp32 engine against an independent NumPy reference of the Llama forward pass."""

import numpy as np
import pytest
from conftest import random_weights, shared_file

from babyllama.checkpoint import Weights, load_checkpoint, write_checkpoint
from babyllama.config import ModelConfig
from babyllama.engine import Engine
from babyllama.errors import GenerationError


def reference_logits(cfg: ModelConfig, w: dict, tokens) -> np.ndarray:
    """A plain float64 NumPy transformer over the whole sequence (causal mask, no KV cache)."""
    T, hs = len(tokens), cfg.head_size
    x = w["token_embedding"][tokens].astype(np.float64)  # (T, dim)
    pos = np.arange(T)[:, None]
    freq = 1.0 / cfg.rope_theta ** (np.arange(0, hs, 2) / hs)
    cos, sin = np.cos(pos * freq), np.sin(pos * freq)  # (T, hs/2)

    def rms(v, g):
        return g * v / np.sqrt((v * v).mean(-1, keepdims=True) + cfg.norm_eps)

    def rope(v, n):  # v: (T, n*hs), interleaved pairs
        v = v.reshape(T, n, hs // 2, 2)
        a, b = v[..., 0], v[..., 1]
        c, s = cos[:, None, :], sin[:, None, :]
        return np.stack([a * c - b * s, a * s + b * c], -1).reshape(T, n * hs)

    mask = np.triu(np.full((T, T), -np.inf), 1)
    for l in range(cfg.n_layers):
        h = rms(x, w["rms_att"][l])
        q = rope(h @ w["wq"][l].T, cfg.n_heads).reshape(T, cfg.n_heads, hs)
        k = rope(h @ w["wk"][l].T, cfg.n_kv_heads).reshape(T, cfg.n_kv_heads, hs)
        v = (h @ w["wv"][l].T).reshape(T, cfg.n_kv_heads, hs)
        k = np.repeat(k, cfg.kv_mul, axis=1)
        v = np.repeat(v, cfg.kv_mul, axis=1)
        att = np.einsum("thd,shd->hts", q, k) / np.sqrt(hs) + mask
        att = np.exp(att - att.max(-1, keepdims=True))
        att /= att.sum(-1, keepdims=True)
        o = np.einsum("hts,shd->thd", att, v).reshape(T, cfg.dim)
        x = x + o @ w["wo"][l].T
        h = rms(x, w["rms_ffn"][l])
        a, b = h @ w["w1"][l].T, h @ w["w3"][l].T
        x = x + ((a / (1 + np.exp(-a))) * b) @ w["w2"][l].T
    wcls = w["token_embedding"] if cfg.shared_classifier else w["wcls"]
    return rms(x, w["rms_final"]) @ wcls.T


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
from babyllama.engine import compiles_on_first_call
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
from babyllama.engine import jitcache
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
    from babyllama.engine import jitcache

    names = {f.py_func.__name__ for f in jitcache.cached_functions()}
    assert {"forward", "qforward", "rope_table", "sample", "random_f32"} <= names
    # kernels are compiled into the forward that calls them, never loaded from disk on their own
    assert not names & {"matmul", "attention", "softmax", "qmatmul", "dot8", "sample_topp"}
    assert len(jitcache.sources_digest()) == 64

