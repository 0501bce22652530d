"""Hugging Face GPT-2 folders (transformers' GPT2LMHeadModel): config.json + safetensors, read
for the engine and for conversion, and written so `GPT2LMHeadModel.from_pretrained` loads them.
formats/hf.py routes here by config.json's model_type "gpt2" (reading) or the config's arch
(writing); the folder plumbing (safetensors mapping, shards, JSON) is hf.py's.

What travels: n_embd, n_layer, n_head, n_positions, vocab_size, n_inner (null = 4 * n_embd),
layer_norm_epsilon. What babyllama's GPT-2 block cannot run is refused naming the field:
activation functions other than gelu_new (GPT-2's tanh GELU), unscaled or layer-scaled attention,
cross-attention, an untied lm_head. Tensors are F32, F16 or BF16; the four Conv1D matrices are
stored (in, out) and transposed on the way in and out (arch.gpt2.hf_transforms). Files saved
from GPT2Model (the hub's original gpt2) name tensors without "transformer."; both are read,
and the causal-mask buffers older files carry (attn.bias, attn.masked_bias) are skipped.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from ..arch.gpt2 import HF_NAMES, Weights, collect, hf_transforms, spread
from ..config import ModelConfig
from ..errors import CheckpointError, ConfigError
from ..fileio import make_folder, write_bytes

ARCHITECTURES = ("GPT2LMHeadModel", "GPT2Model")
ACTIVATION = "gelu_new"  # the tanh approximation; "gelu" (exact erf) would change every logit
MAX_CONTEXT = 1 << 24
_BUFFER = re.compile(r"^(transformer\.)?h\.\d+\.attn\.(bias|masked_bias)$")  # causal masks, not weights


def model_config(folder, c: dict) -> ModelConfig:
    """The ModelConfig of a GPT-2 config.json; what babyllama cannot run is refused naming the key."""
    from .hf import _positive_int

    where = Path(folder) / "config.json"
    archs = c.get("architectures") or []
    if not isinstance(archs, list) or any(a not in ARCHITECTURES for a in archs):
        raise CheckpointError(f"{where}: architectures: expected GPT2LMHeadModel, found {archs!r}")
    act = c.get("activation_function", ACTIVATION)
    if act != ACTIVATION:
        raise CheckpointError(f"{where}: activation_function: expected {ACTIVATION!r} (GPT-2's tanh GELU, what "
                              f"babyllama runs), found {act!r}")
    unsupported = {
        "scale_attn_weights": (c.get("scale_attn_weights", True), True),
        "scale_attn_by_inverse_layer_idx": (c.get("scale_attn_by_inverse_layer_idx", False), False),
        "add_cross_attention": (c.get("add_cross_attention", False), False),
        "tie_word_embeddings": (c.get("tie_word_embeddings", True), True),
    }
    for key, (found, expected) in unsupported.items():
        if found != expected:
            raise CheckpointError(f"{where}: {key}: expected {expected!r} (GPT-2's block), found {found!r}")
    dim = _positive_int(where, c, "n_embd")
    inner = c.get("n_inner")
    hidden = 4 * dim if inner is None else _positive_int(where, c, "n_inner")
    seq_len = _positive_int(where, c, "n_positions", c.get("n_ctx"), MAX_CONTEXT)
    eps = c.get("layer_norm_epsilon", 1e-5)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise CheckpointError(f"{where}: layer_norm_epsilon: expected a positive number, found {eps!r}")
    heads = _positive_int(where, c, "n_head")
    try:
        return ModelConfig(dim=dim, hidden_dim=hidden, n_layers=_positive_int(where, c, "n_layer"), n_heads=heads,
                           n_kv_heads=heads, vocab_size=_positive_int(where, c, "vocab_size"), seq_len=seq_len,
                           norm_eps=float(eps), arch="gpt2")
    except ConfigError as e:
        raise CheckpointError(f"{where}: invalid model shape ({e})") from None


def hf_config(cfg: ModelConfig, eot: int | None = None) -> dict:
    """config.json for transformers' GPT2LMHeadModel (eot: the <|endoftext|> id, when known)."""
    out = {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "n_embd": cfg.dim,
        "n_layer": cfg.n_layers,
        "n_head": cfg.n_heads,
        "n_positions": cfg.seq_len,
        "n_inner": None if cfg.hidden_dim == 4 * cfg.dim else cfg.hidden_dim,
        "vocab_size": cfg.vocab_size,
        "layer_norm_epsilon": cfg.norm_eps,
        "activation_function": ACTIVATION,
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
    }
    if eot is not None:
        out.update(bos_token_id=eot, eos_token_id=eot)
    return out


