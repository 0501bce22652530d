"""The llama2.c checkpoint formats: the one place that knows header layouts and tensor order.

Reading maps the file and returns read-only NumPy views into it (no copy: resident memory
stays near the part of the file actually touched). Every header value and the exact file size
are checked before a single weight is touched, and every problem raises CheckpointError with
what was expected and what was found. Writing goes to a temporary file that is renamed into
place, so a crash never leaves a half-written checkpoint behind.

Formats (all little-endian; see DESIGN.md for the byte-level description):
  v0  legacy run.c format: 7 x int32 header, fp32 weights in run.c's order, RoPE tables.
  v1  256-byte "ak42" header, fp32 weights grouped norms-first.
  v2  llama2.c's int8 "Q8_0": v1's header + int32 group size, fp32 norms, then each matrix as
      int8 values followed by its float32 group scales.
  v3  babyllama's int4: v2's layout with each matrix's values as packed nibbles (quant.py).
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Iterator

import numpy as np

from .config import ModelConfig
from .errors import CheckpointError, ConfigError

MAGIC = 0x616B3432  # "ak42" read as a little-endian uint32
V0_HEADER = struct.Struct("<7i")
V1_HEADER = struct.Struct("<Ii7iB")  # magic, version, 7 ints, shared flag
HEADER_SIZE = 256  # v1+ headers are zero-padded to 256 bytes

# Tensor order inside the files. The names are the same in the torch model, exporter and engine.
V0_ORDER = ("token_embedding", "rms_att", "wq", "wk", "wv", "wo", "rms_ffn", "w1", "w2", "w3", "rms_final")
V1_ORDER = ("rms_att", "rms_ffn", "rms_final", "token_embedding", "wq", "wk", "wv", "wo", "w1", "w2", "w3")
LAYER_MATRICES = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")


def tensor_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Shape of every weight tensor; matrices are (out_features, in_features) like nn.Linear."""
    d, h, L, kv, v = cfg.dim, cfg.hidden_dim, cfg.n_layers, cfg.kv_dim, cfg.vocab_size
    return {
        "token_embedding": (v, d),
        "rms_att": (L, d),
        "wq": (L, d, d),
        "wk": (L, kv, d),
        "wv": (L, kv, d),
        "wo": (L, d, d),
        "rms_ffn": (L, d),
        "w1": (L, h, d),
        "w2": (L, d, h),
        "w3": (L, h, d),
        "rms_final": (d,),
        "wcls": (v, d),
    }


@dataclass(frozen=True)
class Weights:
    """fp32 weights of a model. Arrays may be read-only views of a mapped file.

    wcls is the same array as token_embedding when the classifier is shared.
    """

    token_embedding: np.ndarray  # (vocab, dim)
    rms_att: np.ndarray  # (L, dim)
    wq: np.ndarray  # (L, dim, dim)
    wk: np.ndarray  # (L, kv_dim, dim)
    wv: np.ndarray  # (L, kv_dim, dim)
    wo: np.ndarray  # (L, dim, dim)
    rms_ffn: np.ndarray  # (L, dim)
    w1: np.ndarray  # (L, hidden, dim)
    w2: np.ndarray  # (L, dim, hidden)
    w3: np.ndarray  # (L, hidden, dim)
    rms_final: np.ndarray  # (dim,)
    wcls: np.ndarray  # (vocab, dim)

    def items(self) -> Iterator[tuple[str, np.ndarray]]:
        for f in fields(self):
            yield f.name, getattr(self, f.name)

    @classmethod
    def from_dict(cls, cfg: ModelConfig, tensors: dict[str, np.ndarray]) -> "Weights":
        """Build from a name -> array mapping, checking every shape against the config."""
        tensors = dict(tensors)
        if cfg.shared_classifier:
            tensors.setdefault("wcls", tensors.get("token_embedding"))
        shapes = tensor_shapes(cfg)
        missing = [n for n in shapes if tensors.get(n) is None]
        if missing:
            raise CheckpointError(f"missing tensors: {', '.join(missing)}")
        out = {}
        for name, shape in shapes.items():
            arr = np.asarray(tensors[name])
            if arr.shape != shape:
                raise CheckpointError(f"tensor {name}: expected shape {shape}, found {arr.shape}")
            out[name] = arr if arr.dtype == np.float32 else arr.astype(np.float32)
        return cls(**out)


@dataclass(frozen=True)
class Checkpoint:
    """A loaded model file: its format version, its config, and its weights."""

    path: Path
    version: int
    config: ModelConfig
    weights: object  # Weights for v0/v1; the quantized formats carry their own weight classes
    group_size: int = 0  # quantized formats only


# ---------------------------------------------------------------------------------------------
# reading


