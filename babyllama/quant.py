"""Group-wise weight quantization: the math behind the int8 (v2, "Q8_0") and int4 (v3) formats.

A weight tensor is flattened and cut into groups of `group_size` consecutive values; each group
gets one float32 scale and small integers q with w ~= q * scale:

    int8 (llama2.c v2):  scale = max|w| / 127, q = round(w / scale) in [-127, 127], one byte each
    int4 (babyllama v3): scale = max|w| / 7,   q = round(w / scale) in [-7, 7],     two per byte

Rounding is round-half-to-even on the float32 quotient, as torch.round does in llama2.c's
exporter, so `babyllama quantize` writes the same bytes as `export.py --version 2`.

The v3 nibble layout (a babyllama extension; the file layout itself is in formats/llama2c.py):
a group of G values is G/2 bytes; byte j holds value j in its low nibble and value j + G/2 in
its high nibble, each stored as q + 8 (so 1..15; 0, i.e. q = -8, is never written). Pairing
value j with j + G/2 (as ggml's Q4_0 does) keeps both halves of the activation group contiguous,
so the kernel's loops stay unit-stride and vectorize; interleaved pairs (2j, 2j+1) would need
shuffles. Scales stay float32 like v2's, so the reader, the scale handling and the kernels'
scale arithmetic are shared; fp16 would save 2 bytes per group (0.5 bit per weight at G=32).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Iterator

import numpy as np

from .config import ModelConfig
from .errors import CheckpointError

Q_MAX = {8: 127, 4: 7}  # largest |q| per bit width (symmetric: -128 / -8 are never used)
VERSION_BITS = {2: 8, 3: 4}  # checkpoint version -> bits per weight
BITS_VERSION = {8: 2, 4: 3}
DEFAULT_MAX_GROUP_SIZE = 64  # a scale every 64 weights: 6% overhead for int8, quality near fp32
MIN_AUTO_GROUP_SIZE = 4  # below this the scales outweigh the savings; pass --group-size to insist


def group_size_problem(cfg: ModelConfig, group_size: int, bits: int) -> str | None:
    """Why `group_size` cannot quantize this model at `bits`, or None if it can.

    Groups must tile every matrix row (so a group never straddles two rows) and the activation
    vectors the matmuls read (dim for most, hidden_dim for w2, q_dim = n_heads * head_dim for wo):
    the size must divide dim, hidden_dim and q_dim (q_dim is dim unless head_dim was given).
    int4 packs a group into whole bytes, so its groups must also be even.
    """
    if isinstance(group_size, bool) or not isinstance(group_size, (int, np.integer)) or group_size < 1:
        return f"group size must be a positive integer, got {group_size!r}"
    if cfg.dim % group_size or cfg.hidden_dim % group_size:
        return f"group size {group_size} must divide both dim ({cfg.dim}) and hidden_dim ({cfg.hidden_dim})"
    if cfg.q_dim % group_size:
        return (f"group size {group_size} must divide q_dim ({cfg.q_dim} = {cfg.n_heads} heads x head_dim "
                f"{cfg.head_dim}, the width wo reads)")
    if bits == 4 and group_size % 2:
        return f"int4 group size must be even (two weights per byte), got {group_size}"
    return None


def check_group_size(cfg: ModelConfig, group_size: int, bits: int) -> int:
    problem = group_size_problem(cfg, group_size, bits)
    if problem:
        raise CheckpointError(problem)
    return int(group_size)


def choose_group_size(cfg: ModelConfig, bits: int = 8, max_group_size: int = DEFAULT_MAX_GROUP_SIZE) -> int:
    """The largest group size <= max_group_size that divides dim, hidden_dim and q_dim (even for int4).

    Larger groups mean fewer scales (smaller, faster files); 64 keeps int8 within a fraction of a
    percent of fp32 perplexity. Refuses when only sizes below MIN_AUTO_GROUP_SIZE fit.
    """
    for gs in range(max_group_size, MIN_AUTO_GROUP_SIZE - 1, -1):
        if group_size_problem(cfg, gs, bits) is None:
            return gs
    raise CheckpointError(
        f"no group size in [{MIN_AUTO_GROUP_SIZE}, {max_group_size}] divides both dim ({cfg.dim}) and "
        f"hidden_dim ({cfg.hidden_dim})" + (f" and q_dim ({cfg.q_dim})" if cfg.q_dim != cfg.dim else "")
        + (" and is even" if bits == 4 else "")
        + "; pass --group-size explicitly or train with a hidden_dim that shares a factor with dim"
    )


def quantize(w: np.ndarray, group_size: int, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Quantize a tensor group-wise: (values, scales).

    values: int8 (numel,) for 8 bits, or uint8 (numel/2,) packed nibbles for 4 bits.
    scales: float32 (numel / group_size,).
    """
    qmax = Q_MAX[bits]
    w = np.asarray(w, dtype=np.float32).reshape(-1, group_size)  # (groups, group_size)
    wmax = np.abs(w).max(axis=1)
    scale = (wmax / np.float32(qmax)).astype(np.float32)  # (groups,)
    # an all-zero group has scale 0: its values are 0 (llama2.c would divide 0 by 0 here)
    safe = np.where(scale > 0, scale, np.float32(1.0))
    q = np.round(w / safe[:, None])  # float32 quotient, round half to even like torch.round
    q = np.clip(q, -qmax, qmax).astype(np.int8)
    if bits == 8:
        return q.reshape(-1), scale
    half = group_size // 2
    nib = (q + 8).astype(np.uint8)  # offset binary: -7..7 -> 1..15
    packed = nib[:, :half] | (nib[:, half:] << 4)  # (groups, group_size/2)
    return packed.reshape(-1), scale


