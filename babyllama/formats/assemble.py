"""Engine weights from the tensors of a foreign model file (Hugging Face safetensors, GGUF).

A reader describes every stored tensor as a `Stored` (its bytes in the mapped file, its dtype,
its shape), names them with llama2.c's names (`gather`), and `build` turns them into what the
engine runs:

- fp32 `Weights`: float32 token_embedding and wcls stay read-only views of the mapped file; each
  per-layer kind (wq of every layer, ...) is stacked once into one (L, rows, cols) array, because
  the engine indexes one array per kind and these files store every layer's tensor on its own.
  fp16 and bf16 are converted to float32 on the way, other GGUF types dequantized (with a note).
- `QuantWeights` (int8 / int4), with `quantize` or from a quantized GGUF: GGUF Q8_0 and Q4_0 blocks
  are repacked into the v2 / v3 layout without requantizing (below); any other tensor is
  quantized from float32 one layer at a time, so a bf16 model is never held whole in float32.

The repack (ggml's block formats, ggml-common.h): a Q8_0 block is an fp16 scale d and 32 int8
values q, w = q * d; a Q4_0 block is an fp16 d and 16 bytes, byte j holding value j in its low
nibble and value j + 16 in its high nibble, each stored as q + 8, w = (nibble - 8) * d. Blocks
run along a row, as v2/v3 groups do. So a block is a group of 32: its values are copied as
they are (for Q4_0 the bytes are exactly v3's, whose nibble order is ggml's) and its scale
becomes float32 (exact). The engine then multiplies the very integers llama.cpp stores.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import numpy as np

from ..arch.llama import LAYER_TENSORS, NORMS, Weights, stored_tensors, tensor_shapes
from ..config import ModelConfig
from ..errors import CheckpointError
from ..quant import QuantMatrix, QuantWeights, choose_group_size, group_size_problem, quantize

FLOAT_BYTES = {"F32": 4, "F16": 2, "BF16": 2}  # dtypes decoded here; ggml's others through gguf.quants
GGML_BLOCKS = {"Q8_0": (32, 34), "Q4_0": (32, 18)}  # (values, bytes) per block: the repackable types
REPACK_BITS = {"Q8_0": 8, "Q4_0": 4}
REPACK_GROUP = 32


@dataclass(frozen=True)
class Stored:
    """One tensor as a file stores it. `raw`: exactly its bytes (uint8, usually a view of the
    mapped file); `kind`: F32, F16, BF16 or a ggml type name; `shape`: row-major, (rows, cols)
    for a matrix; `ggml_type`: the GGUF type number (for dequantizing other ggml types)."""

    key: str
    kind: str
    shape: tuple[int, ...]
    raw: np.ndarray
    ggml_type: int = -1

    def f32(self) -> np.ndarray:
        """The tensor as float32 of `shape`: a view of the file for aligned F32, else a new array."""
        kind, raw = self.kind, self.raw
        if kind == "F32":
            a = raw.view("<f4") if raw.ctypes.data % 4 == 0 else np.frombuffer(raw.tobytes(), "<f4")
        elif kind == "F16":
            a = raw.view("<f2").astype(np.float32)
        elif kind == "BF16":  # the top half of a float32: widen and shift, exact
            a = (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)
        else:
            from gguf.quants import dequantize

            a = dequantize(raw, self.ggml_type).astype(np.float32, copy=False)
        return a.reshape(self.shape)


def stored_bytes(kind: str, shape: tuple[int, ...], block: tuple[int, int] | None = None) -> int:
    """Bytes a tensor of `kind` and `shape` occupies (block: (values, bytes) of a ggml type)."""
    n = math.prod(shape)
    if kind in FLOAT_BYTES:
        return n * FLOAT_BYTES[kind]
    values, size = block if block is not None else GGML_BLOCKS[kind]
    return n // values * size


def gather(cfg: ModelConfig, names: dict[str, str], lookup: dict[str, Stored], where: str) -> dict:
    """llama2.c name -> Stored (or a list per layer) for every tensor the config needs, from a
    file's tensors keyed by its own names (`names`: a format's table, "{i}" marking layers).
    Every shape is checked against the config; missing tensors are named (the first four)."""
    shapes = tensor_shapes(cfg)
    names_needed = stored_tensors(cfg)
    per_layer = sum("{i}" in names[n] for n in names_needed)
    needed = len(names_needed) - per_layer + per_layer * cfg.n_layers
    if needed > len(lookup) + 64:  # before a single key is built from n_layers: it may be absurd
        raise CheckpointError(f"{where}: the config's {cfg.n_layers} layers need {needed} tensors, the file holds "
                              f"{len(lookup)}")
    out, missing = {}, []
    for name in names_needed:
        key = names[name]
        per_layer = "{i}" in key
        keys = [key.format(i=i) for i in range(cfg.n_layers)] if per_layer else [key]
        want = shapes[name][1:] if per_layer else shapes[name]
        parts = []
        for k in keys:
            t = lookup.get(k)
            if t is None:
                missing.append(k)
                continue
            if tuple(t.shape) != want:
                raise CheckpointError(f"{where}: tensor {k}: expected shape {want} from the config, found {tuple(t.shape)}")
            parts.append(t)
        out[name] = parts if per_layer else (parts[0] if parts else None)
    if missing:
        more = f" and {len(missing) - 4} more" if len(missing) > 4 else ""
        raise CheckpointError(f"{where}: missing tensors: expected {', '.join(missing[:4])}{more}, not found")
    return out


def names_a_tensor(names: dict[str, str], key: str, n_layers: int) -> bool:
    """Whether `key` is one of the format's names (`names`, "{i}" marking layers) for a model of
    n_layers, without listing every layer's keys (n_layers may be an absurd header value)."""
    for template in names.values():
        if "{i}" not in template:
            if key == template:
                return True
            continue
        head, tail = template.split("{i}")
        index = key[len(head) : len(key) - len(tail)] if key.startswith(head) and key.endswith(tail) else ""
        if index.isdigit() and str(int(index)) == index and int(index) < n_layers:
            return True
    return False


