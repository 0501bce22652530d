"""Shared test fixtures.

Real llama2.c files live outside the repository (../shared/data, or $BABYLLAMA_TEST_DATA);
tests that need them skip with a reason when they are absent. Everything else builds tiny
random models so the core suite runs anywhere.
"""

import ctypes
import ctypes.util
import os
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent


def _shared_root() -> Path | None:
    env = os.environ.get("BABYLLAMA_TEST_DATA")
    candidates = [Path(env)] if env else []
    candidates.append(ROOT.parent / "shared" / "data")
    for c in candidates:
        if c.is_dir():
            return c
    return None


SHARED_DATA = _shared_root()
SHARED_FIXTURES = SHARED_DATA.parent / "fixtures" if SHARED_DATA else None


def shared_file(name: str) -> Path:
    """Path of a file in ../shared/data (or $BABYLLAMA_TEST_DATA); skips the test when absent."""
    if SHARED_DATA is None or not (SHARED_DATA / name).exists():
        pytest.skip(f"shared test data {name!r} not found (set BABYLLAMA_TEST_DATA or provide ../shared/data)")
    return SHARED_DATA / name


def shared_fixture(name: str) -> Path:
    """Path of a file in ../shared/fixtures; skips the test when absent."""
    if SHARED_FIXTURES is None or not (SHARED_FIXTURES / name).exists():
        pytest.skip(f"shared fixture {name!r} not found (provide ../shared/fixtures)")
    return SHARED_FIXTURES / name


def random_weights(cfg, seed: int = 0, scale: float = 0.05) -> dict:
    """A dict of random fp32 tensors of the right shapes for `cfg` (norm weights near 1)."""
    from babyllama.testing import random_weights as make

    return make(cfg, seed, scale)


@pytest.fixture(scope="session")
def excerpt_shards(tmp_path_factory):
    """The TinyStories excerpt, tokenized with the 512-token vocabulary into train/val shards
    (shared by the trainers' tests; skips without ../shared/data)."""
    from babyllama.data import pretokenize

    out = tmp_path_factory.mktemp("tok512")
    pretokenize(shared_file("tok512.model"), shared_file("tinystories_excerpt.txt"), out, val_fraction=0.05, workers=1)
    return out


@pytest.fixture
def tiny_config():
    from babyllama.config import ModelConfig

    return ModelConfig(dim=32, hidden_dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, seq_len=32)


def tiny_tokenizer_file(path, vocab_size: int = 300):
    """Write a llama2.c tokenizer.bin: <unk> <s> </s>, the 256 byte tokens, then short pieces."""
    from babyllama.testing import small_tokenizer

    small_tokenizer(vocab_size).save(path)
    return path


@pytest.fixture
def tiny_model(tmp_path):
    """A random v0 model (vocab 300, seq_len 64) with tokenizer.bin beside it."""
    from babyllama.arch.llama import Weights
    from babyllama.config import ModelConfig
    from babyllama.formats.llama2c import write_checkpoint

    cfg = ModelConfig(dim=32, hidden_dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, seq_len=64)
    write_checkpoint(tmp_path / "model.bin", cfg, Weights.from_dict(cfg, random_weights(cfg, scale=0.3)))
    tiny_tokenizer_file(tmp_path / "tokenizer.bin", cfg.vocab_size)
    return tmp_path / "model.bin"


def cpu_vendor() -> str:
    """The CPU's vendor string (GenuineIntel, AuthenticAMD, ...) from /proc/cpuinfo, or ''."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def libm_expf():
    """The C library's float32 expf through ctypes (what llama2.c's scalar expf calls are)."""
    name = ctypes.util.find_library("m")
    if name is None:
        pytest.skip("C math library not found (needed to model llama2.c's expf)")
    expf = ctypes.CDLL(name).expf
    expf.restype, expf.argtypes = ctypes.c_float, [ctypes.c_float]
    return expf