def load_hf_gpt2(folder, c: dict) -> tuple[ModelConfig, Weights]:
    """(config, fp32 Weights) of a GPT-2 folder whose config.json is `c`."""
    from .hf import _shard_names, map_safetensors

    folder = Path(folder)
    cfg = model_config(folder, c)
    lookup = {}
    for name in _shard_names(folder):
        for key, stored in map_safetensors(folder / name).items():
            if _BUFFER.match(key):
                continue
            full = key if key.startswith(("transformer.", "lm_head.")) else "transformer." + key
            lookup[full] = stored
    if cfg.n_layers * 12 > len(lookup):  # before a key is built from n_layer: it may be absurd
        raise CheckpointError(f"{folder}: config.json's n_layer {cfg.n_layers} needs {cfg.n_layers * 12 + 4} tensors, "
                              f"the safetensors hold {len(lookup)}")
    known = {HF_NAMES[n].format(i=i) for n in HF_NAMES for i in range(cfg.n_layers)}
    for key in sorted(lookup):
        if key not in known:
            raise CheckpointError(f"{folder}: unexpected tensor {key} (expected GPT2LMHeadModel's transformer.* "
                                  "and lm_head.weight)")
    weights = collect(lambda k: lookup[k].f32() if k in lookup else None, HF_NAMES, cfg, str(folder),
                      hf_transforms(cfg, to_hf=False))
    head = lookup.get("lm_head.weight")
    if head is not None:  # transformers may save the tied head too; it must be the embedding itself
        arr = head.f32()
        if arr.shape != weights.token_embedding.shape or not np.array_equal(arr, weights.token_embedding):
            raise CheckpointError(f"{folder}: tensor lm_head.weight differs from transformer.wte.weight: babyllama's "
                                  "GPT-2 ties the classifier to the embedding (expected equal or absent)")
    return cfg, weights


def export_hf_gpt2(out_dir, cfg: ModelConfig, weights: Weights, inputs=(), eot: int | None = None) -> Path:
    """Write out_dir/model.safetensors (lm_head left out: tied) and config.json (last), atomically."""
    from .hf import _json_bytes, _safetensors

    safetensors = _safetensors()
    out_dir = make_folder(out_dir, inputs)
    tensors = spread(cfg, weights, HF_NAMES, hf_transforms(cfg, to_hf=True))
    write_bytes(out_dir / "model.safetensors", safetensors.numpy.save(tensors, metadata={"format": "pt"}), inputs)
    write_bytes(out_dir / "config.json", _json_bytes(hf_config(cfg, eot)), inputs)
    return out_dir


def write_gpt2_tokenizer(out_dir, tokenizer, max_length: int, inputs=()) -> Path:
    """tokenizer.json (the `tokenizers` library's own serialization) and tokenizer_config.json,
    as GPT2TokenizerFast reads them, from an HFTokenizer (tokenizer.json or vocab.json + merges)."""
    from .hf import _json_bytes
    from ..tokenizers.gpt2 import EOT

    if not hasattr(tokenizer, "_tk"):
        raise CheckpointError(f"{tokenizer.path}: an HF GPT-2 folder needs a BPE tokenizer (tokenizer.json or "
                              "vocab.json + merges.txt); llm.c's gpt2_tokenizer.bin has no merges")
    out_dir = Path(out_dir)
    eot = tokenizer.token_text(tokenizer.bos_id) if tokenizer.bos_id is not None else EOT
    config = {"tokenizer_class": "GPT2Tokenizer", "bos_token": eot, "eos_token": eot, "unk_token": eot,
              "add_bos_token": False, "model_max_length": max_length, "clean_up_tokenization_spaces": False}
    write_bytes(out_dir / "tokenizer.json", tokenizer._tk.to_str().encode("utf-8"), inputs)
    write_bytes(out_dir / "tokenizer_config.json", _json_bytes(config), inputs)
    return out_dir
