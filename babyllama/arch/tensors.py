"""What every architecture's inventory shares: the Weights base class (a frozen set of named fp32
arrays checked against the config), the tied-classifier rule, and gathering a format's tensors
into Weights (`collect`) and back (`spread`). The inventories themselves are arch/llama.py and
arch/gpt2.py; `arch.module(cfg.arch)` picks one."""

from __future__ import annotations

from dataclasses import fields
from typing import Iterator

import numpy as np

from ..config import ModelConfig
from ..errors import CheckpointError


def _inventory(cfg: ModelConfig):
    from . import module

    return module(cfg.arch)


def stored_tensors(cfg: ModelConfig) -> list[str]:
    """The tensors a file holds: all of the architecture's, less wcls when the classifier is tied
    (the one place that rule is written)."""
    return [n for n in _inventory(cfg).tensor_shapes(cfg) if not (n == "wcls" and cfg.shared_classifier)]


class TensorSet:
    """Base of an architecture's frozen Weights dataclass: fp32 arrays (maybe read-only views of
    a mapped file), per-layer tensors stacked along a leading layer axis; wcls is the same array
    as token_embedding when the classifier is shared."""

    def items(self) -> Iterator[tuple[str, np.ndarray]]:
        for f in fields(self):
            yield f.name, getattr(self, f.name)

    @classmethod
    def from_dict(cls, cfg: ModelConfig, tensors: dict[str, np.ndarray]):
        """Build from a name -> array mapping, checking every shape against the config."""
        tensors = dict(tensors)
        if cfg.shared_classifier:
            tensors["wcls"] = tensors.get("token_embedding")
        shapes = _inventory(cfg).tensor_shapes(cfg)
        missing = [n for n in shapes if tensors.get(n) is None]
        if missing:
            raise CheckpointError(f"missing tensors: {', '.join(missing)}")
        out = {}
        for name, shape in shapes.items():
            arr = np.asarray(tensors[name])
            if arr.shape != shape:
                raise CheckpointError(f"tensor {name}: expected shape {shape}, found {arr.shape}")
            out[name] = arr if arr.dtype == np.float32 else arr.astype(np.float32)
        if cfg.shared_classifier:
            out["wcls"] = out["token_embedding"]
        return cls(**out)


def collect(get, names: dict[str, str], cfg: ModelConfig, where: str, transforms: dict | None = None):
    """Gather tensors named by `names` (a format's table in the arch module) into the
    architecture's Weights, stacking per-layer ones, checking every shape against cfg.
    get(key) returns an array or None when absent."""
    transforms = transforms or {}
    shapes = _inventory(cfg).tensor_shapes(cfg)
    tensors, missing = {}, []
    for name in stored_tensors(cfg):
        key = names[name]
        per_layer = "{i}" in key
        keys = [key.format(i=i) for i in range(cfg.n_layers)] if per_layer else [key]
        want = shapes[name][1:] if per_layer else shapes[name]
        parts = []
        for k in keys:
            arr = get(k)
            if arr is None:
                missing.append(k)
                continue
            # checked in babyllama's layout, after a format's transform (HF GPT-2 stores
            # matrices transposed); the message names the shape as the file has it
            laid_out = transforms[name](arr) if name in transforms else arr
            if tuple(laid_out.shape) != want:
                stored = want if name not in transforms else tuple(transforms[name](np.empty(want)).shape)
                raise CheckpointError(f"{where}: tensor {k}: expected shape {stored} from the config, "
                                      f"found {tuple(arr.shape)}")
            parts.append(laid_out)
        if not missing:
            tensors[name] = np.stack(parts) if per_layer else parts[0]
    if missing:
        more = f" and {len(missing) - 4} more" if len(missing) > 4 else ""
        raise CheckpointError(f"{where}: missing tensors: expected {', '.join(missing[:4])}{more}, not found")
    return _inventory(cfg).Weights.from_dict(cfg, tensors)


def spread(cfg: ModelConfig, weights, names: dict[str, str], transforms: dict | None = None) -> dict:
    """The inverse of collect: one contiguous float32 array (a copy) per key of `names`."""
    transforms = transforms or {}
    out = {}
    for name in stored_tensors(cfg):
        key = names[name]
        arr = getattr(weights, name)
        f = transforms.get(name, lambda a: a)
        if "{i}" in key:
            for i in range(cfg.n_layers):
                out[key.format(i=i)] = np.array(f(arr[i]), dtype=np.float32, order="C")
        else:
            out[key] = np.array(f(arr), dtype=np.float32, order="C")
    return out


def torch_parameter_keys(cfg: ModelConfig, names: dict[str, str], layer_tensors) -> list[str]:
    """The torch model's parameters in registration order (model.parameters(), which lists a tied
    wcls once, as token_embedding): the global tensors before the layers, the layers in order,
    each its layer_tensors in order, then the rest. torch's optimizer state_dict numbers the
    parameters in this order, group by group (formats/ckpt.py, training/grad/state.py)."""
    stored = stored_tensors(cfg)
    first = [n for n in stored if n not in layer_tensors and stored.index(n) < stored.index(layer_tensors[0])]
    last = [n for n in stored if n not in layer_tensors and n not in first]
    keys = [names[n] for n in first]
    keys += [names[n].format(i=i) for i in range(cfg.n_layers) for n in layer_tensors]
    return keys + [names[n] for n in last]