def _map(path: Path) -> np.ndarray:
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such model file") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read model file ({e.strerror})") from None
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory, expected a llama2.c .bin model file")
    if size < V0_HEADER.size:
        raise CheckpointError(f"{path}: {size} bytes is too small for a llama2.c checkpoint header")
    # A plain ndarray over the mapping, not np.memmap: Numba's dispatcher types an exact ndarray
    # in C but an ndarray subclass in Python, ~0.2 us per weight argument on every forward call.
    try:
        with open(path, "rb") as f:
            return np.frombuffer(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ), dtype=np.uint8)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot map model file ({e})") from None


def _config(path: Path, dim, hidden, layers, heads, kv_heads, vocab, seq_len, shared) -> ModelConfig:
    try:
        return ModelConfig(dim, hidden, layers, heads, kv_heads, vocab, seq_len, shared_classifier=shared)
    except ConfigError as e:
        raise CheckpointError(f"{path}: invalid header ({e})") from None


def _check_size(path: Path, version: int, expected: int, found: int) -> None:
    if expected != found:
        what = "truncated" if found < expected else "has trailing bytes"
        raise CheckpointError(
            f"{path}: file {what}: the v{version} header implies {expected} bytes, found {found}"
        )


class _Reader:
    """Hands out consecutive fp32 views of a mapped file."""

    def __init__(self, buf: np.ndarray, offset: int):
        self.buf, self.offset = buf, offset

    def take(self, shape: tuple[int, ...], dtype=np.float32) -> np.ndarray:
        n = int(np.prod(shape)) * np.dtype(dtype).itemsize
        arr = self.buf[self.offset : self.offset + n].view(dtype).reshape(shape)
        self.offset += n
        return arr


def _fp32_size(cfg: ModelConfig, order: tuple[str, ...], extra_floats: int = 0) -> int:
    shapes = tensor_shapes(cfg)
    n = sum(int(np.prod(shapes[name])) for name in order) + extra_floats
    if not cfg.shared_classifier:
        n += int(np.prod(shapes["wcls"]))
    return 4 * n


def _read_fp32(path: Path, buf: np.ndarray, cfg: ModelConfig, order, offset: int, skip_after: dict) -> Weights:
    shapes = tensor_shapes(cfg)
    r = _Reader(buf, offset)
    tensors = {}
    for name in order:
        tensors[name] = r.take(shapes[name])
        r.offset += 4 * skip_after.get(name, 0)
    tensors["wcls"] = tensors["token_embedding"] if cfg.shared_classifier else r.take(shapes["wcls"])
    return Weights(**{name: tensors[name] for name in shapes})


