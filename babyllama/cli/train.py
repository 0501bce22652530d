"""`babyllama train`: flags (and --config TOML) -> a training run; under torchrun, one process
of a DDP run (`torchrun --nproc_per_node N -m babyllama train ...`)."""

from __future__ import annotations

from ..training.config import parse_config


def main(argv: list[str] | None = None) -> int:
    """0 when done, 130 after Ctrl-C or SIGTERM (the last step saved); raises BabyLlamaError on bad input."""
    tc, explicit = parse_config(argv)
    from ..training.torch_loop import train  # torch: only once the flags parsed (--help works without it)

    return train(tc, explicit)
