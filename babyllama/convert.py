"""Model conversion between torch checkpoints, llama2.c .bin files, Hugging Face and Meta folders.

Every reader returns (ModelConfig, Weights), i.e. llama2.c's tensor names and its RoPE
convention, and every writer takes them, so any input converts to any output:

  readers   torch .pt (train.py)   llama2.c .bin v0/v1   HF folder (safetensors)   Meta folder (.pth)
  writers   llama2.c .bin (v0/v1; more versions plug into BIN_WRITERS)   HF folder   torch .pt

The formats differ in three ways only: tensor names (the *_NAMES tables below), per-layer
tensors stored one by one instead of stacked, and RoPE. llama2.c and Meta rotate interleaved
pairs (2j, 2j+1) of each head; Hugging Face's rotate_half rotates (j, j + head_size/2). The
same model in HF therefore has the rows of wq and wk reordered per head (permute_to_hf).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import sys
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from .checkpoint import Weights, atomic_write, load_checkpoint, tensor_shapes, write_checkpoint
from .config import ModelConfig
from .errors import BabyLlamaError, CheckpointError, ConfigError, TokenizerError

# llama2.c name -> key in each format; "{i}" marks a per-layer tensor.
TORCH_NAMES = {  # babyllama/model.py's state_dict
    "token_embedding": "token_embedding.weight",
    "rms_att": "layers.{i}.rms_att.weight",
    "wq": "layers.{i}.wq.weight",
    "wk": "layers.{i}.wk.weight",
    "wv": "layers.{i}.wv.weight",
    "wo": "layers.{i}.wo.weight",
    "rms_ffn": "layers.{i}.rms_ffn.weight",
    "w1": "layers.{i}.w1.weight",
    "w2": "layers.{i}.w2.weight",
    "w3": "layers.{i}.w3.weight",
    "rms_final": "rms_final.weight",
    "wcls": "wcls.weight",
}
HF_NAMES = {  # transformers' LlamaForCausalLM
    "token_embedding": "model.embed_tokens.weight",
    "rms_att": "model.layers.{i}.input_layernorm.weight",
    "wq": "model.layers.{i}.self_attn.q_proj.weight",
    "wk": "model.layers.{i}.self_attn.k_proj.weight",
    "wv": "model.layers.{i}.self_attn.v_proj.weight",
    "wo": "model.layers.{i}.self_attn.o_proj.weight",
    "rms_ffn": "model.layers.{i}.post_attention_layernorm.weight",
    "w1": "model.layers.{i}.mlp.gate_proj.weight",
    "w2": "model.layers.{i}.mlp.down_proj.weight",
    "w3": "model.layers.{i}.mlp.up_proj.weight",
    "rms_final": "model.norm.weight",
    "wcls": "lm_head.weight",
}
META_NAMES = {  # Meta's llama consolidated.*.pth
    "token_embedding": "tok_embeddings.weight",
    "rms_att": "layers.{i}.attention_norm.weight",
    "wq": "layers.{i}.attention.wq.weight",
    "wk": "layers.{i}.attention.wk.weight",
    "wv": "layers.{i}.attention.wv.weight",
    "wo": "layers.{i}.attention.wo.weight",
    "rms_ffn": "layers.{i}.ffn_norm.weight",
    "w1": "layers.{i}.feed_forward.w1.weight",
    "w2": "layers.{i}.feed_forward.w2.weight",
    "w3": "layers.{i}.feed_forward.w3.weight",
    "rms_final": "norm.weight",
    "wcls": "output.weight",
}
WRAPPER_PREFIXES = ("_orig_mod.", "module.")  # torch.compile and DistributedDataParallel


# ---------------------------------------------------------------------------------------------
# RoPE convention


def permute_to_hf(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorder the rows of a q or k projection from llama2.c's RoPE layout to Hugging Face's.

    Within each head, row 2j+p (pair j, member p) moves to row p*head_size/2 + j: evens first,
    then odds, so that HF's rotate_half pairs (j, j + head_size/2) are llama2.c's (2j, 2j+1)
    with the same frequency. Use n_kv_heads for wk.
    """
    rows, cols = w.shape
    hs = rows // n_heads
    return w.reshape(n_heads, hs // 2, 2, cols).transpose(0, 2, 1, 3).reshape(rows, cols)


def permute_from_hf(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of permute_to_hf."""
    rows, cols = w.shape
    hs = rows // n_heads
    return w.reshape(n_heads, 2, hs // 2, cols).transpose(0, 2, 1, 3).reshape(rows, cols)


# ---------------------------------------------------------------------------------------------
# name tables <-> Weights


def _collect(get: Callable[[str], np.ndarray | None], names: Mapping[str, str], cfg: ModelConfig,
             where: str, transforms: Mapping[str, Callable] | None = None) -> Weights:
    """Gather and stack tensors named by `names` into Weights, checking every shape against cfg."""
    transforms = transforms or {}
    shapes = tensor_shapes(cfg)
    tensors, missing = {}, []
    for name, key in names.items():
        if name == "wcls" and cfg.shared_classifier:
            continue
        keys = [key.format(i=i) for i in range(cfg.n_layers)] if "{i}" in key else [key]
        want = shapes[name][1:] if "{i}" in key else shapes[name]
        parts = []
        for k in keys:
            arr = get(k)
            if arr is None:
                missing.append(k)
                continue
            if tuple(arr.shape) != want:
                raise CheckpointError(f"{where}: tensor {k}: expected shape {want} from the config, found {tuple(arr.shape)}")
            parts.append(transforms[name](arr) if name in transforms else arr)
        if not missing:
            tensors[name] = np.stack(parts) if "{i}" in key else parts[0]
    if missing:
        more = f" and {len(missing) - 4} more" if len(missing) > 4 else ""
        raise CheckpointError(f"{where}: missing tensors: expected {', '.join(missing[:4])}{more}, not found")
    return Weights.from_dict(cfg, tensors)


def _spread(cfg: ModelConfig, weights: Weights, names: Mapping[str, str],
            transforms: Mapping[str, Callable] | None = None) -> dict[str, np.ndarray]:
    """The inverse of _collect: one contiguous array (a copy) per key of `names`."""
    transforms = transforms or {}
    out = {}
    for name, key in names.items():
        if name == "wcls" and cfg.shared_classifier:
            continue
        arr = getattr(weights, name)
        f = transforms.get(name, lambda a: a)
        if "{i}" in key:
            for i in range(cfg.n_layers):
                out[key.format(i=i)] = np.array(f(arr[i]), dtype=np.float32, order="C")
        else:
            out[key] = np.array(f(arr), dtype=np.float32, order="C")
    return out


def _hf_transforms(cfg: ModelConfig, to_hf: bool) -> dict[str, Callable]:
    p = permute_to_hf if to_hf else permute_from_hf
    return {"wq": lambda w: p(w, cfg.n_heads), "wk": lambda w: p(w, cfg.n_kv_heads)}


# ---------------------------------------------------------------------------------------------
# torch checkpoints (train.py)


def _torch():
    try:
        import torch
    except ImportError:
        raise CheckpointError("reading and writing torch checkpoints needs torch: pip install 'babyllama[train]'") from None
    return torch


def _torch_load(path: Path, what: str):
    torch = _torch()
    if not path.is_file():
        raise CheckpointError(f"{path}: no such {what} file")
    try:
        # weights_only: a checkpoint is data, never code to run
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types (UnpicklingError, RuntimeError, EOFError, ...)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not a torch checkpoint ({first[:160]})") from None


def _to_numpy(t) -> np.ndarray:
    if hasattr(t, "detach"):
        return t.detach().to("cpu").float().numpy()
    return np.asarray(t, dtype=np.float32)


def state_dict_to_weights(state_dict: Mapping, cfg: ModelConfig, where: str = "state_dict") -> Weights:
    """babyllama's torch state_dict (optionally torch.compile/DDP-wrapped) -> Weights."""
    clean = {}
    for key, value in state_dict.items():
        stripped = True
        while stripped:
            stripped = False
            for prefix in WRAPPER_PREFIXES:
                if key.startswith(prefix):
                    key, stripped = key[len(prefix):], True
        clean[key] = value
    return _collect(lambda k: _to_numpy(clean[k]) if k in clean else None, TORCH_NAMES, cfg, where)


def weights_to_state_dict(cfg: ModelConfig, weights: Weights) -> dict:
    """Weights -> babyllama's torch state_dict (fresh tensors; wcls is token_embedding when tied)."""
    torch = _torch()
    sd = {k: torch.from_numpy(v) for k, v in _spread(cfg, weights, TORCH_NAMES).items()}
    if cfg.shared_classifier:
        sd["wcls.weight"] = sd["token_embedding.weight"]
    return sd


def load_torch_checkpoint(path) -> tuple[ModelConfig, Weights]:
    """Read a checkpoint saved by train.py: a dict with "model" (state_dict) and "model_config"."""
    path = Path(path)
    ckpt = _torch_load(path, "torch checkpoint")
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_config" not in ckpt:
        found = sorted(ckpt)[:8] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"{path}: expected a train.py checkpoint with keys 'model' and 'model_config', found {found}")
    try:
        cfg = ModelConfig.from_dict(dict(ckpt["model_config"]))
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{path}: invalid model_config ({e})") from None
    return cfg, state_dict_to_weights(ckpt["model"], cfg, str(path))


def save_torch_checkpoint(path, cfg: ModelConfig, weights: Weights) -> None:
    """Write {"model": state_dict, "model_config": ...} as train.py does (no optimizer state)."""
    torch = _torch()
    sd = weights_to_state_dict(cfg, weights)
    atomic_write(path, lambda f: torch.save({"model": sd, "model_config": cfg.to_dict()}, f))


# ---------------------------------------------------------------------------------------------
# llama2.c .bin


def _write_fp32(version: int):
    def write(path, cfg: ModelConfig, weights: Weights, **options) -> None:
        write_checkpoint(path, cfg, weights, version)
    return write


# version -> writer(path, cfg, weights, **options). The quantized formats register here
# (options carry e.g. group_size), and `babyllama export --version N` picks them up.
BIN_WRITERS: dict[int, Callable] = {0: _write_fp32(0), 1: _write_fp32(1)}


def _write_quantized(version: int):
    def write(path, cfg: ModelConfig, weights: Weights, group_size: int | None = None, **options) -> None:
        from .checkpoint import write_quantized_checkpoint
        from .quant import VERSION_BITS
        from .quantize import default_group_size

        gs = default_group_size(cfg, VERSION_BITS[version]) if group_size is None else group_size
        write_quantized_checkpoint(path, cfg, weights, version, gs)
    return write


BIN_WRITERS.update({2: _write_quantized(2), 3: _write_quantized(3)})  # int8 (llama2.c Q8_0), int4 (babyllama)


def register_bin_writer(version: int, writer: Callable) -> None:
    """Make `export_bin(..., version=version)` use writer(path, cfg, weights, **options)."""
    BIN_WRITERS[version] = writer


def export_bin(path, cfg: ModelConfig, weights: Weights, version: int = 0, **options) -> Path:
    """Write a llama2.c .bin of the given version (atomically, as every writer does)."""
    writer = BIN_WRITERS.get(version)
    if writer is None:
        known = ", ".join(str(v) for v in sorted(BIN_WRITERS))
        raise CheckpointError(f"unknown .bin version {version}: expected one of {known}")
    writer(Path(path), cfg, weights, **options)
    return Path(path)


def load_bin(path) -> tuple[ModelConfig, Weights]:
    """Read an fp32 llama2.c .bin (v0 or v1)."""
    ckpt = load_checkpoint(path)
    if not isinstance(ckpt.weights, Weights):
        raise CheckpointError(f"{path}: expected an fp32 checkpoint (v0 or v1), found quantized version {ckpt.version}")
    return ckpt.config, ckpt.weights


# ---------------------------------------------------------------------------------------------
# Hugging Face (LlamaForCausalLM, safetensors)


def _safetensors():
    try:
        import safetensors
        import safetensors.numpy  # noqa: F401
    except ImportError:
        raise CheckpointError("Hugging Face import/export needs safetensors: pip install 'babyllama[train]'") from None
    return safetensors


def hf_config(cfg: ModelConfig) -> dict:
    """config.json for transformers' LlamaForCausalLM. GQA is kept (num_key_value_heads)."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.hidden_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_size,
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "tie_word_embeddings": cfg.shared_classifier,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "float32",
    }


def export_hf(out_dir, cfg: ModelConfig, weights: Weights) -> Path:
    """Write out_dir/model.safetensors and out_dir/config.json (the latter last)."""
    _safetensors()
    from safetensors.numpy import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = _spread(cfg, weights, HF_NAMES, _hf_transforms(cfg, to_hf=True))
    # transformers refuses safetensors files without a "format" entry in the metadata
    tmp = out_dir / f".model.safetensors.tmp{os.getpid()}"
    try:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, out_dir / "model.safetensors")
    finally:
        tmp.unlink(missing_ok=True)
    text = json.dumps(hf_config(cfg), indent=2) + "\n"
    atomic_write(out_dir / "config.json", lambda f: f.write(text.encode()))
    return out_dir


def _hf_model_config(folder: Path, c: dict) -> ModelConfig:
    where = folder / "config.json"
    if c.get("model_type") != "llama":
        raise CheckpointError(f"{where}: expected model_type 'llama', found {c.get('model_type')!r}")
    unsupported = {
        "hidden_act": (c.get("hidden_act", "silu"), "silu"),
        "rope_scaling": (c.get("rope_scaling"), None),
        "attention_bias": (c.get("attention_bias", False), False),
        "mlp_bias": (c.get("mlp_bias", False), False),
    }
    for key, (found, expected) in unsupported.items():
        if found != expected:
            raise CheckpointError(f"{where}: {key}: expected {expected!r} (what llama2.c models use), found {found!r}")
    try:
        heads = c["num_attention_heads"]
        cfg = ModelConfig(
            dim=c["hidden_size"], hidden_dim=c["intermediate_size"], n_layers=c["num_hidden_layers"],
            n_heads=heads, n_kv_heads=c.get("num_key_value_heads") or heads, vocab_size=c["vocab_size"],
            seq_len=c.get("max_position_embeddings", 2048),
            shared_classifier=bool(c.get("tie_word_embeddings", False)),  # transformers' default is False
            norm_eps=float(c.get("rms_norm_eps", 1e-6)), rope_theta=float(c.get("rope_theta", 10000.0)),
        )
    except KeyError as e:
        raise CheckpointError(f"{where}: missing key {e.args[0]!r}") from None
    except ConfigError as e:
        raise CheckpointError(f"{where}: invalid model shape ({e})") from None
    if c.get("head_dim") not in (None, cfg.head_size):
        raise CheckpointError(f"{where}: head_dim: expected hidden_size/num_attention_heads = {cfg.head_size}, found {c['head_dim']}")
    return cfg


def _read_json(folder: Path, name: str, expected: str) -> dict:
    """folder/name parsed as JSON; a missing or broken file is a CheckpointError naming both."""
    try:
        return json.loads((folder / name).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{folder}: no {name} (expected {expected})") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{folder / name}: invalid JSON ({e})") from None


def load_hf(folder) -> tuple[ModelConfig, Weights]:
    """Read a LlamaForCausalLM folder: config.json + model.safetensors (or a sharded index)."""
    _safetensors()
    from safetensors import safe_open

    folder = Path(folder)
    c = _read_json(folder, "config.json", "a Hugging Face model folder")
    cfg = _hf_model_config(folder, c)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        file_of = json.loads(index.read_text())["weight_map"]
    elif (folder / "model.safetensors").is_file():
        with safe_open(folder / "model.safetensors", framework="numpy") as f:
            file_of = {k: "model.safetensors" for k in f.keys()}
    else:
        found = sorted(p.name for p in folder.iterdir())[:8]
        raise CheckpointError(f"{folder}: expected model.safetensors or model.safetensors.index.json, found {found}")
    handles: dict[str, object] = {}

    def get(key):
        if key not in file_of:
            return None
        name = file_of[key]
        if name not in handles:
            handles[name] = safe_open(folder / name, framework="numpy")
        try:
            return handles[name].get_tensor(key).astype(np.float32, copy=False)
        except TypeError:  # bfloat16 has no NumPy dtype: go through torch
            with safe_open(folder / name, framework="pt") as f:
                return f.get_tensor(key).float().numpy()

    return cfg, _collect(get, HF_NAMES, cfg, str(folder), _hf_transforms(cfg, to_hf=False))


# ---------------------------------------------------------------------------------------------
# Meta (params.json + consolidated.00.pth)


def meta_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None = None) -> int:
    """Meta's FeedForward width: 2/3 of 4*dim, times ffn_dim_multiplier, rounded up to multiple_of."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def load_meta(folder, seq_len: int | None = None) -> tuple[ModelConfig, Weights]:
    """Read a Meta llama folder. Only single-shard checkpoints (consolidated.00.pth) are supported.

    Meta rotates interleaved pairs like llama2.c, so no RoPE permutation is needed. params.json
    carries no context length: `seq_len` (default 2048, as llama2.c assumes) fills it in.
    """
    folder = Path(folder)
    params = _read_json(folder, "params.json", "a Meta llama folder")
    shards = sorted(folder.glob("consolidated.*.pth"))
    if len(shards) != 1:
        raise CheckpointError(
            f"{folder}: expected one consolidated.00.pth, found {len(shards)} model-parallel shard(s); "
            "only single-shard Meta checkpoints (e.g. Llama 2 7B) are supported"
        )
    sd = _torch_load(shards[0], "Meta checkpoint")
    if not isinstance(sd, dict):
        raise CheckpointError(f"{shards[0]}: expected a state_dict, found {type(sd).__name__}")
    where = str(shards[0])
    try:
        dim, heads = params["dim"], params["n_heads"]
        vocab = params.get("vocab_size", -1)
        if vocab is None or vocab <= 0:  # Llama 2's params.json says -1: the tokenizer decides
            if "tok_embeddings.weight" not in sd:
                raise CheckpointError(f"{where}: missing tensors: expected tok_embeddings.weight, not found")
            vocab = int(sd["tok_embeddings.weight"].shape[0])
        cfg = ModelConfig(
            dim=dim, hidden_dim=meta_hidden_dim(dim, params.get("multiple_of", 256), params.get("ffn_dim_multiplier")),
            n_layers=params["n_layers"], n_heads=heads, n_kv_heads=params.get("n_kv_heads") or heads,
            vocab_size=vocab, seq_len=seq_len or params.get("max_seq_len", 2048), shared_classifier=False,
            norm_eps=float(params.get("norm_eps", 1e-5)), rope_theta=float(params.get("rope_theta", 10000.0)),
        )
    except KeyError as e:
        raise CheckpointError(f"{folder / 'params.json'}: missing key {e.args[0]!r}") from None
    except ConfigError as e:
        raise CheckpointError(f"{folder / 'params.json'}: invalid model shape ({e})") from None
    return cfg, _collect(lambda k: _to_numpy(sd[k]) if k in sd else None, META_NAMES, cfg, where)


# ---------------------------------------------------------------------------------------------
# any input -> any output


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
        raise CheckpointError(f"{p}: expected a Hugging Face folder (config.json) or a Meta folder (params.json), found neither")
    if p.suffix in (".pt", ".pth", ".ckpt"):
        return "torch"
    with open(p, "rb") as f:
        head = f.read(4)
    # torch.save writes a zip archive; its legacy format starts with a pickled magic number.
    # (A bare pickle byte 0x80 is not enough: a v0 .bin with dim 128 starts with it too.)
    if head in (b"PK\x03\x04", b"\x80\x02\x8a\x0a"):
        return "torch"
    return "bin"


def load_model(path, seq_len: int | None = None) -> tuple[ModelConfig, Weights]:
    """Read any supported model (torch .pt, llama2.c .bin, HF folder, Meta folder)."""
    kind = detect_format(path)
    if kind == "torch":
        return load_torch_checkpoint(path)
    if kind == "bin":
        return load_bin(path)
    if kind == "hf":
        return load_hf(path)
    return load_meta(path, seq_len)


TARGETS = ("bin", "hf", "pt")


def convert(src, dst, to: str = "bin", version: int = 0, tokenizer=None, seq_len: int | None = None) -> Path:
    """Convert the model at `src` to `dst` (a .bin or .pt file, or an HF folder).

    With `tokenizer` (a sentencepiece .model or a tokenizer.bin) the tokenizer is written next
    to the model: tokenizer.bin beside a .bin/.pt; tokenizer.model and/or tokenizer.bin inside
    an HF folder.
    """
    if to not in TARGETS:
        raise CheckpointError(f"unknown export target {to!r}: expected one of {', '.join(TARGETS)}")
    if to != "bin" and version != 0:
        raise CheckpointError(f"--version applies to --to bin only, found --to {to} --version {version}")
    if to == "bin" and version not in BIN_WRITERS:
        raise CheckpointError(f"unknown .bin version {version}: expected one of {', '.join(map(str, sorted(BIN_WRITERS)))}")
    cfg, weights = load_model(src, seq_len)
    dst = Path(dst)
    if to == "hf":
        export_hf(dst, cfg, weights)
        tok_dir = dst
    else:
        dst.parent.mkdir(parents=True, exist_ok=True)
        if to == "bin":
            export_bin(dst, cfg, weights, version)
        else:
            save_torch_checkpoint(dst, cfg, weights)
        tok_dir = dst.parent
    if tokenizer is not None:
        write_tokenizer(tokenizer, tok_dir, cfg.vocab_size, keep_model=(to == "hf"))
    return dst


def _check_tokenizer_bin(path: Path, vocab_size: int) -> None:
    data = path.read_bytes()
    off = 4
    for i in range(vocab_size):
        if off + 8 > len(data):
            raise TokenizerError(f"{path}: expected {vocab_size} tokens for this model, found {i}")
        _, n = struct.unpack_from("<fi", data, off)
        off += 8 + n
    if off != len(data):
        raise TokenizerError(f"{path}: expected {vocab_size} tokens for this model, found more ({len(data) - off} bytes left)")


def write_tokenizer(tokenizer, out_dir, vocab_size: int, keep_model: bool = False) -> Path:
    """Put out_dir/tokenizer.bin (exported from a .model, or copied) after checking it has vocab_size tokens."""
    tokenizer, out_dir = Path(tokenizer), Path(out_dir)
    if not tokenizer.is_file():
        raise TokenizerError(f"{tokenizer}: no such tokenizer file")
    out = out_dir / "tokenizer.bin"
    if tokenizer.suffix == ".model":
        from .data import export_tokenizer, load_sentencepiece

        n = load_sentencepiece(tokenizer).vocab_size()
        if n != vocab_size:
            raise TokenizerError(f"{tokenizer}: expected {vocab_size} tokens for this model, found {n}")
        export_tokenizer(tokenizer, out)
        if keep_model:  # transformers' LlamaTokenizer reads the sentencepiece model itself
            atomic_write(out_dir / "tokenizer.model", lambda f: f.write(tokenizer.read_bytes()))
    else:
        _check_tokenizer_bin(tokenizer, vocab_size)
        if tokenizer.resolve() != out.resolve():
            def copy(f):
                with open(tokenizer, "rb") as src:
                    shutil.copyfileobj(src, f)

            atomic_write(out, copy)
    return out


# ---------------------------------------------------------------------------------------------
# command line: babyllama export


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="babyllama export",
        description="Convert a model: torch .pt, llama2.c .bin, Hugging Face folder or Meta folder in; "
                    ".bin, HF folder or .pt out.",
    )
    p.add_argument("input", help="a torch .pt (train.py), a llama2.c .bin, an HF folder or a Meta folder")
    p.add_argument("output", help="a .bin/.pt file, or a folder for --to hf")
    p.add_argument("--to", default="bin", help=f"output format: {', '.join(TARGETS)} (default: bin)")
    p.add_argument("--version", type=int, default=0, help=".bin format version (default: 0, what run.c reads)")
    p.add_argument("--tokenizer", help="sentencepiece .model or tokenizer.bin to write next to the model")
    p.add_argument("--seq-len", type=int, default=None, help="context length for Meta checkpoints (default 2048)")
    return p


def main(argv=None) -> int:
    """Entry point of `babyllama export`; returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        out = convert(args.input, args.output, args.to, args.version, args.tokenizer, args.seq_len)
    except BabyLlamaError as e:
        print(f"babyllama export: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