def _rope_floats(cfg: ModelConfig) -> int:
    # v0 files carry two unused RoPE tables (cos and sin), each (seq_len, head_size / 2).
    return cfg.seq_len * cfg.head_size


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Map a llama2.c checkpoint of any supported version and validate it."""
    path = Path(path)
    buf = _map(path)
    size = buf.size
    (magic,) = struct.unpack_from("<I", buf, 0)
    if magic != MAGIC:
        return _load_v0(path, buf, size)
    if size < HEADER_SIZE:
        raise CheckpointError(f"{path}: file truncated: a versioned header needs {HEADER_SIZE} bytes, found {size}")
    _, version, *ints, shared = V1_HEADER.unpack_from(buf, 0)
    if version == 1:
        return _load_v1(path, buf, size, ints, shared)
    loader = _VERSIONED_LOADERS.get(version)
    if loader is None:
        known = ", ".join(str(v) for v in sorted({1, *_VERSIONED_LOADERS}))
        raise CheckpointError(f"{path}: unsupported checkpoint version {version} (expected one of {known})")
    return loader(path, buf, size, ints, shared)


def _load_v0(path: Path, buf: np.ndarray, size: int) -> Checkpoint:
    dim, hidden, layers, heads, kv_heads, vocab, seq_len = V0_HEADER.unpack_from(buf, 0)
    shared = vocab > 0
    try:
        cfg = ModelConfig(dim, hidden, layers, heads, kv_heads, abs(vocab), seq_len, shared_classifier=shared)
    except ConfigError as e:
        raise CheckpointError(
            f"{path}: not a llama2.c checkpoint: no 'ak42' magic, and as a legacy (v0) header "
            f"dim={dim} hidden_dim={hidden} n_layers={layers} n_heads={heads} n_kv_heads={kv_heads} "
            f"vocab_size={vocab} seq_len={seq_len} it is invalid ({e})"
        ) from None
    expected = V0_HEADER.size + _fp32_size(cfg, V0_ORDER, _rope_floats(cfg))
    _check_size(path, 0, expected, size)
    weights = _read_fp32(path, buf, cfg, V0_ORDER, V0_HEADER.size, {"rms_final": _rope_floats(cfg)})
    return Checkpoint(path, 0, cfg, weights)


def _load_v1(path: Path, buf: np.ndarray, size: int, ints, shared: int) -> Checkpoint:
    if shared not in (0, 1):
        raise CheckpointError(f"{path}: invalid header: shared_classifier flag must be 0 or 1, found {shared}")
    cfg = _config(path, *ints, bool(shared))
    expected = HEADER_SIZE + _fp32_size(cfg, V1_ORDER)
    _check_size(path, 1, expected, size)
    return Checkpoint(path, 1, cfg, _read_fp32(path, buf, cfg, V1_ORDER, HEADER_SIZE, {}))


# Versions beyond 1 (the quantized formats) register a loader here:
# loader(path, buf, size, header_ints, shared_flag) -> Checkpoint
_VERSIONED_LOADERS: dict = {}


# ---------------------------------------------------------------------------------------------
# v2 (int8, llama2.c's "Q8_0") and v3 (int4, a babyllama extension)
#
# Byte layout, both versions (little-endian):
#   0    uint32 magic "ak42", int32 version (2 or 3), 7 x int32 config, uint8 shared_classifier
#   37   int32 group_size (unaligned, right after the flag), zero padding to 256
#   256  float32 rms_att (L, dim), rms_ffn (L, dim), rms_final (dim,)
#   then the quantized matrices in this order: token_embedding; wq of layer 0..L-1; then wk, wv,
#   wo, w1, w2, w3 likewise (each layer its own matrix); wcls if not shared. One matrix is
#       values  v2: int8[rows*cols]    v3: uint8[rows*cols/2] packed nibbles (see quant.py)
#       scales  float32[rows*cols / group_size]
#   with nothing between matrices, so a scale block may start at any byte offset.

V2_GROUP_SIZE = struct.Struct("<i")
V2_GROUP_SIZE_OFFSET = 37
QUANT_NORMS = ("rms_att", "rms_ffn", "rms_final")
QUANT_MATRICES = ("token_embedding", "wq", "wk", "wv", "wo", "w1", "w2", "w3")


def _quant_layout(cfg: ModelConfig, bits: int, group_size: int) -> tuple[int, list]:
    """(bytes of the whole file, [(name, n_matrices, rows, cols, value_bytes, scale_bytes)])."""
    shapes = tensor_shapes(cfg)
    offset = HEADER_SIZE + 4 * sum(int(np.prod(shapes[n])) for n in QUANT_NORMS)
    names = QUANT_MATRICES + (() if cfg.shared_classifier else ("wcls",))
    layout = []
    for name in names:
        shape = shapes[name]
        n_mats = shape[0] if len(shape) == 3 else 1
        rows, cols = shape[-2:]
        value_bytes = rows * cols * bits // 8
        scale_bytes = 4 * (rows * cols // group_size)
        layout.append((name, n_mats, rows, cols, value_bytes, scale_bytes))
        offset += n_mats * (value_bytes + scale_bytes)
    return offset, layout


def _load_quantized(path: Path, buf: np.ndarray, size: int, ints, shared: int, version: int) -> Checkpoint:
    from .quant import VERSION_BITS, QuantMatrix, QuantWeights, group_size_problem

    bits = VERSION_BITS[version]
    if shared not in (0, 1):
        raise CheckpointError(f"{path}: invalid v{version} header: shared_classifier flag must be 0 or 1, found {shared}")
    cfg = _config(path, *ints, bool(shared))
    (group_size,) = V2_GROUP_SIZE.unpack_from(buf, V2_GROUP_SIZE_OFFSET)
    problem = group_size_problem(cfg, group_size, bits)
    if problem:
        # llama2.c's exporter checked only dim, so files exist whose w2 groups straddle rows
        raise CheckpointError(f"{path}: invalid v{version} header: {problem}")
    expected, layout = _quant_layout(cfg, bits, group_size)
    _check_size(path, version, expected, size)

    shapes = tensor_shapes(cfg)
    r = _Reader(buf, HEADER_SIZE)
    norms = {name: r.take(shapes[name]) for name in QUANT_NORMS}
    data = buf.view(np.int8)  # the whole file; matrices are found by byte offset
    matrices = {}
    for name, n_mats, rows, cols, value_bytes, scale_bytes in layout:
        offsets = np.empty(n_mats, np.int64)
        scales = np.empty((n_mats, rows * cols // group_size), np.float32)
        for i in range(n_mats):
            offsets[i] = r.offset
            r.offset += value_bytes
            scales[i] = buf[r.offset : r.offset + scale_bytes].view("<f4")  # copy: aligned, contiguous
            r.offset += scale_bytes
        matrices[name] = QuantMatrix(bits, group_size, shapes[name], data, offsets, scales)
    if cfg.shared_classifier:
        matrices["wcls"] = matrices["token_embedding"]
    weights = QuantWeights(bits, group_size, **norms, **matrices)
    return Checkpoint(path, version, cfg, weights, group_size)


_VERSIONED_LOADERS[2] = lambda path, buf, size, ints, shared: _load_quantized(path, buf, size, ints, shared, 2)
_VERSIONED_LOADERS[3] = lambda path, buf, size, ints, shared: _load_quantized(path, buf, size, ints, shared, 3)


# ---------------------------------------------------------------------------------------------
# writing


def atomic_write(path: str | os.PathLike, write_fn) -> None:
    """Call write_fn(file) on a temporary file beside `path`, then rename it into place."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _header_v1(cfg: ModelConfig, version: int) -> bytearray:
    header = bytearray(HEADER_SIZE)
    V1_HEADER.pack_into(
        header, 0, MAGIC, version, cfg.dim, cfg.hidden_dim, cfg.n_layers, cfg.n_heads,
        cfg.n_kv_heads, cfg.vocab_size, cfg.seq_len, int(cfg.shared_classifier),
    )
    return header


