"""GGUF files (llama.cpp's and ollama's format), Llama architecture: read for the engine and
for conversion, and written (`babyllama export --to gguf`).

Layout (ggml's gguf.md, little-endian): "GGUF", uint32 version (2 or 3), uint64 tensor count,
uint64 metadata count; the metadata (key string, uint32 type, value; strings are uint64 length +
UTF-8; arrays uint32 item type + uint64 count + items); per tensor its name, uint32 n_dims,
uint64 dims (ne0 first: a matrix (rows, cols) is stored as ne0 = cols), uint32 ggml type, uint64
offset; then, aligned to general.alignment (32), the tensor data.

The header is parsed here, not by the `gguf` package's GGUFReader, for two measured reasons:
GGUFReader builds two NumPy arrays per string, so a Llama 3 vocabulary (128,256 tokens and
280,147 merges) took 28 s and 600 MB to open; and it trusts counts, so a 57-byte file whose
array claims 2**40 items never returns. This parser checks every count and length against the
bytes left before using it and caps what no model needs. The package is still what knows
ggml's types (names, block sizes), dequantizes the ones babyllama does not run, quantizes, and
writes files (GGUFWriter).

q and k: llama.cpp's converter permutes Hugging Face's rotate-half rows back to Meta's
interleaved pairs, which is the engine's layout, so GGUF tensors load as they are (checked:
stories260K.gguf gives stories260K.bin's tokens). Q8_0 and Q4_0 are repacked into v2 / v3
(formats/assemble.py); a Llama 3.1 file's rope_freqs.weight (per-frequency divisors) is turned
back into the llama3 scaling parameters and checked to give the very same divisors.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..arch.llama import GGUF_NAMES, Weights, stored_tensors
from ..config import ModelConfig, RopeScaling
from ..errors import CheckpointError, ConfigError
from ..fileio import atomic_write, map_readonly
from .assemble import FLOAT_BYTES, Stored, build, gather, names_a_tensor, stored_bytes

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_TENSORS = 1 << 16  # a Llama has 2 + 9 per layer; this is room for any model
MAX_METADATA = 1 << 16
MAX_DIMS = 4
MAX_CONTEXT = 1 << 24
# value types: (struct code, bytes) of the scalars; 8 string, 9 array
SCALARS = {0: ("B", 1), 1: ("b", 1), 2: ("H", 2), 3: ("h", 2), 4: ("I", 4), 5: ("i", 4), 6: ("f", 4), 7: ("?", 1),
           10: ("Q", 8), 11: ("q", 8), 12: ("d", 8)}
STRING, ARRAY = 8, 9
# ggml types (ggml.h's enum ggml_type) the engine runs directly: number -> (name, (values, bytes) per block)
GGML_TYPES = {0: ("F32", (1, 4)), 1: ("F16", (1, 2)), 2: ("Q4_0", (32, 18)), 8: ("Q8_0", (32, 34)), 30: ("BF16", (1, 2))}
NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1", 10: "<u8", 11: "<i8", 12: "<f8"}


def _gguf():
    try:
        import gguf
    except ImportError:
        raise CheckpointError("GGUF files need the gguf package: pip install 'babyllama[hf]'") from None
    return gguf


# ---------------------------------------------------------------------------------------------
# the header


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dims: tuple[int, ...]  # ne0 first, as stored
    ggml_type: int
    offset: int  # from the start of the data section


@dataclass(frozen=True)
class Header:
    version: int
    metadata: dict
    tensors: list
    data_start: int


class _Parser:
    """Reads the header from a mapped file, checking every length against the bytes left."""

    def __init__(self, buf: np.ndarray, path: Path):
        self.buf, self.mv, self.path, self.pos = buf, memoryview(buf), path, 0

    def fail(self, what: str):
        raise CheckpointError(f"{self.path}: invalid GGUF header at byte {self.pos}: {what}")

    def need(self, n: int, what: str) -> None:
        if n > self.buf.size - self.pos:
            self.fail(f"{what} needs {n} bytes, {self.buf.size - self.pos} left (truncated?)")

    def scalar(self, code: str, size: int, what: str):
        self.need(size, what)
        (v,) = struct.unpack_from("<" + code, self.mv, self.pos)
        self.pos += size
        return v

    def u32(self, what):
        return self.scalar("I", 4, what)

    def u64(self, what):
        return self.scalar("Q", 8, what)

    def string(self, what: str) -> str:
        n = self.u64(f"{what} length")
        self.need(n, what)
        raw = bytes(self.mv[self.pos : self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            self.fail(f"{what} is not UTF-8")

    def value(self, kind: int, what: str, depth: int = 0):
        if kind in SCALARS:
            v = self.scalar(*SCALARS[kind], what)
            return bool(v) if kind == 7 else v
        if kind == STRING:
            return self.string(what)
        if kind != ARRAY or depth:
            self.fail(f"{what}: unknown value type {kind}")
        item, count = self.u32(f"{what} item type"), self.u64(f"{what} count")
        if item in NUMPY:  # numbers: one view, checked against the bytes left
            size = np.dtype(NUMPY[item]).itemsize
            self.need(count * size, f"{what} ({count} items)")
            arr = self.buf[self.pos : self.pos + count * size].view(NUMPY[item])
            self.pos += count * size
            return arr.astype(bool) if item == 7 else arr
        if item != STRING:
            self.fail(f"{what}: array of unsupported type {item}")
        self.need(count * 8, f"{what} ({count} strings)")  # every string has at least its length
        return [self.string(f"{what}[{i}]") for i in range(count)]


def read_header(path) -> tuple[Header, np.ndarray]:
    """(Header, the mapped file). Every problem is a CheckpointError naming the byte and the field."""
    path = Path(path)
    buf = map_readonly(path, CheckpointError, "GGUF file")
    p = _Parser(buf, path)
    p.need(24, "the fixed header (magic, version, counts)")
    if bytes(buf[:4]) != MAGIC:
        raise CheckpointError(f"{path}: not a GGUF file: expected magic 'GGUF', found {bytes(buf[:4])!r}")
    p.pos = 4
    version = p.u32("version")
    if version not in VERSIONS:
        raise CheckpointError(f"{path}: GGUF version {version}: expected 2 or 3")
    n_tensors, n_kv = p.u64("tensor count"), p.u64("metadata count")
    if n_tensors > MAX_TENSORS or n_kv > MAX_METADATA:
        raise CheckpointError(f"{path}: GGUF header claims {n_tensors} tensors and {n_kv} metadata entries: "
                              f"expected at most {MAX_TENSORS} and {MAX_METADATA}")
    metadata = {}
    for _ in range(n_kv):
        key = p.string("metadata key")
        kind = p.u32(f"{key} type")
        if key in metadata:
            p.fail(f"metadata key {key!r} appears twice")
        metadata[key] = p.value(kind, key)
    tensors, names = [], set()
    for _ in range(n_tensors):
        name = p.string("tensor name")
        n_dims = p.u32(f"{name} n_dims")
        if not 1 <= n_dims <= MAX_DIMS:
            p.fail(f"tensor {name}: {n_dims} dimensions, expected 1 to {MAX_DIMS}")
        dims = tuple(p.u64(f"{name} dims") for _ in range(n_dims))
        ggml_type, offset = p.u32(f"{name} type"), p.u64(f"{name} offset")
        if name in names:
            p.fail(f"tensor {name!r} appears twice")
        names.add(name)
        tensors.append(TensorInfo(name, dims, ggml_type, offset))
    align = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if isinstance(align, bool) or not isinstance(align, int) or not 0 < align <= 1 << 16 or align & (align - 1):
        raise CheckpointError(f"{path}: general.alignment: expected a power of two up to 65536, found {align!r}")
    data_start = -(-p.pos // align) * align
    return Header(version, metadata, tensors, data_start), buf


def _ggml_type(t: TensorInfo, path) -> tuple[str, tuple[int, int] | None]:
    """(name, (values, bytes) per block) of a tensor's ggml type: the ones the engine runs from
    ggml's spec, any other from the gguf package (imported only then: it costs ~70 ms)."""
    if t.ggml_type in GGML_TYPES:
        return GGML_TYPES[t.ggml_type]
    gguf = _gguf()
    try:
        kind = gguf.GGMLQuantizationType(t.ggml_type)
    except ValueError:
        raise CheckpointError(f"{path}: tensor {t.name}: unknown ggml type {t.ggml_type}") from None
    return kind.name, gguf.constants.GGML_QUANT_SIZES.get(kind)