def dequantize(values: np.ndarray, scales: np.ndarray, group_size: int, bits: int) -> np.ndarray:
    """float32 (numel,) from quantize()'s output: q * scale, one float32 product per value."""
    if bits == 8:
        q = values.view(np.int8).reshape(-1, group_size)
    else:
        packed = values.view(np.uint8).reshape(-1, group_size // 2)
        lo = (packed & 0x0F).astype(np.int8) - 8
        hi = (packed >> 4).astype(np.int8) - 8
        q = np.concatenate([lo, hi], axis=1)  # (groups, group_size)
    return (q.astype(np.float32) * scales[:, None]).reshape(-1)


@dataclass(frozen=True)
class QuantMatrix:
    """A stack of group-quantized matrices of one kind (e.g. wq of every layer).

    The quantized values stay where they are (usually the mapped file): `data` is a 1-D int8
    array and matrix l's values start at byte offsets[l] (rows*cols bytes for int8, half that for
    int4). The float32 scales are copied into one (n_matrices, groups) array: they are only
    1/group_size of the values, and copying makes them aligned and contiguous whatever the
    file's offsets (a v2 tensor's scale block starts at any byte).
    """

    bits: int
    group_size: int
    shape: tuple[int, ...]  # (L, rows, cols) for layer weights, (rows, cols) for embedding/classifier
    data: np.ndarray  # 1-D int8, holds the values of every matrix
    offsets: np.ndarray  # (n_matrices,) int64 byte offsets into data
    scales: np.ndarray  # (n_matrices, rows * cols / group_size) float32

    @property
    def rows(self) -> int:
        return self.shape[-2]

    @property
    def cols(self) -> int:
        return self.shape[-1]

    @property
    def value_bytes(self) -> int:
        """Bytes of quantized values of one matrix."""
        return self.rows * self.cols * self.bits // 8

    @property
    def nbytes(self) -> int:
        """Bytes a pass over every matrix reads: values plus scales."""
        return len(self.offsets) * self.value_bytes + self.scales.nbytes

    def values(self, i: int = 0) -> np.ndarray:
        """Matrix i's raw quantized values (int8 or packed uint8), a view into `data`."""
        o = int(self.offsets[i])
        return self.data[o : o + self.value_bytes]

    def dequantize(self) -> np.ndarray:
        """float32 array of `shape`."""
        mats = [dequantize(self.values(i), self.scales[i], self.group_size, self.bits) for i in range(len(self.offsets))]
        return np.stack(mats).reshape(self.shape)

    @classmethod
    def from_float(cls, w: np.ndarray, group_size: int, bits: int) -> "QuantMatrix":
        """Quantize an fp32 (rows, cols) or (L, rows, cols) array in memory."""
        w = np.asarray(w, dtype=np.float32)
        mats = w.reshape(-1, *w.shape[-2:])
        parts = [quantize(m, group_size, bits) for m in mats]
        data = np.concatenate([p[0].view(np.int8) for p in parts])
        step = parts[0][0].size
        offsets = np.arange(len(parts), dtype=np.int64) * step
        return cls(bits, group_size, tuple(w.shape), data, offsets, np.stack([p[1] for p in parts]))


@dataclass(frozen=True)
class QuantWeights:
    """Weights of a v2 (int8) or v3 (int4) model: fp32 norms, group-quantized matrices.

    wcls is the same QuantMatrix as token_embedding when the classifier is shared (the engine
    dequantizes one embedding row per token, and quantizes the final activation for wcls).
    """

    bits: int
    group_size: int
    rms_att: np.ndarray  # (L, dim) float32
    rms_ffn: np.ndarray  # (L, dim)
    rms_final: np.ndarray  # (dim,)
    token_embedding: QuantMatrix  # (vocab, dim)
    wq: QuantMatrix  # (L, dim, dim)
    wk: QuantMatrix  # (L, kv_dim, dim)
    wv: QuantMatrix  # (L, kv_dim, dim)
    wo: QuantMatrix  # (L, dim, dim)
    w1: QuantMatrix  # (L, hidden, dim)
    w2: QuantMatrix  # (L, dim, hidden)
    w3: QuantMatrix  # (L, hidden, dim)
    wcls: QuantMatrix  # (vocab, dim)

    def matrices(self) -> Iterator[tuple[str, QuantMatrix]]:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, QuantMatrix):
                yield f.name, value

    @classmethod
    def from_float(cls, weights, group_size: int, bits: int) -> "QuantWeights":
        """Quantize fp32 Weights in memory (what a quantized file of them would hold)."""
        qm = {n: QuantMatrix.from_float(getattr(weights, n), group_size, bits)
              for n in ("token_embedding", "wq", "wk", "wv", "wo", "w1", "w2", "w3")}
        shared = weights.wcls is weights.token_embedding
        qm["wcls"] = qm["token_embedding"] if shared else QuantMatrix.from_float(weights.wcls, group_size, bits)
        norms = {n: np.asarray(getattr(weights, n), np.float32) for n in ("rms_att", "rms_ffn", "rms_final")}
        return cls(bits, group_size, **norms, **qm)
