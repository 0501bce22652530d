"""Architectures: each module is one architecture's tensor inventory (names, shapes, tying, and
the names other formats give the same tensors). The engine, the formats and the torch model all
take their tensor lists from here; `module(cfg.arch)` finds a config's. tensors.py holds what
every inventory shares (the Weights base, gathering a format's tensors into Weights and back)."""

from __future__ import annotations

from ..errors import ConfigError


def module(arch: str):
    """The inventory module of an architecture name (ModelConfig.arch): arch.llama or arch.gpt2."""
    if arch == "llama":
        from . import llama

        return llama
    if arch == "gpt2":
        from . import gpt2

        return gpt2
    raise ConfigError(f"arch: expected llama or gpt2, found {arch!r}")
