"""llm.c's files (Karpathy's GPT-2 in C): the model checkpoint gpt2_124M.bin and the tokenizer
gpt2_tokenizer.bin, read and written. All little-endian.

Model (train_gpt2.py's write_model, train_gpt2.c's gpt2_build_from_checkpoint):
  header  256 x int32: [20240326, version, maxT, V, L, NH, C, Vp, 0 ...] (1024 bytes)
          version 3: every parameter fp32; version 5 (llm.c's CUDA code): every parameter bf16
  params  the 16 tensors of arch.gpt2.LLMC_ORDER, each stacked over layers, matrices (out, in);
          wte has Vp rows (V rounded up to a multiple of 128), the padding rows zero and unused.
llm.c's block is GPT-2's with hidden = 4 * C and LayerNorm eps 1e-5, both fixed in its code, so
a model with other values is refused by the writer, never written as something else.

Tokenizer (train_gpt2.py's write_tokenizer, llmc/tokenizer.h):
  header  256 x uint32: [20240328, version, vocab_size, eot_token (version 2), 0 ...]
          version 1 has no eot field: llm.c assumes GPT-2's 50257 tokens and eot 50256
  tokens  per token: uint8 length (1..255), then its bytes (special tokens as their text)
It holds each token's bytes only, no BPE merges: enough to decode, not to encode
(tokenizers/llmc.py).

Reading checks the header's values and the file's exact size before touching a weight, and maps
the file: fp32 tensors are read-only views of it (no copy); bf16 ones are widened to fp32.
Writing is atomic (fileio.atomic_write) and always version 3 (what train_gpt2.c reads).
"""

from __future__ import annotations

import math
import struct
from pathlib import Path

import numpy as np

from ..arch.gpt2 import LLMC_ORDER, Weights, tensor_shapes
from ..config import ModelConfig
from ..errors import CheckpointError, ConfigError, TokenizerError
from ..fileio import atomic_write, map_readonly, regular_file_size

MODEL_MAGIC = 20240326
TOKENIZER_MAGIC = 20240328
HEADER_INTS = 256
HEADER_BYTES = 4 * HEADER_INTS
MODEL_VERSIONS = {3: 4, 5: 2}  # version -> bytes per parameter (3 fp32, 5 bf16)
VOCAB_MULTIPLE = 128  # train_gpt2.py's pad_vocab
LLMC_NORM_EPS = 1e-5  # layernorm_forward's eps in train_gpt2.c
LIMIT = 1 << 24  # any header value above this is a broken file, not a model (GPT-2 XL: C 1600, V 50257)


def padded_vocab(v: int) -> int:
    """V rounded up to a multiple of 128, as llm.c pads wte (50257 -> 50304)."""
    return (v + VOCAB_MULTIPLE - 1) // VOCAB_MULTIPLE * VOCAB_MULTIPLE


def _shapes(cfg: ModelConfig, vp: int) -> list[tuple[str, tuple[int, ...]]]:
    shapes = tensor_shapes(cfg)
    shapes["token_embedding"] = (vp, cfg.dim)
    return [(name, shapes[name]) for name, _ in LLMC_ORDER]


def _is_model(head: bytes) -> bool:
    return len(head) >= 4 and struct.unpack_from("<i", head)[0] == MODEL_MAGIC


def _is_tokenizer(head: bytes) -> bool:
    return len(head) >= 4 and struct.unpack_from("<I", head)[0] == TOKENIZER_MAGIC