def tensor_views(path, header: Header, buf: np.ndarray) -> dict[str, Stored]:
    """Every tensor as a Stored view of the mapping, its size checked against the file."""
    out = {}
    for t in header.tensors:
        kind, block = _ggml_type(t, path)
        if block is None or t.dims[0] % block[0]:
            raise CheckpointError(f"{path}: tensor {t.name}: {kind} rows of {t.dims[0]} values are not whole blocks")
        shape = tuple(reversed(t.dims))
        n = stored_bytes(kind, shape, block) if kind not in FLOAT_BYTES else stored_bytes(kind, shape)
        start = header.data_start + t.offset
        if start + n > buf.size or math.prod(shape) == 0:
            raise CheckpointError(f"{path}: tensor {t.name}: its {n} bytes at offset {t.offset} lie past the end of "
                                  f"the file ({buf.size} bytes; truncated?)")
        out[t.name] = Stored(t.name, kind, shape, buf[start : start + n], t.ggml_type)
    return out


# ---------------------------------------------------------------------------------------------
# the model


def _get(md: dict, key: str, kind, default=None, where=""):
    value = md.get(key, default)
    if value is None:
        raise CheckpointError(f"{where}: missing metadata {key!r}")
    ok = (isinstance(value, (int, np.integer)) and not isinstance(value, bool)) if kind is int else \
        isinstance(value, (int, float, np.floating)) and not isinstance(value, bool)
    if not ok:
        raise CheckpointError(f"{where}: metadata {key}: expected {'an integer' if kind is int else 'a number'}, "
                              f"found {value!r:.60}")
    if kind is float and isinstance(value, float) and float(np.float32(value)) == value:
        # GGUF stores float32: 1e-5 comes back as 9.99999974e-06; the shortest decimal of that
        # float32 is what was written (the engine rounds to float32 again: the same bits)
        return float(str(np.float32(value)))
    return kind(value)


