"""Reading and writing llama2.c checkpoints: round trips, zero-copy mapping, and bad files."""

import struct

import numpy as np
import pytest
from conftest import random_weights, shared_file

from babyllama.arch.llama import Weights
from babyllama.formats.llama2c import MAGIC, load_checkpoint, write_checkpoint
from babyllama.config import ModelConfig, llama_hidden_dim
from babyllama.errors import CheckpointError, ConfigError


@pytest.mark.parametrize("version", [0, 1])
@pytest.mark.parametrize("shared", [True, False])
def test_round_trip(tmp_path, version, shared):
    cfg = ModelConfig(dim=32, hidden_dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, seq_len=32,
                      shared_classifier=shared)
    w = random_weights(cfg)
    path = tmp_path / "m.bin"
    write_checkpoint(path, cfg, Weights.from_dict(cfg, w), version=version)
    ck = load_checkpoint(path)
    assert ck.version == version and ck.config == cfg
    for name, arr in ck.weights.items():
        expected = w["token_embedding"] if (name == "wcls" and shared) else w[name]
        np.testing.assert_array_equal(arr, expected, err_msg=name)
        assert not arr.flags.writeable, f"{name} should be a read-only view of the file"
    assert (ck.weights.wcls is ck.weights.token_embedding) == shared
    assert not list(tmp_path.glob(".*tmp*")), "no temporary files left behind"


def _mapping(arr):
    """The mmap an array views, following .base (None for an array that owns a copy)."""
    import mmap

    base = arr
    while base is not None and not isinstance(base, mmap.mmap):
        base = base.obj if isinstance(base, memoryview) else getattr(base, "base", None)
    return base


def test_stories260k_header_and_zero_copy():
    ck = load_checkpoint(shared_file("stories260K.bin"))
    assert ck.version == 0
    assert ck.config == ModelConfig(64, 172, 5, 8, 4, 512, 512)
    for name, arr in ck.weights.items():  # views of the file's mapping, not copies read from it
        m = _mapping(arr)
        assert m is not None and np.shares_memory(arr, np.frombuffer(m, np.uint8)), name
    assert _mapping(ck.weights.wq.copy()) is None  # the check can fail: a copy is not mapped
    assert llama_hidden_dim(64, multiple_of=4) == 172


def _write(tmp_path, cfg, version=0):
    path = tmp_path / f"m{version}.bin"
    write_checkpoint(path, cfg, Weights.from_dict(cfg, random_weights(cfg)), version=version)
    return path


@pytest.mark.parametrize("version", [0, 1])
def test_truncated_file_names_expected_and_found_sizes(tmp_path, tiny_config, version):
    path = _write(tmp_path, tiny_config, version)
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    with pytest.raises(CheckpointError, match=rf"truncated.*implies {len(data)} bytes, found {len(data) - 10}"):
        load_checkpoint(path)
    path.write_bytes(data + b"\0" * 4)
    with pytest.raises(CheckpointError, match="trailing bytes"):
        load_checkpoint(path)


def test_wrong_version_and_bad_flag(tmp_path, tiny_config):
    path = _write(tmp_path, tiny_config, 1)
    data = bytearray(path.read_bytes())
    struct.pack_into("<i", data, 4, 7)
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="unsupported checkpoint version 7"):
        load_checkpoint(path)
    struct.pack_into("<i", data, 4, 1)
    data[36] = 5  # shared_classifier flag
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="shared_classifier flag must be 0 or 1, found 5"):
        load_checkpoint(path)


@pytest.mark.parametrize(
    "header, message",
    [
        ((64, 172, 5, 7, 7, 512, 512), "divisible by n_heads"),  # 64 % 7
        ((64, 172, 5, 8, 3, 512, 512), "divisible by n_kv_heads"),
        ((64, 172, 0, 8, 4, 512, 512), "n_layers must be a positive"),
        ((24, 172, 5, 8, 4, 512, 512), "head size must be even"),  # head size 3
    ],
)
def test_inconsistent_v0_header(tmp_path, header, message):
    path = tmp_path / "bad.bin"
    path.write_bytes(struct.pack("<7i", *header) + b"\0" * 4096)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path)


def test_foreign_and_missing_files(tmp_path):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF" + struct.pack("<I", 3) + b"\x07" * 200)
    with pytest.raises(CheckpointError, match="is a GGUF file"):
        load_checkpoint(gguf)
    tiny = tmp_path / "tiny.bin"
    tiny.write_bytes(b"abc")
    with pytest.raises(CheckpointError, match="too small"):
        load_checkpoint(tiny)
    with pytest.raises(CheckpointError, match="no such model file"):
        load_checkpoint(tmp_path / "missing.bin")
    with pytest.raises(CheckpointError, match="is a directory"):
        load_checkpoint(tmp_path)
    header_only = tmp_path / "v1.bin"
    header_only.write_bytes(struct.pack("<Ii", MAGIC, 1) + b"\0" * 20)
    with pytest.raises(CheckpointError, match="versioned header needs 256 bytes"):
        load_checkpoint(header_only)


def test_tokenizer_file_is_not_a_model():
    with pytest.raises(CheckpointError, match="not a llama2.c checkpoint|truncated|trailing"):
        load_checkpoint(shared_file("tok512.bin"))


def test_write_rejects_wrong_shapes(tmp_path, tiny_config):
    w = random_weights(tiny_config)
    w["wq"] = w["wq"][:, :-1]
    with pytest.raises(CheckpointError, match=r"tensor wq: expected shape \(2, 32, 32\), found \(2, 31, 32\)"):
        write_checkpoint(tmp_path / "x.bin", tiny_config, w)
    assert not (tmp_path / "x.bin").exists()


def test_config_validation():
    with pytest.raises(ConfigError, match="dim must be a positive integer"):
        ModelConfig(dim=-1, hidden_dim=4, n_layers=1, n_heads=1, n_kv_heads=1, vocab_size=4, seq_len=4)
    cfg = ModelConfig(dim=8, hidden_dim=16, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=10, seq_len=4)
    assert (cfg.head_size, cfg.kv_dim, cfg.kv_mul) == (4, 4, 2)
    with pytest.raises(Exception):
        cfg.dim = 3  # frozen
