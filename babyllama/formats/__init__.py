"""Model file formats, one module per family: llama2c (.bin v0-v3 and tokenizer.bin), ckpt (the
trainer's ckpt.pt), hf (Hugging Face folders; hf_gpt2 for GPT2LMHeadModel), meta (Meta's
consolidated.*.pth), gguf (llama.cpp's GGUF), llmc (llm.c's GPT-2 gpt2_124M.bin and
gpt2_tokenizer.bin); assemble turns a foreign file's tensors into engine weights.

Each reader returns (ModelConfig, weights) with llama2.c's tensor names and RoPE layout
(arch/llama.py); each writer takes them. `detect_format` and `load_model` route any input for
conversion (fp32); `load_for_inference` routes the inputs the engine runs (.bin, HF folder, GGUF)
and brings the model's own tokenizer."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from ..errors import CheckpointError

FORMATS = ("bin", "torch", "hf", "meta", "gguf", "llmc")


def detect_format(path) -> str:
    """'torch', 'bin', 'hf', 'meta', 'gguf' or 'llmc', from the folder's marker file or the file's first bytes."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such model file or folder")
    if p.is_dir():
        if (p / "config.json").is_file():
            return "hf"
        if (p / "params.json").is_file():
            return "meta"
        raise CheckpointError(f"{p}: expected a Hugging Face folder (config.json) or a Meta folder (params.json), "
                              "found neither")
    if p.suffix in (".pt", ".pth", ".ckpt"):
        return "torch"
    try:
        with open(p, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise CheckpointError(f"{p}: cannot read it ({e.strerror})") from None
    # torch.save writes a zip archive; its legacy format starts with a pickled magic number.
    # (A bare pickle byte 0x80 is not enough: a v0 .bin with dim 128 starts with it too.)
    if head in (b"PK\x03\x04", b"\x80\x02\x8a\x0a"):
        return "torch"
    if head == b"GGUF":
        return "gguf"
    from .llmc import _is_model, _is_tokenizer

    if _is_model(head):  # llm.c's magic 20240326 (a v0 .bin would need dim 20240326)
        return "llmc"
    if _is_tokenizer(head):
        raise CheckpointError(f"{p}: is llm.c's tokenizer file (gpt2_tokenizer.bin), expected a model; pass it as "
                              "the tokenizer (-z)")
    return "bin"


def load_model(path, seq_len: int | None = None):
    """(ModelConfig, fp32 Weights) of any supported model (torch .pt, fp32 .bin, HF folder, Meta
    folder, GGUF: every type dequantized, llm.c .bin). seq_len fills in the context length Meta's params.json
    does not carry."""
    kind = detect_format(path)
    if kind == "torch":
        from .ckpt import load_weights

        return load_weights(path)
    if kind == "bin":
        from .llama2c import load_fp32

        return load_fp32(path)
    if kind == "hf":
        from .hf import load_hf

        return load_hf(path)
    if kind == "gguf":
        from .gguf import load_gguf_fp32

        return load_gguf_fp32(path)
    if kind == "llmc":
        from .llmc import load_llmc

        return load_llmc(path)
    from .meta import load_meta

    return load_meta(path, seq_len)


@dataclass(frozen=True)
class Loaded:
    """A model ready for the engine: its config, weights (fp32 Weights or QuantWeights), the
    model's own tokenizer (HF folders and GGUF files carry one; None for .bin), and a short
    description of what was read and what the engine runs ("v2 gs32", "hf BF16 -> int8 gs64")."""

    path: Path
    kind: str
    config: object
    weights: object
    tokenizer: object | None
    description: str


def note_to_stderr(text: str) -> None:
    print(f"babyllama: note: {text}", file=sys.stderr)


def load_for_inference(path, quantize: int | None = None, own_tokenizer: bool = True, note=note_to_stderr) -> Loaded:
    """Load a llama2.c .bin (v0-v3), a Hugging Face folder, a GGUF file or an llm.c GPT-2 .bin for
    the engine (GPT-2 models run in fp32 only: quantize is refused for them).

    quantize 8 or 4 quantizes float weights at load (int8 / int4, group size as `babyllama
    quantize` picks it; a GGUF Q8_0 / Q4_0 file of those bits is repacked, not requantized).
    own_tokenizer: also load the tokenizer an HF folder or GGUF file carries, or for an llm.c model
    the one beside it (llmc_tokenizer_beside). `note(text)` hears
    one line per conversion a file needs (dequantized or requantized tensors).
    """
    from ..quant import BITS_VERSION

    path = Path(path)
    if quantize is not None and quantize not in BITS_VERSION:
        raise CheckpointError(f"--quantize: expected 8 or 4 bits, got {quantize!r}")
    kind = detect_format(path)
    tokenizer = None
    if kind == "bin":
        from .llama2c import load_checkpoint

        ck = load_checkpoint(path)
        cfg, weights, desc = ck.config, ck.weights, f"v{ck.version}" + (f" gs{ck.group_size}" if ck.group_size else "")
        if quantize is not None:
            if ck.version not in (0, 1):
                raise CheckpointError(f"{path}: is already a quantized v{ck.version} model; --quantize applies to "
                                      "float models")
            weights, desc = _quantized(cfg, weights, quantize, desc)
    elif kind == "hf":
        from .hf import load_hf_model

        cfg, weights = load_hf_model(path, quantize, note)
        desc = "hf " + _describe(weights)
        if own_tokenizer:
            from ..tokenizers.hf import load_folder_tokenizer

            tokenizer = load_folder_tokenizer(path, cfg.vocab_size)
            if cfg.arch == "gpt2":
                from ..tokenizers.gpt2 import gpt2_conventions

                tokenizer = gpt2_conventions(tokenizer)
    elif kind == "gguf":
        from .gguf import load_gguf

        cfg, weights, metadata = load_gguf(path, quantize, note)
        desc = "gguf " + _describe(weights)
        if own_tokenizer:
            from ..tokenizers.gguf import gguf_tokenizer

            tokenizer = gguf_tokenizer(metadata, cfg.vocab_size, path)
    elif kind == "llmc":
        from .llmc import load_llmc

        if quantize is not None:
            raise CheckpointError(f"{path}: --quantize: the GPT-2 engine runs fp32 weights only, found --quantize "
                                  f"{quantize}")
        cfg, weights = load_llmc(path)
        desc = "llm.c fp32"
        if own_tokenizer:
            tokenizer = llmc_tokenizer_beside(path, cfg.vocab_size)
    else:
        raise CheckpointError(f"{path}: is a {'Meta folder' if kind == 'meta' else 'torch checkpoint'}; the engine "
                              "runs .bin, Hugging Face and GGUF models: convert it with `babyllama export` first")
    return Loaded(path, kind, cfg, weights, tokenizer, desc)


def llmc_tokenizer_beside(path, vocab_size: int):
    """The tokenizer in an llm.c model's folder: tokenizer.json or vocab.json + merges.txt (they
    encode), else gpt2_tokenizer.bin (llm.c's own: decode only); TokenizerError when none is there."""
    from ..errors import TokenizerError
    from ..tokenizers import load_tokenizer
    from ..tokenizers.gpt2 import gpt2_conventions

    folder = Path(path).resolve().parent
    for name in ("tokenizer.json", "vocab.json", "gpt2_tokenizer.bin"):
        if (folder / name).is_file() and (name != "vocab.json" or (folder / "merges.txt").is_file()):
            return gpt2_conventions(load_tokenizer(folder / name, vocab_size))
    raise TokenizerError(f"{path}: no tokenizer given and none beside the model (expected gpt2_tokenizer.bin, "
                         f"tokenizer.json or vocab.json + merges.txt in {folder}); pass -z TOKENIZER")


def _quantized(cfg, weights, bits: int, desc: str):
    from ..quant import QuantWeights, choose_group_size

    gs = choose_group_size(cfg, bits)
    return QuantWeights.from_float(weights, gs, bits), f"{desc} -> int{bits} gs{gs}"


def _describe(weights) -> str:
    from ..quant import QuantWeights

    return f"int{weights.bits} gs{weights.group_size}" if isinstance(weights, QuantWeights) else "fp32"