def magic_of(path) -> str | None:
    """'model' or 'tokenizer' when the file starts with llm.c's magic number, else None."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return None
    return "model" if _is_model(head) else "tokenizer" if _is_tokenizer(head) else None


# ---------------------------------------------------------------------------------------------
# gpt2_124M.bin


def read_model_header(path, size: int, buf) -> tuple[int, ModelConfig, int]:
    """(version, ModelConfig, Vp) of an llm.c model file whose first bytes are `buf`, checked
    against the file's `size` (nothing is allocated from the header's values)."""
    if size < HEADER_BYTES:
        raise CheckpointError(f"{path}: truncated llm.c model: expected a {HEADER_BYTES}-byte header, found "
                              f"{size} bytes")
    h = struct.unpack_from(f"<{HEADER_INTS}i", buf, 0)
    if h[0] != MODEL_MAGIC:
        raise CheckpointError(f"{path}: expected llm.c's model magic {MODEL_MAGIC}, found {h[0]}")
    version = h[1]
    if version not in MODEL_VERSIONS:
        raise CheckpointError(f"{path}: llm.c model version: expected 3 (fp32) or 5 (bf16), found {version}")
    names = ("maxT", "V", "L", "NH", "C", "Vp")
    for name, value in zip(names, h[2:8]):
        if not 0 < value <= LIMIT:
            raise CheckpointError(f"{path}: llm.c header {name}: expected a positive integer up to {LIMIT}, "
                                  f"found {value}")
    max_t, v, n_layers, n_heads, c, vp = h[2:8]
    if vp < v:
        raise CheckpointError(f"{path}: llm.c header: expected padded vocab Vp >= V ({v}), found {vp}")
    try:
        cfg = ModelConfig(dim=c, hidden_dim=4 * c, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_heads,
                          vocab_size=v, seq_len=max_t, norm_eps=LLMC_NORM_EPS, arch="gpt2")
    except ConfigError as e:
        raise CheckpointError(f"{path}: llm.c header: {e}") from None
    expected = HEADER_BYTES + MODEL_VERSIONS[version] * sum(math.prod(s) for _, s in _shapes(cfg, vp))
    if size != expected:
        what = "truncated" if size < expected else "has trailing bytes"
        raise CheckpointError(f"{path}: llm.c model {what}: the v{version} header (V {v}, Vp {vp}, L {n_layers}, "
                              f"C {c}, maxT {max_t}) implies {expected} bytes, found {size}")
    return version, cfg, vp


def load_llmc(path) -> tuple[ModelConfig, Weights]:
    """(config, fp32 GPT-2 Weights) of an llm.c model file. v3 tensors are read-only views of the
    mapped file (token_embedding the first V rows of the padded wte); v5's bf16 become fp32."""
    path = Path(path)
    size = regular_file_size(path, CheckpointError, "llm.c model file")
    buf = map_readonly(path, CheckpointError, "llm.c model file")
    version, cfg, vp = read_model_header(path, size, buf[:HEADER_BYTES] if size >= HEADER_BYTES else buf)
    width = MODEL_VERSIONS[version]
    offset, tensors = HEADER_BYTES, {}
    for name, shape in _shapes(cfg, vp):
        n = math.prod(shape) * width
        raw = buf[offset : offset + n]
        if version == 3:
            arr = raw.view("<f4").reshape(shape)
        else:  # bf16 is the top half of a float32: widen and shift, exact
            arr = (raw.view("<u2").astype(np.uint32) << 16).view(np.float32).reshape(shape)
        tensors[name] = arr
        offset += n
    tensors["token_embedding"] = tensors["token_embedding"][: cfg.vocab_size]  # the padding rows are no tokens
    return cfg, Weights.from_dict(cfg, tensors)


def check_llmc_can_hold(cfg: ModelConfig) -> None:
    """Refuse what llm.c's fixed block cannot express (it hard-codes these values)."""
    if cfg.arch != "gpt2":
        raise CheckpointError(f"llm.c's files hold GPT-2 models; this one is {cfg.arch!r} (export it to .bin, HF or "
                              "GGUF instead)")
    if cfg.hidden_dim != 4 * cfg.dim:
        raise CheckpointError(f"llm.c's GPT-2 has hidden = 4 * dim ({4 * cfg.dim}); this model's hidden_dim is "
                              f"{cfg.hidden_dim}")
    if cfg.norm_eps != LLMC_NORM_EPS:
        raise CheckpointError(f"llm.c's LayerNorm eps is {LLMC_NORM_EPS}; this model's norm_eps is {cfg.norm_eps}")


