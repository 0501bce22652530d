"""All of a model's parameters in one flat array, and where each tensor lives in it.

One buffer (and gradients, AdamW's two moments in the same layout) makes the optimizer one
kernel over contiguous memory and the gradient norm one sum. Tensors whose torch parameters are
matrices (which AdamW decays) come first, so weight decay applies to a prefix [0, n_decay).

A model may fuse tensors that are used together: Llama's wq, wk, wv become one (L, Q + 2 KV, D)
`wqkv` and w1, w3 one (L, 2F, D) `w13`, each computed by one matrix product. `arch_views` shows
the buffer under the inventory's names (arch/llama.py, arch/gpt2.py) as views, for checkpoints.
"""

from __future__ import annotations

import math

import numpy as np

from ...arch import module as arch_module
from ...arch.tensors import stored_tensors
from ...config import ModelConfig


class Layout:
    """Offsets of every (possibly fused) tensor of a config's model in a flat buffer."""

    def __init__(self, cfg: ModelConfig, fused: dict[str, tuple[str, ...]] | None = None):
        inventory = arch_module(cfg.arch)
        shapes = inventory.tensor_shapes(cfg)
        self.cfg, self.fused = cfg, dict(fused or {})
        members = {m: name for name, parts in self.fused.items() for m in parts}
        entries = []  # (name, shape, decayed), in the inventory's order
        for name in stored_tensors(cfg):
            source = name  # whose torch parameter tells whether it is per layer
            if name in members:
                group = members[name]
                parts = self.fused[group]
                if name != parts[0]:
                    continue  # the fused tensor stands where its first member would
                shape, name = (shapes[name][0], sum(shapes[p][1] for p in parts), *shapes[name][2:]), group
            else:
                shape = shapes[name]
            per_layer = "{i}" in inventory.TORCH_NAMES[source]
            entries.append((name, shape, len(shape) - per_layer >= 2))  # decayed: torch's p.dim() >= 2
        self.shapes, self.offsets = {}, {}
        offset = 0
        for name, shape, decayed in sorted(entries, key=lambda e: not e[2]):  # stable: decayed first
            self.shapes[name], self.offsets[name] = shape, offset
            offset += math.prod(shape)
        self.size = offset
        self.n_decay = sum(math.prod(s) for n, s, d in entries if d)

    def zeros(self, dtype=np.float32) -> np.ndarray:
        return np.zeros(self.size, dtype)

    def views(self, flat: np.ndarray) -> dict[str, np.ndarray]:
        """Name -> view into flat, for the model code; wcls is token_embedding when tied."""
        out = {name: flat[o : o + math.prod(self.shapes[name])].reshape(self.shapes[name])
               for name, o in self.offsets.items()}
        if self.cfg.shared_classifier:
            out["wcls"] = out["token_embedding"]
        return out

    def arch_views(self, flat: np.ndarray) -> dict[str, np.ndarray]:
        """The inventory's names -> views (fused tensors split along their row axis)."""
        out = self.views(flat)
        shapes = arch_module(self.cfg.arch).tensor_shapes(self.cfg)
        for name, parts in self.fused.items():
            fused, row = out.pop(name), 0
            for p in parts:
                out[p] = fused[:, row : row + shapes[p][1]]
                row += shapes[p][1]
        return out
