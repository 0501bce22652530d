"""Random models and placeholder tokenizers: what the tests and the benchmarks build when they need
a model of some shape and not a trained one.

    cfg = SHAPES["15M"]                           # llama2.c's model shapes
    weights = Weights.from_dict(cfg, random_weights(cfg))
    random_model(cfg, "m.bin"); placeholder_tokenizer(cfg.vocab_size).save("tokenizer.bin")
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .arch import module as arch_module
from .arch.tensors import stored_tensors
from .config import ModelConfig

# Shapes of Karpathy's llama2.c models (tinyllamas), for random-weight timing runs.
SHAPES = {
    "260K": ModelConfig(dim=64, hidden_dim=172, n_layers=5, n_heads=8, n_kv_heads=4, vocab_size=512, seq_len=512),
    "15M": ModelConfig(dim=288, hidden_dim=768, n_layers=6, n_heads=6, n_kv_heads=6, vocab_size=32000, seq_len=256),
    "42M": ModelConfig(dim=512, hidden_dim=1376, n_layers=8, n_heads=8, n_kv_heads=8, vocab_size=32000, seq_len=1024),
    "110M": ModelConfig(dim=768, hidden_dim=2048, n_layers=12, n_heads=12, n_kv_heads=12, vocab_size=32000,
                        seq_len=1024),
}


def random_weights(cfg: ModelConfig, seed: int = 0, scale: float | None = None) -> dict[str, np.ndarray]:
    """Random fp32 tensors of the right shapes: norms near 1, matrices N(0, scale^2).

    scale=None uses 1/sqrt(fan_in), which keeps activations of any depth in a trained model's range.
    A tied classifier is not included (Weights.from_dict ties it).
    """
    rng = np.random.default_rng(seed)
    shapes = arch_module(cfg.arch).tensor_shapes(cfg)
    tensors = {}
    for name in stored_tensors(cfg):
        shape = shapes[name]
        if name.endswith("_bias") or name in ("bqkv", "bo", "b1", "b2"):  # GPT-2's biases: small
            tensors[name] = 0.1 * rng.standard_normal(shape, dtype=np.float32)
        elif name.startswith(("rms", "ln_")):
            tensors[name] = (1.0 + 0.1 * rng.standard_normal(shape, dtype=np.float32)).astype(np.float32)
        else:
            std = scale if scale is not None else 1.0 / math.sqrt(shape[-1])
            tensors[name] = rng.standard_normal(shape, dtype=np.float32) * np.float32(std)
    return tensors


def random_model(cfg: ModelConfig, path, seed: int = 0, version: int = 0, scale: float | None = None) -> Path:
    """Write a .bin of random weights (v0 by default; v1 for configs v0 cannot hold)."""
    from .formats.llama2c import write_checkpoint, write_quantized_checkpoint

    weights = arch_module(cfg.arch).Weights.from_dict(cfg, random_weights(cfg, seed, scale))
    if version in (0, 1):
        write_checkpoint(path, cfg, weights, version=version)
    else:
        write_quantized_checkpoint(path, cfg, weights, version=version)
    return Path(path)


def placeholder_tokenizer(vocab_size: int):
    """A tokenizer of vocab_size pieces for random models: <unk> <s> </s>, the 256 byte tokens
    (when they fit), then "t<id>" pieces; only its size and printable pieces matter."""
    from .tokenizers.llama2c import Llama2cTokenizer

    pieces = [b"<unk>", b"<s>", b"</s>"] + [f"<0x{b:02X}>".encode() for b in range(256)]
    pieces = pieces[:vocab_size] + [f"t{i}".encode() for i in range(len(pieces), vocab_size)]
    return Llama2cTokenizer(pieces, np.zeros(vocab_size, np.float32))


def small_tokenizer(vocab_size: int = 300):
    """A llama2.c vocabulary that encodes English-ish text into a few merges: <unk> <s> </s>, the
    256 byte tokens, then short pieces (" the", " and", letters, punctuation) with falling scores,
    padded with <extraN>."""
    from .tokenizers.llama2c import Llama2cTokenizer

    pieces = [b"<unk>", b"<s>", b"</s>"] + [f"<0x{b:02X}>".encode() for b in range(256)]
    extra = [b" ", b"e", b"t", b"a", b"o", b" t", b"th", b" th", b"he", b" the", b"in", b"an", b" a", b"nd", b" and"]
    extra += [bytes([c]) for c in b"bcdfghijklmnpqrsuvwxyz.,!?'ABCDEFGHIJKLMNOPQRSTUVWXYZ" if bytes([c]) not in extra]
    pieces += extra[: vocab_size - len(pieces)]
    pieces += [f"<extra{i}>".encode() for i in range(vocab_size - len(pieces))]
    scores = np.array([0.0] * 259 + [-float(i) for i in range(vocab_size - 259)], np.float32)
    return Llama2cTokenizer(pieces, scores)
