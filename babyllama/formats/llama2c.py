"""llama2.c's files: the .bin model formats (v0-v3) and tokenizer.bin, read and written.

The one place that knows these byte layouts (all little-endian; README "Formats" has the table):
  v0  legacy run.c format: 7 x int32 header, fp32 weights in run.c's order, two RoPE tables.
  v1  256-byte "ak42" header, fp32 weights grouped norms-first.
  v2  llama2.c's int8 "Q8_0": v1's header + int32 group size at byte 37, fp32 norms, then each
      matrix as int8 values followed by its float32 group scales.
  v3  babyllama's int4: v2's layout with each matrix's values as packed nibbles (quant.py).
  tokenizer.bin: int32 max_token_length, then per token float32 score, int32 length, bytes.

llama2.c hard-codes rope_theta 10000, norm_eps 1e-5 and head size dim / n_heads. A model with
other values (Llama 3: theta 500000, eps 1e-5 or 1e-6) is written to v1-v3 with babyllama's
extension block inside the header's zero padding (byte 64, below; llama2.c never reads it), and
refused for v0, which has no room: a format that cannot hold a hyperparameter never drops it.

Reading maps the file and returns read-only NumPy views into it (no copy). Every header value
and the exact file size are checked before a single weight is touched; every problem raises
CheckpointError (TokenizerError for tokenizer.bin) with what was expected and what was found.
Writing is atomic (fileio.atomic_write).
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..arch.llama import NORMS, Weights, stored_tensors, tensor_shapes
from ..config import ModelConfig, RopeScaling
from ..errors import CheckpointError, ConfigError, TokenizerError
from ..fileio import atomic_write, map_readonly, regular_file_size

MAGIC = 0x616B3432  # "ak42" read as a little-endian uint32
V0_HEADER = struct.Struct("<7i")
V1_HEADER = struct.Struct("<Ii7iB")  # magic, version, 7 ints, shared flag
HEADER_SIZE = 256  # v1+ headers are zero-padded to 256 bytes

# babyllama's extension block, at byte 64 of a v1-v3 header (zero padding for llama2.c):
# tag "bbx1", int32 head_dim, float64 rope_theta, float64 norm_eps, int32 rope scaling type
# (0 none, 1 llama3), int32 original_max_position_embeddings, float64 factor, low_freq_factor,
# high_freq_factor. Written only when the model is not llama2.c's defaults, so files of default
# models stay byte-identical to llama2.c's own.
EXT_OFFSET = 64
EXT_TAG = b"bbx1"
EXT = struct.Struct("<4si2d2i3d")

# Tensor order inside the files. The names are the same in the torch model, exporter and engine.
V0_ORDER = ("token_embedding", "rms_att", "wq", "wk", "wv", "wo", "rms_ffn", "w1", "w2", "w3", "rms_final")
V1_ORDER = ("rms_att", "rms_ffn", "rms_final", "token_embedding", "wq", "wk", "wv", "wo", "w1", "w2", "w3")
QUANT_MATRICES = ("token_embedding", "wq", "wk", "wv", "wo", "w1", "w2", "w3")
VERSIONS = (0, 1, 2, 3)

# v2 (int8) and v3 (int4), both versions (little-endian):
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

TOKENIZER_HEADER = struct.Struct("<i")  # max_token_length
TOKENIZER_RECORD = struct.Struct("<fi")  # score, byte length


@dataclass(frozen=True)
class Checkpoint:
    """A loaded model file: its format version, its config, and its weights."""

    path: Path
    version: int
    config: ModelConfig
    weights: object  # arch.llama.Weights for v0/v1; quant.QuantWeights for v2/v3
    group_size: int = 0  # quantized formats only


# ---------------------------------------------------------------------------------------------
# reading


def _check_size(path: Path, version: int, expected: int, found: int) -> None:
    if expected != found:
        what = "truncated" if found < expected else "has trailing bytes"
        raise CheckpointError(f"{path}: file {what}: the v{version} header implies {expected} bytes, found {found}")


class _Reader:
    """Hands out consecutive views of a mapped file."""

    def __init__(self, buf: np.ndarray, offset: int):
        self.buf, self.offset = buf, offset

    def take(self, shape: tuple[int, ...], dtype=np.float32) -> np.ndarray:
        n = math.prod(shape) * np.dtype(dtype).itemsize
        arr = self.buf[self.offset : self.offset + n].view(dtype).reshape(shape)
        self.offset += n
        return arr


def _rope_floats(cfg: ModelConfig) -> int:
    # v0 files carry two unused RoPE tables (cos and sin), each (seq_len, head_size / 2).
    return cfg.seq_len * cfg.head_size


def _fp32_bytes(cfg: ModelConfig, version: int) -> int:
    shapes = tensor_shapes(cfg)
    n = sum(math.prod(shapes[name]) for name in stored_tensors(cfg))
    return 4 * (n + (_rope_floats(cfg) if version == 0 else 0))


def _read_fp32(buf: np.ndarray, cfg: ModelConfig, version: int) -> Weights:
    shapes = tensor_shapes(cfg)
    r = _Reader(buf, V0_HEADER.size if version == 0 else HEADER_SIZE)
    tensors = {}
    for name in V0_ORDER if version == 0 else V1_ORDER:
        tensors[name] = r.take(shapes[name])
    if version == 0:
        r.offset += 4 * _rope_floats(cfg)
    if not cfg.shared_classifier:
        tensors["wcls"] = r.take(shapes["wcls"])
    return Weights.from_dict(cfg, tensors)  # views: dtype and shapes already match


def load_checkpoint(path) -> Checkpoint:
    """Map a llama2.c checkpoint of any supported version and validate it."""
    path = Path(path)
    buf = map_readonly(path, CheckpointError)
    size = buf.size
    if size < V0_HEADER.size:
        raise CheckpointError(f"{path}: {size} bytes is too small for a llama2.c checkpoint header")
    if bytes(buf[:4]) == b"GGUF":
        raise CheckpointError(f"{path}: is a GGUF file (llama.cpp's format), expected a llama2.c .bin")
    (magic,) = struct.unpack_from("<I", buf, 0)
    if magic != MAGIC:
        return _load_v0(path, buf, size)
    if size < HEADER_SIZE:
        raise CheckpointError(f"{path}: file truncated: a versioned header needs {HEADER_SIZE} bytes, found {size}")
    _, version, *ints, shared = V1_HEADER.unpack_from(buf, 0)
    if version not in VERSIONS[1:]:
        raise CheckpointError(f"{path}: unsupported checkpoint version {version} (expected one of 1, 2, 3)")
    if shared not in (0, 1):
        raise CheckpointError(f"{path}: invalid v{version} header: shared_classifier flag must be 0 or 1, found {shared}")
    cfg = _versioned_config(path, buf, ints, bool(shared))
    if version == 1:
        _check_size(path, 1, HEADER_SIZE + _fp32_bytes(cfg, 1), size)
        return Checkpoint(path, 1, cfg, _read_fp32(buf, cfg, 1))
    return _load_quantized(path, buf, size, cfg, version)


def _load_v0(path: Path, buf: np.ndarray, size: int) -> Checkpoint:
    dim, hidden, layers, heads, kv_heads, vocab, seq_len = V0_HEADER.unpack_from(buf, 0)
    try:
        cfg = ModelConfig(dim, hidden, layers, heads, kv_heads, abs(vocab), seq_len, shared_classifier=vocab > 0)
    except ConfigError as e:
        raise CheckpointError(
            f"{path}: not a llama2.c checkpoint: no 'ak42' magic, and as a legacy (v0) header "
            f"dim={dim} hidden_dim={hidden} n_layers={layers} n_heads={heads} n_kv_heads={kv_heads} "
            f"vocab_size={vocab} seq_len={seq_len} it is invalid ({e})"
        ) from None
    _check_size(path, 0, V0_HEADER.size + _fp32_bytes(cfg, 0), size)
    return Checkpoint(path, 0, cfg, _read_fp32(buf, cfg, 0))


def _versioned_config(path: Path, buf: np.ndarray, ints, shared: bool) -> ModelConfig:
    """The config of a v1-v3 header, with the extension block's values where it has one."""
    extra = {}
    tag, head_dim, theta, eps, scaling, orig, factor, low, high = EXT.unpack_from(buf, EXT_OFFSET)
    if tag == EXT_TAG:
        extra = dict(head_dim=head_dim, rope_theta=theta, norm_eps=eps)
        if scaling == 1:
            extra["rope_scaling"] = dict(factor=factor, low_freq_factor=low, high_freq_factor=high,
                                         original_max_position_embeddings=orig)
        elif scaling != 0:
            raise CheckpointError(f"{path}: invalid header extension: rope scaling type {scaling} (expected 0 or 1)")
    try:
        return ModelConfig(*ints, shared_classifier=shared, **extra)
    except ConfigError as e:
        raise CheckpointError(f"{path}: invalid header ({e})") from None


