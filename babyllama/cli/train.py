"""`babyllama train`: flags (and --config TOML) -> a training run on the backend chosen for it
(training/config.py choose_backend: the hand-written one, training/grad, or torch); under
torchrun, one process of a DDP run (`torchrun --nproc_per_node N -m babyllama train ...`)."""

from __future__ import annotations

import os

from ..training.config import choose_backend, parse_config


def main(argv: list[str] | None = None) -> int:
    """0 when done, 130 after Ctrl-C or SIGTERM (the last step saved); raises BabyLlamaError on bad input."""
    tc, explicit = parse_config(argv)
    import torch  # only once the flags parsed (--help works without it); both backends write torch's ckpt.pt

    from ..training.loop import prepare

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    tc, ckpt = prepare(tc, explicit, world_size)
    backend, why = choose_backend(tc, world_size, torch.cuda.is_available())
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"backend: {backend} ({why})", flush=True)
    if backend == "numba":
        from ..training.grad.trainer import train
    else:
        from ..training.torch_loop import train
    return train(tc, explicit, prepared=(tc, ckpt))
