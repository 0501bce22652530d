"""The hand-written trainer's state as `babyllama train` checkpoints it (formats/ckpt.py): the
weights as the torch model's state_dict, and AdamW's moments and step as torch.optim.AdamW's
state_dict, so that either backend resumes the other's ckpt.pt.

torch's optimizer state_dict numbers the parameters group by group: group 0 the matrices (weight
decay), group 1 the rest, each in the order of model.parameters() (arch torch_parameters).
torch is imported here, and only here, for the tensors of that file.
"""

from __future__ import annotations

import numpy as np

from ...arch import module as arch_module
from ...arch.tensors import spread, stored_tensors
from ...errors import CheckpointError
from ...formats.ckpt import state_dict_to_weights, to_numpy, weights_to_state_dict
from .layout import Layout


def weights_of(layout: Layout, flat: np.ndarray):
    """The arch's Weights viewing a flat buffer (no copy for float32)."""
    return arch_module(layout.cfg.arch).Weights.from_dict(layout.cfg, layout.arch_views(flat))


def load_into(layout: Layout, flat: np.ndarray, weights) -> None:
    """Copy an arch Weights into a flat buffer (any float dtype)."""
    views = layout.arch_views(flat)
    for name in stored_tensors(layout.cfg):
        views[name][...] = getattr(weights, name)


def _parameter_groups(layout: Layout) -> tuple[list[str], list[str]]:
    """The torch parameters (state_dict keys) of AdamW's group 0 (decayed) and group 1."""
    cfg, inventory = layout.cfg, arch_module(layout.cfg.arch)
    shapes, ndim = inventory.tensor_shapes(cfg), {}
    for name in stored_tensors(cfg):
        key = inventory.TORCH_NAMES[name]
        for i in range(cfg.n_layers if "{i}" in key else 1):
            ndim[key.format(i=i)] = len(shapes[name]) - ("{i}" in key)
    keys = inventory.torch_parameters(cfg)
    return [k for k in keys if ndim[k] >= 2], [k for k in keys if ndim[k] < 2]


def model_state_dict(layout: Layout, params: np.ndarray) -> dict:
    return weights_to_state_dict(layout.cfg, weights_of(layout, params.astype(np.float32, copy=False)))


def optimizer_state_dict(layout: Layout, opt, lr: float, betas: tuple, weight_decay: float) -> dict:
    """AdamW's state as torch.optim.AdamW.state_dict() of the torch trainer's two groups."""
    import torch

    cfg, names = layout.cfg, arch_module(layout.cfg.arch).TORCH_NAMES
    decayed, rest = _parameter_groups(layout)
    m = spread(cfg, weights_of(layout, opt.m), names)
    v = spread(cfg, weights_of(layout, opt.v), names)
    step = torch.tensor(float(opt.step_count), dtype=torch.float32)
    state = {i: {"step": step.clone(), "exp_avg": torch.from_numpy(m[k]), "exp_avg_sq": torch.from_numpy(v[k])}
             for i, k in enumerate(decayed + rest)}
    # the other group options exactly as this torch version writes them
    probe = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=lr, betas=betas)
    options = {k: v for k, v in probe.state_dict()["param_groups"][0].items() if k != "params"}
    groups = [{**options, "weight_decay": weight_decay, "params": list(range(len(decayed)))},
              {**options, "weight_decay": 0.0, "params": list(range(len(decayed), len(decayed) + len(rest)))}]
    return {"state": state, "param_groups": groups}


def restore(layout: Layout, params: np.ndarray, opt, ckpt: dict, where: str) -> None:
    """Weights and AdamW state from a ckpt.pt of either backend."""
    cfg, names = layout.cfg, arch_module(layout.cfg.arch).TORCH_NAMES
    load_into(layout, params, state_dict_to_weights(ckpt["model"], cfg, where))
    decayed, rest = _parameter_groups(layout)
    saved = ckpt["optimizer"]
    groups = saved.get("param_groups", [])
    if [len(g["params"]) for g in groups] != [len(decayed), len(rest)]:
        raise CheckpointError(f"{where}: expected AdamW's two parameter groups of {len(decayed)} and {len(rest)} "
                              f"tensors, found {[len(g['params']) for g in groups]}")
    order = decayed + rest
    moments, steps = {"exp_avg": {}, "exp_avg_sq": {}}, set()
    for i, key in enumerate(order):
        entry = saved["state"].get(i)
        if entry is None:  # torch keeps no state for a parameter it never stepped
            steps.add(0)
            continue
        steps.add(int(float(entry["step"])))
        for k in moments:
            moments[k][key] = to_numpy(entry[k])
    if len(steps) != 1:
        raise CheckpointError(f"{where}: expected one AdamW step count for every parameter, found {sorted(steps)}")
    opt.step_count = steps.pop()
    for k, buffer in (("exp_avg", opt.m), ("exp_avg_sq", opt.v)):
        if opt.step_count == 0:
            buffer[:] = 0
            continue
        load_into(layout, buffer, state_dict_to_weights(moments[k], cfg, f"{where} (AdamW {k})"))
