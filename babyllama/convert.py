"""Conversions between model files: any reader to any writer (formats/), the tokenizer files that
go beside a converted model, and fp32 -> int8/int4 quantization of a .bin.

  readers   torch ckpt.pt (formats/ckpt)  llama2.c .bin v0/v1 (formats/llama2c)  HF folder (formats/hf)
            Meta folder (formats/meta)  GGUF (formats/gguf, every type dequantized)  llm.c .bin (formats/llmc)
  writers   llama2.c .bin v0-v3   HF folder   torch ckpt.pt (weights only)   GGUF F32/F16/Q8_0 (with the tokenizer)
            llm.c .bin v3 (GPT-2 only; gpt2_tokenizer.bin beside it)

Every reader returns (ModelConfig, Weights) and every writer takes them, so any input converts to
any output; a hyperparameter the output format cannot hold is refused, never dropped (v0 holds
only llama2.c's defaults). No output may be one of the inputs (the same file by any name).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .arch.llama import Weights
from .config import ModelConfig
from .errors import CheckpointError, OutputError, TokenizerError
from .fileio import same_file
from .formats import load_model
from .formats.llama2c import (
    VERSIONS, load_checkpoint, read_tokenizer_bin, write_checkpoint, write_quantized_checkpoint, write_tokenizer_bin,
)
from .quant import BITS_VERSION

TARGETS = ("bin", "hf", "pt", "gguf", "llmc")


def export_bin(path, cfg: ModelConfig, weights: Weights, version: int = 0, inputs=()) -> Path:
    """Write a llama2.c .bin of any version: 0 and 1 fp32, 2 int8 and 3 int4 with the default
    group size (quant.choose_group_size)."""
    if version in (0, 1):
        return write_checkpoint(path, cfg, weights, version, inputs)
    if version in VERSIONS:
        write_quantized_checkpoint(path, cfg, weights, version, inputs=inputs)
        return Path(path)
    raise CheckpointError(f"unknown .bin version {version}: expected one of {', '.join(map(str, VERSIONS))}")


def convert(src, dst, to: str = "bin", version: int = 0, tokenizer=None, seq_len: int | None = None,
            gguf_type: str = "F32") -> Path:
    """Convert the model at `src` to `dst` (a .bin, .pt or .gguf file, or an HF folder).

    With `tokenizer` (a sentencepiece .model or a tokenizer.bin) the tokenizer is written next
    to the model: tokenizer.bin beside a .bin/.pt; inside an HF folder tokenizer.bin and, from a
    .model, the files transformers' AutoTokenizer reads. Everything is checked before anything
    is written: the target, the version, the model, the tokenizer's size.
    A GGUF (`gguf_type` F32, F16 or Q8_0) carries its tokenizer inside: `tokenizer` (any kind
    load_tokenizer reads), else the input's own (HF folder, GGUF), else tokenizer.bin beside it.
    """
    if to not in TARGETS:
        raise CheckpointError(f"unknown export target {to!r}: expected one of {', '.join(TARGETS)}")
    if to == "gguf":
        return _convert_gguf(src, dst, tokenizer, seq_len, gguf_type)
    if to != "bin" and version != 0:
        raise CheckpointError(f"--version applies to --to bin only, found --to {to} --version {version}")
    if to == "bin" and version not in VERSIONS:
        raise CheckpointError(f"unknown .bin version {version}: expected one of {', '.join(map(str, VERSIONS))}")
    dst = Path(dst)
    if tokenizer is not None and to != "hf" and dst.name == "tokenizer.bin":
        raise OutputError(f"{dst}: the model would be overwritten by the tokenizer.bin written beside it; "
                          "name the model otherwise")
    cfg, weights = load_model(src, seq_len)
    if cfg.arch == "gpt2" or to == "llmc":
        return _convert_gpt2(src, dst, to, cfg, weights, tokenizer)
    vocab = read_vocabulary(tokenizer, cfg.vocab_size) if tokenizer is not None else None
    inputs = [src] + ([tokenizer] if tokenizer is not None else [])
    if to == "hf":
        from .formats.hf import export_hf

        export_hf(dst, cfg, weights, inputs)
    elif to == "bin":
        export_bin(dst, cfg, weights, version, inputs)
    else:
        from .formats.ckpt import save_weights

        save_weights(dst, cfg, weights, inputs)
    if vocab is not None:
        write_tokenizer(vocab, dst if to == "hf" else dst.parent, hf=(to == "hf"), max_length=cfg.seq_len,
                        inputs=inputs)
    return dst


def _own_gpt2_tokenizer(src, vocab_size: int):
    """The tokenizer an HF GPT-2 folder holds or an llm.c model has beside it, else None."""
    from .errors import BabyLlamaError
    from .formats import detect_format, llmc_tokenizer_beside
    from .tokenizers.hf import load_folder_tokenizer

    kind = detect_format(src)
    try:
        if kind == "hf":
            return load_folder_tokenizer(src, vocab_size)
        if kind == "llmc":
            return llmc_tokenizer_beside(src, vocab_size)
    except BabyLlamaError:
        return None
    return None


def _convert_gpt2(src, dst, to: str, cfg: ModelConfig, weights, tokenizer) -> Path:
    """A GPT-2 model to an llm.c .bin (+ gpt2_tokenizer.bin beside it), an HF folder (+ tokenizer.json)
    or a ckpt.pt. The tokenizer: `tokenizer` (tokenizer.json, vocab.json, gpt2_tokenizer.bin or a
    folder), else the input's own when the target can hold it. All is checked before writing."""
    from .formats.llmc import check_llmc_can_hold, write_llmc, write_llmc_tokenizer
    from .tokenizers import load_tokenizer
    from .tokenizers.gpt2 import gpt2_conventions, llmc_pieces

    dst = Path(dst)
    if to == "llmc":
        check_llmc_can_hold(cfg)
    elif to not in ("hf", "pt"):
        raise CheckpointError(f"a GPT-2 model (arch 'gpt2') exports to llmc, hf or pt; found --to {to} (a llama2.c "
                              ".bin and GGUF hold Llama models)")
    if to == "pt" and tokenizer is not None:
        raise TokenizerError("--to pt writes weights only; pass the GPT-2 tokenizer to --to llmc or --to hf")
    inputs = [src] + ([tokenizer] if tokenizer is not None else [])
    tok = None
    if tokenizer is not None:
        tok = gpt2_conventions(load_tokenizer(tokenizer, cfg.vocab_size))
    elif to != "pt":
        tok = _own_gpt2_tokenizer(src, cfg.vocab_size)
        if to == "hf" and not hasattr(tok, "_tk"):
            tok = None  # gpt2_tokenizer.bin alone cannot make an HF tokenizer: the folder gets none
    if to == "llmc":
        pieces = llmc_pieces(tok) if tok is not None else None
        if pieces is not None and dst.name == "gpt2_tokenizer.bin":
            raise OutputError(f"{dst}: the model would be overwritten by the gpt2_tokenizer.bin written beside it")
        write_llmc(dst, cfg, weights, inputs)
        if pieces is not None:
            out = dst.parent / "gpt2_tokenizer.bin"
            if tok.path is None or not same_file(tok.path, out):
                write_llmc_tokenizer(out, *pieces, inputs=inputs)
        return dst
    if to == "hf":
        from .formats.hf_gpt2 import export_hf_gpt2, write_gpt2_tokenizer

        if tokenizer is not None and not hasattr(tok, "_tk"):
            raise TokenizerError(f"{tokenizer}: an HF GPT-2 folder needs a BPE tokenizer (tokenizer.json or vocab.json "
                                 "+ merges.txt); llm.c's gpt2_tokenizer.bin has no merges")
        export_hf_gpt2(dst, cfg, weights, inputs, eot=tok.bos_id if tok is not None else None)
        if tok is not None and not (tok.path is not None and same_file(Path(tok.path).parent, dst)):
            write_gpt2_tokenizer(dst, tok, cfg.seq_len, inputs)
        return dst
    from .formats.ckpt import save_weights

    save_weights(dst, cfg, weights, inputs)
    return dst


