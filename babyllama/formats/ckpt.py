"""The trainer's checkpoint (out_dir/ckpt.pt): its schema, written and read, validated, and its
torch state_dict converted to and from the architecture's Weights (arch.llama, arch.gpt2).

A ckpt.pt is a torch.save'd dict:
  format        "babyllama-train" (CKPT_FORMAT)
  version       1 (CKPT_VERSION)
  model         the torch model's state_dict (training/model.py, training/gpt2_model.py; the
                arch module's TORCH_NAMES)
  model_config  ModelConfig.to_dict(), whose `arch` says which architecture the weights are
and, in a checkpoint `babyllama train --resume` can continue (TRAIN_KEYS): optimizer, scaler,
train_config, iter_num, best_val_loss, world_size, rng_states. `babyllama export --to pt` writes
the first four only: weights without training state.

Reading is torch.load(weights_only=True): a checkpoint is data, never code to run. torch is
imported only when a checkpoint is read or written.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping

import numpy as np

from ..arch import module as arch_module
from ..arch.tensors import collect, spread
from ..config import ModelConfig
from ..errors import CheckpointError, ConfigError
from ..fileio import atomic_write, regular_file_size

CKPT_FORMAT = "babyllama-train"
CKPT_VERSION = 1
WEIGHT_KEYS = ("format", "version", "model", "model_config")
TRAIN_KEYS = ("optimizer", "scaler", "train_config", "iter_num", "best_val_loss", "world_size", "rng_states")
WRAPPER_PREFIXES = ("_orig_mod.", "module.")  # torch.compile and DistributedDataParallel
MAX_QUOTE = 160  # longest part of a library's message quoted in ours


def _torch():
    try:
        import torch
    except ImportError:
        raise CheckpointError("reading and writing torch checkpoints needs torch: pip install 'babyllama[train]'") \
            from None
    return torch


def summary(e: BaseException) -> str:
    """A library exception in a few words for a one-line error: its first line (terminal colour
    codes removed), cut after the last whole sentence that fits in MAX_QUOTE characters, else
    just the exception's type."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip()
    first = text.splitlines()[0].strip() if text else ""
    if not first:
        return type(e).__name__
    if len(first) <= MAX_QUOTE:
        return f"{type(e).__name__}: {first}"
    end = first.rfind(". ", 0, MAX_QUOTE)
    return f"{type(e).__name__}: {first[:end + 1]}" if end > 0 else type(e).__name__


def torch_load(path, what: str):
    """torch.load(path) of a regular file, tensors on the CPU; CheckpointError naming `what` when
    the file is missing or not a torch checkpoint."""
    torch = _torch()
    path = Path(path)
    regular_file_size(path, CheckpointError, what)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types (UnpicklingError, RuntimeError, EOFError, ...)
        raise CheckpointError(f"{path}: not a torch checkpoint ({summary(e)})") from None


def to_numpy(t) -> np.ndarray:
    """A tensor (any dtype, any device) or array as a fresh fp32 NumPy array (never a view of a
    live parameter)."""
    if hasattr(t, "detach"):
        t = t.detach().to("cpu").float().numpy()
    return np.array(t, dtype=np.float32, copy=True)


def state_dict_to_weights(state_dict: Mapping, cfg: ModelConfig, where: str = "state_dict"):
    """babyllama's torch state_dict (optionally torch.compile/DDP-wrapped) -> the arch's Weights."""
    clean = {}
    for key, value in state_dict.items():
        stripped = True
        while stripped:
            stripped = False
            for prefix in WRAPPER_PREFIXES:
                if key.startswith(prefix):
                    key, stripped = key[len(prefix):], True
        clean[key] = value
    names = arch_module(cfg.arch).TORCH_NAMES
    return collect(lambda k: to_numpy(clean[k]) if k in clean else None, names, cfg, where)


def weights_to_state_dict(cfg: ModelConfig, weights) -> dict:
    """Weights -> babyllama's torch state_dict (fresh tensors; wcls is token_embedding when tied)."""
    torch = _torch()
    sd = {k: torch.from_numpy(v) for k, v in spread(cfg, weights, arch_module(cfg.arch).TORCH_NAMES).items()}
    if cfg.shared_classifier:
        sd["wcls.weight"] = sd["token_embedding.weight"]
    return sd


def _save(path, ckpt: dict, inputs) -> Path:
    torch = _torch()
    return atomic_write(path, lambda f: torch.save(ckpt, f), inputs)


def save_train_checkpoint(path, cfg: ModelConfig, model_state: Mapping, *, optimizer, scaler, train_config: dict,
                          iter_num: int, best_val_loss: float, world_size: int, rng_states: list,
                          inputs=()) -> Path:
    """Write a resumable training checkpoint atomically (see the module docstring for the keys)."""
    return _save(path, {
        "format": CKPT_FORMAT, "version": CKPT_VERSION, "model": dict(model_state), "model_config": cfg.to_dict(),
        "optimizer": optimizer, "scaler": scaler, "train_config": train_config, "iter_num": iter_num,
        "best_val_loss": best_val_loss, "world_size": world_size, "rng_states": rng_states,
    }, inputs)


def save_weights(path, cfg: ModelConfig, weights, inputs=()) -> Path:
    """Write weights as a ckpt.pt without training state (`babyllama export --to pt`)."""
    return _save(path, {"format": CKPT_FORMAT, "version": CKPT_VERSION, "model": weights_to_state_dict(cfg, weights),
                        "model_config": cfg.to_dict()}, inputs)


def load_train_checkpoint(path, resumable: bool = True) -> dict:
    """Read and validate a ckpt.pt: format, version, the keys (TRAIN_KEYS too when `resumable`)
    and model_config, which comes back as a ModelConfig. Tensors are on the CPU."""
    path = Path(path)
    ckpt = torch_load(path, "training checkpoint")
    if not isinstance(ckpt, dict) or ckpt.get("format") != CKPT_FORMAT:
        found = f"format {ckpt.get('format')!r} with keys {sorted(map(str, ckpt))[:8]}" if isinstance(ckpt, dict) \
            else f"a {type(ckpt).__name__}"
        raise CheckpointError(f"{path}: expected a babyllama checkpoint (format {CKPT_FORMAT!r}), found {found}")
    if ckpt.get("version") != CKPT_VERSION:
        raise CheckpointError(f"{path}: expected checkpoint version {CKPT_VERSION}, found {ckpt.get('version')!r}")
    missing = [k for k in WEIGHT_KEYS + (TRAIN_KEYS if resumable else ()) if k not in ckpt]
    if missing:
        hint = "; it holds weights only (written by `babyllama export --to pt`?)" if "model" in ckpt else ""
        raise CheckpointError(f"{path}: expected keys {', '.join(missing)} in the checkpoint, not found{hint}")
    if not isinstance(ckpt["model_config"], dict) or not isinstance(ckpt["model"], Mapping):
        raise CheckpointError(f"{path}: expected model and model_config to be dicts, found "
                              f"{type(ckpt['model']).__name__} and {type(ckpt['model_config']).__name__}")
    try:
        ckpt["model_config"] = ModelConfig.from_dict(dict(ckpt["model_config"]))
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{path}: invalid model_config ({e})") from None
    return ckpt


def load_weights(path) -> tuple[ModelConfig, object]:
    """(config, fp32 Weights of its architecture) of a ckpt.pt, validated as load_train_checkpoint does."""
    ckpt = load_train_checkpoint(path, resumable=False)
    cfg = ckpt["model_config"]
    return cfg, state_dict_to_weights(ckpt["model"], cfg, str(path))