def write_llmc(path, cfg: ModelConfig, weights: Weights, inputs=()) -> Path:
    """Write an llm.c version 3 (fp32) model file, wte padded with zero rows to a multiple of 128."""
    check_llmc_can_hold(cfg)
    vp = padded_vocab(cfg.vocab_size)
    header = np.zeros(HEADER_INTS, "<i4")
    header[:8] = (MODEL_MAGIC, 3, cfg.seq_len, cfg.vocab_size, cfg.n_layers, cfg.n_heads, cfg.dim, vp)

    def write(f):
        f.write(header.tobytes())
        for name, shape in _shapes(cfg, vp):
            arr = np.ascontiguousarray(getattr(weights, name), dtype="<f4")
            f.write(arr.tobytes())
            if name == "token_embedding" and vp > cfg.vocab_size:
                f.write(bytes(4 * (vp - cfg.vocab_size) * cfg.dim))

    return atomic_write(path, write, inputs)


# ---------------------------------------------------------------------------------------------
# gpt2_tokenizer.bin


def read_llmc_tokenizer(path) -> tuple[list[bytes], int]:
    """(every token's bytes, eot id) of an llm.c tokenizer file, checked end to end."""
    path = Path(path)
    size = regular_file_size(path, TokenizerError, "llm.c tokenizer file")
    data = memoryview(map_readonly(path, TokenizerError, "llm.c tokenizer file"))
    if size < HEADER_BYTES:
        raise TokenizerError(f"{path}: truncated llm.c tokenizer: expected a {HEADER_BYTES}-byte header, found "
                             f"{size} bytes")
    magic, version, n, eot = struct.unpack_from("<4I", data, 0)
    if magic != TOKENIZER_MAGIC:
        raise TokenizerError(f"{path}: expected llm.c's tokenizer magic {TOKENIZER_MAGIC}, found {magic}")
    if version not in (1, 2):
        raise TokenizerError(f"{path}: llm.c tokenizer version: expected 1 or 2, found {version}")
    if version == 1:  # tokenizer.h: version 1 is GPT-2's own vocabulary, eot 50256
        if n != 50257:
            raise TokenizerError(f"{path}: a version 1 llm.c tokenizer holds GPT-2's 50257 tokens, found {n}")
        eot = 50256
    # each record is at least 2 bytes, so a count the file cannot hold is refused before parsing
    if not 0 < n <= (size - HEADER_BYTES) // 2:
        raise TokenizerError(f"{path}: llm.c tokenizer: {n} tokens cannot fit in {size - HEADER_BYTES} bytes")
    if eot >= n:
        raise TokenizerError(f"{path}: llm.c tokenizer: eot token {eot} is out of range for {n} tokens")
    pieces, offset = [], HEADER_BYTES
    for i in range(n):
        length = data[offset] if offset < size else -1
        if length <= 0 or offset + 1 + length > size:
            found = "the file ends" if length < 0 else "length 0" if length == 0 else \
                f"length {length} with {size - offset - 1} bytes left"
            raise TokenizerError(f"{path}: llm.c tokenizer: token {i} of {n}: expected 1..255 bytes, found {found}")
        pieces.append(bytes(data[offset + 1 : offset + 1 + length]))
        offset += 1 + length
    if offset != size:
        raise TokenizerError(f"{path}: llm.c tokenizer has trailing bytes: {n} tokens end at byte {offset}, the file "
                             f"has {size}")
    return pieces, eot


def write_llmc_tokenizer(path, pieces: list[bytes], eot: int, inputs=()) -> Path:
    """Write an llm.c version 2 tokenizer file (every piece 1..255 bytes, as tokenizer.h asserts)."""
    if not 0 <= eot < len(pieces):
        raise TokenizerError(f"eot token {eot} is out of range for {len(pieces)} tokens")
    for i, p in enumerate(pieces):
        if not 0 < len(p) < 256:
            raise TokenizerError(f"token {i}: llm.c's tokenizer file holds 1..255 bytes per token, found {len(p)}")
    header = np.zeros(HEADER_INTS, "<u4")
    header[:4] = (TOKENIZER_MAGIC, 2, len(pieces), eot)

    def write(f):
        f.write(header.tobytes())
        for p in pieces:
            f.write(bytes([len(p)]))
            f.write(p)

    return atomic_write(path, write, inputs)