def _matrices(tensors: dict) -> list[Stored]:
    return [t for name, v in tensors.items() if name not in NORMS for t in (v if isinstance(v, list) else [v])]


def plan(cfg: ModelConfig, tensors: dict, quantize_bits: int | None) -> tuple[int, int, str | None]:
    """(bits, group size, repacked ggml type or None) of the weights to build: fp32 (bits 32)
    unless `quantize_bits` or the file's matrices are mostly Q8_0 / Q4_0 (then those are
    repacked, and int8 or int4 is what the engine runs)."""
    kinds = Counter(t.kind for t in _matrices(tensors))
    ggml = [k for k, _ in kinds.most_common() if k in REPACK_BITS]
    main = ggml[0] if ggml else None
    if quantize_bits is None:
        if main is None:
            return 32, 0, None
        bits, gs = REPACK_BITS[main], REPACK_GROUP
    elif main is not None and REPACK_BITS[main] == quantize_bits:
        bits, gs = quantize_bits, REPACK_GROUP
    else:
        bits, main = quantize_bits, None
        gs = choose_group_size(cfg, bits)
    problem = group_size_problem(cfg, gs, bits)
    if problem and quantize_bits is None:  # a few matrices kept as floats (rows not whole blocks): run fp32
        return 32, 0, None
    if problem:
        raise CheckpointError(f"cannot run this model as int{bits}: {problem}")
    return bits, gs, main


def build(cfg: ModelConfig, tensors: dict, transforms: dict | None = None, quantize_bits: int | None = None,
          note=None):
    """Weights (fp32) or QuantWeights from gather's tensors. `transforms`: per-name functions
    applied to each float32 layer matrix (HF's RoPE row order); `note(text)`: told, in one line
    each, about tensors that are dequantized or requantized."""
    transforms = transforms or {}
    bits, gs, repack = plan(cfg, tensors, quantize_bits)
    _report(tensors, bits, gs, repack, note)
    shapes = tensor_shapes(cfg)
    if bits == 32:
        out = {}
        for name, v in tensors.items():
            if isinstance(v, list):
                out[name] = _stack_f32(v, shapes[name], transforms.get(name))
            elif v is not None:
                out[name] = v.f32()
        return Weights.from_dict(cfg, out)
    norms = {n: _stack_f32(tensors[n], shapes[n], None) if n in LAYER_TENSORS else tensors[n].f32() for n in NORMS}
    mats = {name: _quant_matrix(v if isinstance(v, list) else [v], shapes[name], bits, gs, repack,
                                transforms.get(name))
            for name, v in tensors.items() if name not in NORMS and v is not None}
    if cfg.shared_classifier:
        mats["wcls"] = mats["token_embedding"]
    return QuantWeights(bits, gs, **norms, **mats)


def _report(tensors: dict, bits: int, gs: int, repack: str | None, note) -> None:
    if note is None:
        return
    odd: dict[str, list[str]] = {}
    for t in _matrices(tensors):
        if bits == 32:
            converted = t.kind not in FLOAT_BYTES  # a ggml type, dequantized
        else:  # requantized, or in a repacked file one of the few tensors of another type
            converted = t.kind != repack and (repack is not None or t.kind not in FLOAT_BYTES)
        if converted:
            odd.setdefault(t.kind, []).append(t.key)
    for kind, keys in odd.items():
        if bits == 32:
            what = "dequantized to float32" + (" (babyllama's groups of 32 must tile every row, and a group size "
                                               "of 32 does not divide this model's dim, hidden_dim and q_dim)"
                                               if kind in REPACK_BITS else "")
        else:
            what = f"{'re' if kind not in FLOAT_BYTES else ''}quantized to int{bits} (group size {gs})"
        listed = ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
        note(f"{len(keys)} tensor(s) stored as {kind} are {what}: {listed}")


def _stack_f32(parts: list[Stored], shape: tuple[int, ...], transform) -> np.ndarray:
    out = np.empty(shape, np.float32)
    for i, t in enumerate(parts):
        a = t.f32()
        out[i] = transform(a) if transform is not None else a
    return out


def _repacked(t: Stored) -> tuple[np.ndarray, np.ndarray]:
    """(values as int8 bytes, float32 scales) of a Q8_0 or Q4_0 tensor: its blocks split apart."""
    blocks = t.raw.reshape(-1, GGML_BLOCKS[t.kind][1])
    scales = np.ascontiguousarray(blocks[:, :2]).view("<f2").reshape(-1).astype(np.float32)
    return blocks[:, 2:].reshape(-1).view(np.int8), scales


def _quant_matrix(parts: list[Stored], shape: tuple[int, ...], bits: int, gs: int, repack: str | None,
                  transform) -> QuantMatrix:
    rows, cols = shape[-2:]
    value_bytes = rows * cols * bits // 8
    data = np.empty(len(parts) * value_bytes, np.int8)
    scales = np.empty((len(parts), rows * cols // gs), np.float32)
    for i, t in enumerate(parts):
        if t.kind == repack and transform is None:
            values, s = _repacked(t)
        else:
            w = t.f32()
            values, s = quantize(transform(w) if transform is not None else w, gs, bits)
        data[i * value_bytes : (i + 1) * value_bytes] = values.view(np.int8)
        scales[i] = s
    offsets = np.arange(len(parts), dtype=np.int64) * value_bytes
    return QuantMatrix(bits, gs, tuple(shape), data, offsets, scales)