def model_config(path, md: dict, views: dict) -> ModelConfig:
    """The ModelConfig of a GGUF's metadata; what babyllama cannot run is refused naming the key."""
    where = str(path)
    arch = md.get("general.architecture")
    if arch != "llama":
        raise CheckpointError(f"{where}: general.architecture: expected 'llama', found {arch!r}")
    p = "llama."
    for key, ok in ((p + "expert_count", lambda v: not v), (p + "rope.scaling.type", lambda v: v in ("none", "llama3"))):
        if key in md and not ok(md[key]):
            raise CheckpointError(f"{where}: {key} is {md[key]!r}: babyllama runs dense Llama models with plain or "
                                  "llama3 RoPE only")
    heads = _get(md, p + "attention.head_count", int, where=where)
    dim = _get(md, p + "embedding_length", int, where=where)
    seq_len = _get(md, p + "context_length", int, where=where)
    if not 0 < seq_len <= MAX_CONTEXT:
        raise CheckpointError(f"{where}: {p}context_length: expected 1 to {MAX_CONTEXT}, found {seq_len}")
    window = md.get(p + "attention.sliding_window")
    if window is not None and _get(md, p + "attention.sliding_window", int, where=where) < seq_len:
        raise CheckpointError(f"{where}: {p}attention.sliding_window: expected none or at least the context "
                              f"({seq_len}): babyllama attends to the whole context, found {window}")
    head_dim = _get(md, p + "attention.key_length", int, dim // heads if heads else 0, where)
    for key in (p + "attention.value_length", p + "rope.dimension_count"):
        if key in md and _get(md, key, int, where=where) != head_dim:
            raise CheckpointError(f"{where}: {key}: expected the head size {head_dim} (RoPE over whole heads), "
                                  f"found {md[key]}")
    emb = views.get("token_embd.weight")
    vocab = md.get(p + "vocab_size") or (len(md["tokenizer.ggml.tokens"]) if "tokenizer.ggml.tokens" in md else None) \
        or (emb.shape[0] if emb is not None else None)
    try:
        cfg = ModelConfig(
            dim=dim, hidden_dim=_get(md, p + "feed_forward_length", int, where=where),
            n_layers=_get(md, p + "block_count", int, where=where), n_heads=heads,
            n_kv_heads=_get(md, p + "attention.head_count_kv", int, heads, where), vocab_size=int(vocab or 0),
            seq_len=seq_len, shared_classifier="output.weight" not in views,
            norm_eps=_get(md, p + "attention.layer_norm_rms_epsilon", float, 1e-5, where),
            rope_theta=_get(md, p + "rope.freq_base", float, 10000.0, where), head_dim=head_dim,
        )
    except ConfigError as e:
        raise CheckpointError(f"{where}: invalid model shape ({e})") from None
    if "rope_freqs.weight" in views:
        scaling = llama3_scaling(views["rope_freqs.weight"], cfg, where)
        if scaling is not None:
            cfg = ModelConfig(**{**cfg.to_dict(), "rope_scaling": scaling})
    return cfg


def llama3_frequency_factors(cfg: ModelConfig, s: RopeScaling) -> np.ndarray:
    """llama.cpp's rope_freqs.weight for a llama3 scaling: each frequency's divisor (its converter's
    formula: the factor for long wavelengths, 1 for short ones, a smooth ramp between)."""
    freqs = 1.0 / cfg.rope_theta ** (np.arange(0, cfg.head_dim, 2, dtype=np.float64) / cfg.head_dim)
    wavelen = 2 * math.pi / freqs
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    ramp = 1 / ((1 - smooth) / s.factor + smooth)
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    return np.where(wavelen < high_wavelen, 1.0, np.where(wavelen > low_wavelen, s.factor, ramp)).astype(np.float32)


def llama3_scaling(t: Stored, cfg: ModelConfig, where: str) -> RopeScaling | None:
    """The llama3 RopeScaling whose frequency factors are the stored rope_freqs.weight (None for
    all ones). The factors fix `factor` and, on the ramp, the line (orig / wavelength - low) /
    (high - low), not the three numbers: Meta's constants are tried first (Llama 3.1 and 3.2 use
    them), then low_freq_factor 1 with the rest fitted; any choice that reproduces every factor
    gives the same RoPE."""
    if t.shape != (cfg.head_dim // 2,) or t.kind != "F32":
        raise CheckpointError(f"{where}: rope_freqs.weight: expected F32 ({cfg.head_dim // 2},), found {t.kind} "
                              f"{t.shape}")
    f = t.f32().astype(np.float64)
    if np.all(f == 1.0):
        return None
    for s in _llama3_candidates(f, cfg):
        if np.allclose(llama3_frequency_factors(cfg, s), f, rtol=1e-6, atol=0):
            return s
    raise CheckpointError(f"{where}: rope_freqs.weight: expected llama3 frequency factors, found values that no "
                          "llama3 rope scaling gives")


def _llama3_candidates(f: np.ndarray, cfg: ModelConfig):
    factor = float(f.max())
    if not (math.isfinite(factor) and factor > 1 and np.all(f >= 1.0)):
        return
    wavelen = 2 * math.pi * cfg.rope_theta ** (np.arange(0, cfg.head_dim, 2, dtype=np.float64) / cfg.head_dim)
    ramp = (f > 1.0) & (f < factor)
    full, one = wavelen[f == factor], wavelen[f == 1.0]
    smooth = (1 / f - 1 / factor) / (1 - 1 / factor)  # 0 at the full factor, 1 at no scaling

    def make(low, high, orig):
        try:
            return RopeScaling(factor, float(low), float(high), int(orig))
        except ConfigError:
            return None

    found = [make(1.0, 4.0, 8192)]
    if ramp.sum() >= 2:  # smooth = orig/d * (1/wavelength) - 1/d with d = high - 1
        a, b = np.polyfit(1 / wavelen[ramp], smooth[ramp], 1)
        if b < 0:
            d = -1 / b
            found += [make(1.0, 1 + round(d), round(a * round(d))), make(1.0, 1 + d, round(a * d))]
    elif ramp.sum() == 1:  # one point on the ramp: any orig between it and the full factor's wavelengths
        w, sm = float(wavelen[ramp][0]), float(smooth[ramp][0])
        top = float(full.min()) if full.size else 64 * w
        found += [make(1.0, 1 + (orig / w - 1) / sm, orig) for orig in range(math.floor(w) + 1, math.ceil(top))[:256]]
    else:  # no point on the ramp: a ramp between the last unscaled and the first scaled wavelength
        lo, top = (float(one.max()) if one.size else 0.0), float(full.min())
        for orig in range(math.floor(lo) + 1, math.ceil(top))[:256]:
            found.append(make(1.0, (1 + orig / lo) / 2 if lo else 2.0, orig))
    yield from (s for s in found if s is not None)


def gguf_tensors(path, cfg: ModelConfig, views: dict) -> dict:
    """gather's tensors of a GGUF: llama's names checked; biases and other tensors refused."""
    for name in views:
        if names_a_tensor(GGUF_NAMES, name, cfg.n_layers) or name == "rope_freqs.weight" or \
                name.endswith(".attn_rot_embd"):  # old files store RoPE's unused tables
            continue
        if name.endswith(".bias"):
            raise CheckpointError(f"{path}: tensor {name}: biases are not part of the Llama architecture babyllama "
                                  "runs")
        raise CheckpointError(f"{path}: unexpected tensor {name} (expected llama's token_embd, blk.N.*, output_norm, "
                              "output)")
    return gather(cfg, GGUF_NAMES, views, str(path))


def load_gguf(path, quantize: int | None = None, note=None):
    """(config, weights, metadata) of a GGUF file: F32/F16/BF16 as fp32 Weights, Q8_0 / Q4_0
    repacked into int8 / int4 QuantWeights, other types dequantized (or requantized into the
    file's main quantized type, or into `quantize` bits), each kind of conversion one note."""
    header, buf = read_header(path)
    views = tensor_views(path, header, buf)
    cfg = model_config(path, header.metadata, views)
    tensors = gguf_tensors(path, cfg, views)
    return cfg, build(cfg, tensors, None, quantize, note), header.metadata


def load_gguf_fp32(path) -> tuple[ModelConfig, Weights]:
    """(config, fp32 Weights) of a GGUF, for conversion: every type dequantized."""
    header, buf = read_header(path)
    views = tensor_views(path, header, buf)
    cfg = model_config(path, header.metadata, views)
    tensors = gguf_tensors(path, cfg, views)
    out = {name: (np.stack([t.f32() for t in v]) if isinstance(v, list) else v.f32()) for name, v in tensors.items()}
    return cfg, Weights.from_dict(cfg, out)


# ---------------------------------------------------------------------------------------------
# writing

OUT_TYPES = ("F32", "F16", "Q8_0")


def export_gguf(path, cfg: ModelConfig, weights: Weights, vocab: dict, out_type: str = "F32", inputs=()) -> Path:
    """Write a llama GGUF that llama.cpp loads, atomically: the config as llama.* metadata,
    `vocab` (tokenizer.* metadata: tokenizers/gguf.py's gguf_vocab), the weights in the
    interleaved RoPE layout llama.cpp expects, matrices as `out_type` (F32, F16 or Q8_0; a matrix
    whose rows are not whole Q8_0 blocks is written F16, as llama.cpp's converter does), norms
    F32. Llama 3.1 rope scaling is written as llama.cpp's rope_freqs.weight."""
    gguf = _gguf()
    if out_type not in OUT_TYPES:
        raise CheckpointError(f"GGUF output type {out_type!r}: expected one of {', '.join(OUT_TYPES)}")
    types = gguf.GGMLQuantizationType
    w = gguf.GGUFWriter(None, "llama")
    w.add_name("babyllama export")
    w.add_context_length(cfg.seq_len)
    w.add_embedding_length(cfg.dim)
    w.add_block_count(cfg.n_layers)
    w.add_feed_forward_length(cfg.hidden_dim)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type({"F32": 0, "F16": 1, "Q8_0": 7}[out_type])  # llama_ftype ALL_F32, MOSTLY_F16, MOSTLY_Q8_0
    for key, value in vocab.items():
        _add_value(w, key, value)
    if cfg.rope_scaling is not None:
        w.add_tensor("rope_freqs.weight", llama3_frequency_factors(cfg, cfg.rope_scaling))
    for name in stored_tensors(cfg):
        key, arr = GGUF_NAMES[name], getattr(weights, name)
        for i, a in enumerate(arr if "{i}" in key else [arr]):
            a = np.ascontiguousarray(a, dtype=np.float32)
            tname = key.format(i=i)
            if a.ndim == 1 or out_type == "F32":
                w.add_tensor(tname, a)
            elif out_type == "Q8_0" and a.shape[-1] % 32 == 0:
                w.add_tensor(tname, gguf.quants.quantize(a, types.Q8_0), raw_dtype=types.Q8_0)
            else:
                w.add_tensor(tname, a.astype(np.float16))

    def write(f):
        from gguf.gguf_writer import WriterState

        w.fout, w.state = [f], WriterState.EMPTY  # the writer's own "file already open" state
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()

    return atomic_write(path, write, inputs)


def _add_value(w, key: str, value) -> None:
    """One metadata entry, typed as llama.cpp reads it: ids uint32, scores float32 and token
    types int32 arrays (the writer types a list by its items)."""
    if isinstance(value, bool):
        w.add_bool(key, value)
    elif isinstance(value, str):
        w.add_string(key, value)
    elif isinstance(value, int):
        w.add_uint32(key, value)
    elif isinstance(value, float):
        w.add_float32(key, value)
    else:  # a list, or an array read from another GGUF
        w.add_array(key, value.tolist() if isinstance(value, np.ndarray) else list(value))
