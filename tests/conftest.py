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
    from babyllama.bench import random_weights as make

    return make(cfg, seed, scale)


@pytest.fixture
def tiny_config():
    from babyllama.config import ModelConfig

    return ModelConfig(dim=32, hidden_dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, seq_len=32)


def tiny_tokenizer_file(path, vocab_size: int = 300):
    """Write a llama2.c tokenizer.bin: <unk> <s> </s>, the 256 byte tokens, then short pieces."""
    from babyllama.tokenizer import Tokenizer

    pieces = [b"<unk>", b"<s>", b"</s>"] + [f"<0x{b:02X}>".encode() for b in range(256)]
    extra = [b" ", b"e", b"t", b"a", b"o", b" t", b"th", b" th", b"he", b" the", b"in", b"an", b" a", b"nd", b" and"]
    extra += [bytes([c]) for c in b"bcdfghijklmnpqrsuvwxyz.,!?'ABCDEFGHIJKLMNOPQRSTUVWXYZ" if bytes([c]) not in extra]
    pieces += extra[: vocab_size - len(pieces)]
    pieces += [f"<extra{i}>".encode() for i in range(vocab_size - len(pieces))]
    scores = np.array([0.0] * 259 + [-float(i) for i in range(vocab_size - 259)], np.float32)
    Tokenizer(pieces, scores).save(path)
    return path


@pytest.fixture
def tiny_model(tmp_path):
    """A random v0 model (vocab 300, seq_len 64) with tokenizer.bin beside it."""
    from babyllama.checkpoint import Weights, write_checkpoint
    from babyllama.config import ModelConfig

    cfg = ModelConfig(dim=32, hidden_dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, seq_len=64)
    write_checkpoint(tmp_path / "model.bin", cfg, Weights.from_dict(cfg, random_weights(cfg, scale=0.3)))
    tiny_tokenizer_file(tmp_path / "tokenizer.bin", cfg.vocab_size)
    return tmp_path / "model.bin"


def libm_expf():
    """The C library's float32 expf through ctypes (what llama2.c's scalar expf calls are)."""
    name = ctypes.util.find_library("m")
    if name is None:
        pytest.skip("C math library not found (needed to model llama2.c's expf)")
    expf = ctypes.CDLL(name).expf
    expf.restype, expf.argtypes = ctypes.c_float, [ctypes.c_float]
    return expf
