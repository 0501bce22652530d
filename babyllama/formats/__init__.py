"""Model file formats, one module per family: llama2c (.bin v0-v3 and tokenizer.bin), ckpt (the
trainer's ckpt.pt), hf (Hugging Face folders), meta (Meta's consolidated.*.pth).

Each reader returns (ModelConfig, weights) with llama2.c's tensor names and RoPE layout
(arch/llama.py); each writer takes them. `detect_format` and `load_model` route any input."""

from __future__ import annotations

from pathlib import Path

from ..errors import CheckpointError

FORMATS = ("bin", "torch", "hf", "meta")


def detect_format(path) -> str:
    """'torch', 'bin', 'hf' or 'meta', from the folder's marker file or the file's first bytes."""
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
    with open(p, "rb") as f:
        head = f.read(4)
    # torch.save writes a zip archive; its legacy format starts with a pickled magic number.
    # (A bare pickle byte 0x80 is not enough: a v0 .bin with dim 128 starts with it too.)
    if head in (b"PK\x03\x04", b"\x80\x02\x8a\x0a"):
        return "torch"
    return "bin"


def load_model(path, seq_len: int | None = None):
    """(ModelConfig, fp32 Weights) of any supported model (torch .pt, fp32 .bin, HF folder, Meta
    folder). seq_len fills in the context length Meta's params.json does not carry."""
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
    from .meta import load_meta

    return load_meta(path, seq_len)