def _convert_gguf(src, dst, tokenizer, seq_len, gguf_type: str) -> Path:
    from .formats import detect_format
    from .formats.gguf import OUT_TYPES, export_gguf
    from .tokenizers import load_tokenizer
    from .tokenizers.gguf import gguf_vocab

    if gguf_type not in OUT_TYPES:
        raise CheckpointError(f"--gguf-type {gguf_type!r}: expected one of {', '.join(OUT_TYPES)}")
    cfg, weights = load_model(src, seq_len)
    if cfg.arch != "llama":
        raise CheckpointError(f"GGUF export writes Llama models; this one is {cfg.arch!r} (--to llmc or --to hf)")
    if tokenizer is None and detect_format(src) in ("hf", "gguf"):
        tokenizer = src
    if tokenizer is None:
        beside = Path(src).resolve().parent / "tokenizer.bin"
        if not beside.is_file():
            raise TokenizerError(f"a GGUF file carries its tokenizer: pass --tokenizer (tokenizer.bin, .model or "
                                 f"tokenizer.json); none found at {beside}")
        tokenizer = beside
    vocab = gguf_vocab(load_tokenizer(tokenizer, cfg.vocab_size))
    return export_gguf(dst, cfg, weights, vocab, gguf_type, inputs=[src, tokenizer])