def _write_f32(f, arr: np.ndarray) -> None:
    f.write(np.ascontiguousarray(arr, dtype="<f4").tobytes())


def write_checkpoint(path: str | os.PathLike, cfg: ModelConfig, weights: Weights, version: int = 0) -> None:
    """Write fp32 weights as a v0 (run.c legacy) or v1 file, atomically."""
    if version not in (0, 1):
        raise CheckpointError(f"write_checkpoint writes fp32 versions 0 and 1, not {version}")
    if not isinstance(weights, Weights):
        weights = Weights.from_dict(cfg, dict(weights))

    def write(f):
        if version == 0:
            vocab = cfg.vocab_size if cfg.shared_classifier else -cfg.vocab_size
            f.write(V0_HEADER.pack(cfg.dim, cfg.hidden_dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, vocab, cfg.seq_len))
            for name in V0_ORDER:
                _write_f32(f, getattr(weights, name))
            cos, sin = rope_tables(cfg)  # unused by readers, but run.c expects the space
            _write_f32(f, cos)
            _write_f32(f, sin)
        else:
            f.write(_header_v1(cfg, 1))
            for name in V1_ORDER:
                _write_f32(f, getattr(weights, name))
        if not cfg.shared_classifier:
            _write_f32(f, weights.wcls)

    atomic_write(path, write)


def write_quantized_checkpoint(
    path: str | os.PathLike, cfg: ModelConfig, weights: Weights, version: int = 2, group_size: int | None = None
) -> int:
    """Quantize fp32 weights and write them as v2 (int8) or v3 (int4), atomically; return the group size.

    group_size None picks the largest size <= 64 that divides dim and hidden_dim (quant.py).
    Matrices are quantized one layer at a time, so a mapped fp32 model is never copied whole.
    v2 output is byte-identical to llama2.c's `export.py --version 2` for the same group size.
    """
    from .quant import VERSION_BITS, check_group_size, choose_group_size, quantize

    if version not in VERSION_BITS:
        raise CheckpointError(f"write_quantized_checkpoint writes versions 2 (int8) and 3 (int4), not {version}")
    bits = VERSION_BITS[version]
    if not isinstance(weights, Weights):
        weights = Weights.from_dict(cfg, dict(weights))
    gs = choose_group_size(cfg, bits) if group_size is None else check_group_size(cfg, group_size, bits)
    _, layout = _quant_layout(cfg, bits, gs)

    def write(f):
        header = _header_v1(cfg, version)
        V2_GROUP_SIZE.pack_into(header, V2_GROUP_SIZE_OFFSET, gs)
        f.write(header)
        for name in QUANT_NORMS:
            _write_f32(f, getattr(weights, name))
        for name, n_mats, rows, cols, _, _ in layout:
            mats = np.asarray(getattr(weights, name)).reshape(n_mats, rows, cols)
            for m in mats:
                values, scales = quantize(m, gs, bits)
                f.write(values.tobytes())
                _write_f32(f, scales)

    atomic_write(path, write)
    return gs


def rope_tables(cfg: ModelConfig) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin RoPE tables (seq_len, head_size/2), as llama2.c's legacy exporter stores them."""
    freqs = 1.0 / (cfg.rope_theta ** (np.arange(0, cfg.head_size, 2, dtype=np.float64) / cfg.head_size))
    angles = np.outer(np.arange(cfg.seq_len, dtype=np.float64), freqs)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