def _quant_layout(cfg: ModelConfig, bits: int, group_size: int) -> tuple[int, list]:
    """(bytes of the whole file, [(name, n_matrices, rows, cols, value_bytes, scale_bytes)])."""
    shapes = tensor_shapes(cfg)
    offset = HEADER_SIZE + 4 * sum(math.prod(shapes[n]) for n in NORMS)
    layout = []
    for name in QUANT_MATRICES + (() if cfg.shared_classifier else ("wcls",)):
        shape = shapes[name]
        n_mats = shape[0] if len(shape) == 3 else 1
        rows, cols = shape[-2:]
        value_bytes = rows * cols * bits // 8
        scale_bytes = 4 * (rows * cols // group_size)
        layout.append((name, n_mats, rows, cols, value_bytes, scale_bytes))
        offset += n_mats * (value_bytes + scale_bytes)
    return offset, layout


def _load_quantized(path: Path, buf: np.ndarray, size: int, cfg: ModelConfig, version: int) -> Checkpoint:
    from ..quant import VERSION_BITS, QuantMatrix, QuantWeights, group_size_problem

    bits = VERSION_BITS[version]
    (group_size,) = V2_GROUP_SIZE.unpack_from(buf, V2_GROUP_SIZE_OFFSET)
    problem = group_size_problem(cfg, group_size, bits)
    if problem:
        # llama2.c's exporter checked only dim, so files exist whose w2 groups straddle rows
        raise CheckpointError(f"{path}: invalid v{version} header: {problem}")
    expected, layout = _quant_layout(cfg, bits, group_size)
    _check_size(path, version, expected, size)

    shapes = tensor_shapes(cfg)
    r = _Reader(buf, HEADER_SIZE)
    norms = {name: r.take(shapes[name]) for name in NORMS}
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
    return Checkpoint(path, version, cfg, QuantWeights(bits, group_size, **norms, **matrices), group_size)


def load_fp32(path) -> tuple[ModelConfig, Weights]:
    """(config, weights) of an fp32 .bin (v0 or v1); a quantized file is refused."""
    ck = load_checkpoint(path)
    if ck.version not in (0, 1):
        raise CheckpointError(f"{path}: expected an fp32 checkpoint (v0 or v1), found quantized version {ck.version}")
    return ck.config, ck.weights


# ---------------------------------------------------------------------------------------------
# writing


def _header(cfg: ModelConfig, version: int, group_size: int = 0) -> bytes:
    header = bytearray(HEADER_SIZE)
    V1_HEADER.pack_into(header, 0, MAGIC, version, cfg.dim, cfg.hidden_dim, cfg.n_layers, cfg.n_heads,
                        cfg.n_kv_heads, cfg.vocab_size, cfg.seq_len, int(cfg.shared_classifier))
    if version >= 2:
        V2_GROUP_SIZE.pack_into(header, V2_GROUP_SIZE_OFFSET, group_size)
    if not cfg.has_llama2c_defaults:
        s = cfg.rope_scaling
        scaling = (1, s.original_max_position_embeddings, s.factor, s.low_freq_factor, s.high_freq_factor) if s \
            else (0, 0, 0.0, 0.0, 0.0)
        EXT.pack_into(header, EXT_OFFSET, EXT_TAG, cfg.head_dim, cfg.rope_theta, cfg.norm_eps, *scaling)
    return bytes(header)


def _check_v0_can_hold(cfg: ModelConfig) -> None:
    if not cfg.has_llama2c_defaults:
        found = f"rope_theta {cfg.rope_theta}, norm_eps {cfg.norm_eps}, head_dim {cfg.head_dim} (dim {cfg.dim} / " \
                f"{cfg.n_heads} heads = {cfg.dim / cfg.n_heads:g})" + (", llama3 rope_scaling" if cfg.rope_scaling else "")
        raise CheckpointError(
            "a v0 file (run.c's format) holds only llama2.c's rope_theta 10000, norm_eps 1e-5, head_dim = dim / "
            f"n_heads and no rope scaling; this model has {found}: write --version 1, 2 or 3 instead"
        )


def _check_llama(cfg: ModelConfig) -> None:
    if cfg.arch != "llama":  # the tensors of a .bin are the Llama block's
        raise CheckpointError(f"a llama2.c .bin holds a Llama model; this one is {cfg.arch!r} "
                              "(export it with --to llmc, --to hf or --to pt)")


def _write_f32(f, arr: np.ndarray) -> None:
    f.write(np.ascontiguousarray(arr, dtype="<f4").tobytes())


def write_checkpoint(path, cfg: ModelConfig, weights: Weights, version: int = 0, inputs=()) -> Path:
    """Write fp32 weights as a v0 (run.c legacy) or v1 file, atomically. `inputs`: paths the
    output must not be (fileio.check_output)."""
    if version not in (0, 1):
        raise CheckpointError(f"write_checkpoint writes fp32 versions 0 and 1, not {version}")
    _check_llama(cfg)
    if not isinstance(weights, Weights):
        weights = Weights.from_dict(cfg, dict(weights))
    if version == 0:
        _check_v0_can_hold(cfg)

    def write(f):
        if version == 0:
            vocab = cfg.vocab_size if cfg.shared_classifier else -cfg.vocab_size
            f.write(V0_HEADER.pack(cfg.dim, cfg.hidden_dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, vocab, cfg.seq_len))
        else:
            f.write(_header(cfg, 1))
        for name in V0_ORDER if version == 0 else V1_ORDER:
            _write_f32(f, getattr(weights, name))
        if version == 0:
            cos, sin = legacy_rope_tables(cfg)  # unused by readers, but run.c expects the space
            _write_f32(f, cos)
            _write_f32(f, sin)
        if not cfg.shared_classifier:
            _write_f32(f, weights.wcls)

    return atomic_write(path, write, inputs)


def write_quantized_checkpoint(path, cfg: ModelConfig, weights: Weights, version: int = 2,
                               group_size: int | None = None, inputs=()) -> int:
    """Quantize fp32 weights and write them as v2 (int8) or v3 (int4), atomically; return the group size.

    group_size None picks the largest size <= 64 that divides dim and hidden_dim (quant.py).
    Matrices are quantized one layer at a time, so a mapped fp32 model is never copied whole.
    v2 output is byte-identical to llama2.c's `export.py --version 2` for the same group size.
    Already quantized QuantWeights of the version's bits (a repacked GGUF Q8_0 / Q4_0) are
    written as they are, with their own group size.
    """
    _check_llama(cfg)
    from ..quant import VERSION_BITS, QuantWeights, check_group_size, choose_group_size, quantize

    if version not in VERSION_BITS:
        raise CheckpointError(f"write_quantized_checkpoint writes versions 2 (int8) and 3 (int4), not {version}")
    bits = VERSION_BITS[version]
    given = isinstance(weights, QuantWeights)
    if given:
        if weights.bits != bits or group_size not in (None, weights.group_size):
            raise CheckpointError(f"the weights are int{weights.bits} with group size {weights.group_size}; "
                                  f"expected int{bits}" + (f" with group size {group_size}" if group_size else ""))
        group_size = weights.group_size
    elif not isinstance(weights, Weights):
        weights = Weights.from_dict(cfg, dict(weights))
    gs = choose_group_size(cfg, bits) if group_size is None else check_group_size(cfg, group_size, bits)
    _, layout = _quant_layout(cfg, bits, gs)

    def matrices(name, n_mats, rows, cols):
        if given:
            q = getattr(weights, name)
            yield from ((q.values(i), q.scales[i]) for i in range(n_mats))
        else:
            yield from (quantize(m, gs, bits) for m in np.asarray(getattr(weights, name)).reshape(n_mats, rows, cols))

    def write(f):
        f.write(_header(cfg, version, gs))
        for name in NORMS:
            _write_f32(f, getattr(weights, name))
        for name, n_mats, rows, cols, _, _ in layout:
            for values, scales in matrices(name, n_mats, rows, cols):
                f.write(values.tobytes())
                _write_f32(f, scales)

    atomic_write(path, write, inputs)
    return gs


def legacy_rope_tables(cfg: ModelConfig) -> tuple[np.ndarray, np.ndarray]:
    """The cos/sin tables (seq_len, head_size/2) llama2.c's legacy exporter stores in v0 files
    (readers ignore them; the engine computes its own, engine/kernels.rope_table)."""
    freqs = 1.0 / (cfg.rope_theta ** (np.arange(0, cfg.head_size, 2, dtype=np.float64) / cfg.head_size))
    angles = np.outer(np.arange(cfg.seq_len, dtype=np.float64), freqs)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# tokenizer.bin


def read_tokenizer_bin(path, vocab_size: int) -> tuple[list[bytes], list[float], int]:
    """(pieces, scores, max_token_length) of a tokenizer.bin holding exactly vocab_size tokens.

    The file must be a regular file (an endless stream such as /dev/zero is refused before a byte
    is read) and is parsed from a read-only mapping, at most vocab_size + 1 records: nothing is
    allocated by a size the file claims without the file having those bytes.
    """
    path = Path(path)
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, (int, np.integer)) or vocab_size <= 0:
        raise TokenizerError(f"vocab_size must be a positive integer, got {vocab_size!r}")
    size = regular_file_size(path, TokenizerError, "tokenizer file")
    data = memoryview(map_readonly(path, TokenizerError, "tokenizer file")) if size else b""
    if len(data) < TOKENIZER_HEADER.size:
        raise TokenizerError(
            f"tokenizer {path} is too short: expected a 4-byte header (max_token_length), found {len(data)} bytes")
    (max_len,) = TOKENIZER_HEADER.unpack_from(data, 0)
    if max_len <= 0:
        raise TokenizerError(f"tokenizer {path}: expected a positive max_token_length, found {max_len}")
    pieces, scores, end, problem = _parse_records(data, TOKENIZER_HEADER.size, max_len, vocab_size)
    found = len(pieces)
    if found == vocab_size and end == len(data):
        return pieces, scores, max_len
    where = f"tokenizer {path} does not fit the model: expected {vocab_size} tokens"
    if found == vocab_size:  # more records follow: count them (without keeping them) for the message
        more, _, _, problem = _parse_records(data, end, max_len, len(data), keep=False)
        found += len(more)
        if problem is None:
            raise TokenizerError(f"{where}, the file holds {found}")
        raise TokenizerError(f"{where}, the file holds at least {found} tokens, then token {found} {problem}")
    if problem is None:
        raise TokenizerError(f"{where}, the file holds {found}")
    raise TokenizerError(f"{where}, the file holds {found} readable tokens, then token {found} {problem}")