# ---------------------------------------------------------------------------------------------
# tokenizers beside a model


@dataclass(frozen=True)
class Vocabulary:
    """A tokenizer read for writing beside a model: llama2.c's pieces and scores, and for a
    sentencepiece source the .model itself and its <unk>, <s>, </s> pieces (for transformers)."""

    source: Path
    pieces: list[bytes]
    scores: list[float]
    max_token_length: int | None = None  # None: the longest piece
    sentencepiece: bool = False
    special: dict | None = None


def read_vocabulary(tokenizer, vocab_size: int) -> Vocabulary:
    """Read a sentencepiece .model or a tokenizer.bin, checking it holds vocab_size tokens."""
    tokenizer = Path(tokenizer)
    if tokenizer.suffix != ".model":
        return Vocabulary(tokenizer, *read_tokenizer_bin(tokenizer, vocab_size))
    from .data.vocab import llama2c_pieces, load_sentencepiece

    pieces, scores = llama2c_pieces(tokenizer)
    if len(pieces) != vocab_size:
        raise TokenizerError(f"{tokenizer}: expected {vocab_size} tokens for this model, found {len(pieces)}")
    sp = load_sentencepiece(tokenizer)
    special = {"unk": sp.id_to_piece(0), "bos": sp.id_to_piece(1), "eos": sp.id_to_piece(2)}
    return Vocabulary(tokenizer, pieces, scores, sentencepiece=True, special=special)


def write_tokenizer(vocab: Vocabulary, out_dir, hf: bool = False, max_length: int = 2048, inputs=()) -> Path:
    """Write out_dir/tokenizer.bin (unless it is the source itself); with hf and a sentencepiece
    source also tokenizer.model, tokenizer_config.json and special_tokens_map.json."""
    out = Path(out_dir) / "tokenizer.bin"
    if not same_file(vocab.source, out):
        write_tokenizer_bin(out, vocab.pieces, vocab.scores, vocab.max_token_length, inputs)
    if hf and vocab.sentencepiece:
        from .formats.hf import write_hf_tokenizer

        in_place = same_file(vocab.source, Path(out_dir) / "tokenizer.model")
        write_hf_tokenizer(out_dir, None if in_place else vocab.source.read_bytes(), vocab.special, max_length, inputs)
    return out


# ---------------------------------------------------------------------------------------------
# quantization


def quantize_file(src, dst, bits: int = 8, group_size: int | None = None) -> int:
    """Quantize the fp32 model at src into dst (v2 for 8 bits, v3 for 4); return the group size.

    group_size None: the largest size <= 64 that divides dim and hidden_dim (quant.choose_group_size).
    """
    if bits not in BITS_VERSION:
        raise CheckpointError(f"bits must be one of {', '.join(map(str, BITS_VERSION))}, got {bits!r}")
    from .formats import detect_format, load_for_inference

    if detect_format(src) == "llmc":
        raise CheckpointError(f"{src}: is an llm.c GPT-2 model; the GPT-2 engine runs fp32 weights only (no int8/int4)")
    if detect_format(src) in ("hf", "gguf"):  # quantized layer by layer at load; GGUF Q8_0 / Q4_0 repacked as they are
        if group_size is None:
            loaded = load_for_inference(src, bits, own_tokenizer=False)
            cfg, weights = loaded.config, loaded.weights
        else:
            cfg, weights = load_model(src)
        return write_quantized_checkpoint(dst, cfg, weights, BITS_VERSION[bits], group_size, inputs=[src])
    ck = load_checkpoint(src)
    if ck.version not in (0, 1):
        raise CheckpointError(f"{src}: is already a quantized v{ck.version} model; quantize from the fp32 (v0/v1) "
                              "original")
    return write_quantized_checkpoint(dst, ck.config, ck.weights, BITS_VERSION[bits], group_size, inputs=[src])