def _parse_records(data, offset: int, max_len: int, limit: int, keep: bool = True):
    """Parse up to `limit` token records from `offset`. Returns (pieces, scores, end offset,
    problem): problem is None when the records parsed (the data may go on after `limit` of them),
    else why the next record does not. keep=False only counts (pieces holds placeholders)."""
    pieces: list = []
    scores: list[float] = []
    size = len(data)
    unpack = TOKENIZER_RECORD.unpack_from
    while offset < size and len(pieces) < limit:
        if size - offset < TOKENIZER_RECORD.size:
            return pieces, scores, offset, f"is cut short: {size - offset} bytes left, a record needs at least 8"
        score, length = unpack(data, offset)
        offset += TOKENIZER_RECORD.size
        if length < 0:
            return pieces, scores, offset, f"has a negative byte length ({length})"
        if length > max_len:
            return pieces, scores, offset, f"has byte length {length}, more than max_token_length {max_len}"
        if length > size - offset:
            return pieces, scores, offset, f"is cut short: needs {length} bytes, {size - offset} left"
        pieces.append(bytes(data[offset : offset + length]) if keep else None)
        if keep:
            scores.append(score)
        offset += length
    return pieces, scores, offset, None


def write_tokenizer_bin(path, pieces: list[bytes], scores, max_token_length: int | None = None, inputs=()) -> Path:
    """Write a vocabulary as tokenizer.bin, atomically."""
    if len(pieces) != len(scores):
        raise TokenizerError(f"expected one score per token, got {len(pieces)} tokens and {len(scores)} scores")
    max_len = max((len(p) for p in pieces), default=0) if max_token_length is None else int(max_token_length)

    def write(f):
        f.write(TOKENIZER_HEADER.pack(max_len))
        for piece, score in zip(pieces, scores):
            f.write(TOKENIZER_RECORD.pack(float(score), len(piece)))
            f.write(piece)

    return atomic_write(path, write, inputs)


__all__ = ["Checkpoint", "load_checkpoint", "load_fp32", "write_checkpoint", "write_quantized_checkpoint",
           "legacy_rope_tables", "read_tokenizer_bin", "write_tokenizer_bin", "MAGIC", "HEADER_SIZE", "VERSIONS",
           "RopeScaling"]
