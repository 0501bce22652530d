"""A training run's settings: the TrainConfig dataclass, its flags and TOML file, their checks,
the ModelConfig it asks for, the backend that runs it, and the learning-rate schedule. No torch here.

Every TrainConfig field is a `--flag` (also spelled with dashes) and a TOML key; precedence is
defaults < the resumed checkpoint's settings < TOML < flags. `batch_size` is the GLOBAL number
of sequences per optimizer step: each of the world_size processes takes its share and splits it
into `grad_accum` micro-batches, so a step sees the same tokens whatever the process count.
"""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass, field, fields

from ..config import ARCHITECTURES, ModelConfig, llama_hidden_dim
from ..errors import TrainError

# --dtype spellings -> torch dtype names (torch_loop resolves them)
DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}
BACKENDS = ("auto", "torch", "numba")


def _knob(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """Every knob of a training run. Each field is also a `--flag` and a TOML key."""

    # data and output
    data_dir: str = _knob("data/tok512", "pretokenized shards + meta.json (vocab_size comes from there)")
    out_dir: str = _knob("out", "where ckpt.pt, metrics.jsonl and loss.png go")
    # model shape
    arch: str = _knob("llama", f"architecture: {', '.join(ARCHITECTURES)} (gpt2: learned positions, LayerNorm, "
                               "GELU, biases, tied classifier)")
    dim: int = _knob(288, "width of the residual stream")
    n_layers: int = _knob(6, "transformer blocks")
    n_heads: int = _knob(6, "query heads")
    n_kv_heads: int = _knob(0, "key/value heads; 0: same as n_heads (grouped-query attention when fewer)")
    multiple_of: int = _knob(32, "SwiGLU width rounding, used when hidden_dim is 0")
    hidden_dim: int = _knob(0, "feed-forward width; 0: 2/3 of 4*dim rounded up to multiple_of (llama), 4*dim (gpt2)")
    seq_len: int = _knob(256, "context length")
    shared_classifier: bool = _knob(True, "tie the output classifier to the token embedding")
    dropout: float = _knob(0.0, "dropout probability while training")
    # optimisation
    batch_size: int = _knob(64, "GLOBAL sequences per optimizer step (all processes and micro-steps)")
    grad_accum: int = _knob(1, "micro-steps per optimizer step (less memory, same result)")
    max_iters: int = _knob(2000, "optimizer steps in total")
    lr: float = _knob(5e-4, "peak learning rate")
    min_lr: float = _knob(5e-5, "learning rate at the end of the cosine decay")
    warmup_iters: int = _knob(100, "steps of linear warmup")
    lr_decay_iters: int = _knob(0, "step where the cosine decay reaches min_lr; 0: max_iters")
    weight_decay: float = _knob(0.1, "AdamW weight decay (matrices only)")
    beta1: float = _knob(0.9, "AdamW beta1")
    beta2: float = _knob(0.95, "AdamW beta2")
    grad_clip: float = _knob(1.0, "clip the gradient norm to this; 0: no clipping")
    # evaluation, logging, checkpoints
    eval_interval: int = _knob(200, "evaluate (and checkpoint) every N steps")
    eval_iters: int = _knob(20, "validation batches per evaluation")
    log_interval: int = _knob(10, "print a progress line every N steps")
    always_save_checkpoint: bool = _knob(True, "checkpoint at every evaluation; off: only when val loss improves")
    resume: bool = _knob(False, "continue from out_dir/ckpt.pt (unset settings come from it)")
    # system
    backend: str = _knob("auto", "torch (autograd), numba (hand-written forward and backward, CPU, float32, no "
                                 "dropout, one process) or auto (numba where it can run the settings on a CPU, "
                                 "else torch)")
    seed: int = _knob(1337, "seed of weights, batches and dropout")
    device: str = _knob("auto", "auto (cuda if available, else cpu), cpu, cuda, cuda:N")
    dtype: str = _knob("auto", "auto (bf16, or fp16 without bf16 support, on CUDA; fp32 elsewhere), "
                               "float32, bfloat16, float16")
    compile: bool = _knob(False, "torch.compile the model")


FIELDS = {f.name: f for f in fields(TrainConfig)}
_TYPES = {name: type(f.default) for name, f in FIELDS.items()}


def build_parser() -> argparse.ArgumentParser:
    """The `babyllama train` argument parser: --config plus one flag per TrainConfig field."""
    p = argparse.ArgumentParser(
        prog="babyllama train",
        description="Train a Llama-architecture model on pretokenized shards (torchrun for several processes).",
        argument_default=argparse.SUPPRESS,  # absent flags stay absent, so they do not override the file
    )
    p.add_argument("--config", metavar="TOML", help="read settings from a TOML file (flags override it)")
    for name, f in FIELDS.items():
        kind = _TYPES[name]
        # --batch-size works as well as --batch_size (the TOML key); the alias stays out of --help.
        flags = [(name, f"{f.metadata['help']} (default: {f.default})")]
        if "_" in name:
            flags.append((name.replace("_", "-"), argparse.SUPPRESS))
        for flag, help in flags:
            if kind is bool:
                p.add_argument(f"--{flag}", dest=name, action=argparse.BooleanOptionalAction, help=help)
            else:
                p.add_argument(f"--{flag}", dest=name, type=kind, metavar=kind.__name__.upper(), help=help)
    return p


def read_toml(path: str | os.PathLike) -> dict:
    """TrainConfig settings from a flat TOML file; unknown keys and wrong types are errors."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: the same parser as the tomli package
        try:
            import tomli as tomllib
        except ModuleNotFoundError:
            raise TrainError("--config needs a TOML parser on Python 3.10: pip install tomli") from None
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise TrainError(f"{path}: config file not found") from None
    except OSError as e:
        raise TrainError(f"{path}: cannot read config file ({e.strerror})") from None
    except tomllib.TOMLDecodeError as e:
        raise TrainError(f"{path}: invalid TOML ({e})") from None
    out = {}
    for key, value in data.items():
        if key not in FIELDS:
            raise TrainError(f"{path}: unknown key {key!r} (known keys: {', '.join(FIELDS)})")
        kind = _TYPES[key]
        ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        if not ok:
            raise TrainError(f"{path}: key {key!r} must be a {kind.__name__}, got {value!r}")
        out[key] = value
    return out


def parse_config(argv: list[str] | None = None) -> tuple[TrainConfig, dict]:
    """Parse flags (and --config) -> (config, the settings given explicitly by file or flag)."""
    args = vars(build_parser().parse_args(argv))
    explicit = read_toml(args.pop("config")) if "config" in args else {}
    explicit.update(args)
    return TrainConfig(**explicit), explicit


def validate(tc: TrainConfig, world_size: int = 1) -> None:
    """Reject settings that cannot train, with a message naming the flag."""
    positive = ("dim", "n_layers", "n_heads", "multiple_of", "seq_len", "batch_size", "grad_accum", "max_iters",
                "eval_interval", "eval_iters", "log_interval")
    for name in positive:
        if getattr(tc, name) <= 0:
            raise TrainError(f"--{name} must be positive, got {getattr(tc, name)}")
    for name in ("n_kv_heads", "hidden_dim", "warmup_iters", "lr_decay_iters", "weight_decay", "grad_clip", "min_lr"):
        if getattr(tc, name) < 0:
            raise TrainError(f"--{name} must be >= 0, got {getattr(tc, name)}")
    if not (tc.lr > 0 and math.isfinite(tc.lr)):
        raise TrainError(f"--lr must be a positive number, got {tc.lr}")
    if tc.min_lr > tc.lr:
        raise TrainError(f"--min_lr ({tc.min_lr}) must not exceed --lr ({tc.lr})")
    if not 0 <= tc.dropout < 1:
        raise TrainError(f"--dropout must be in [0, 1), got {tc.dropout}")
    for name in ("beta1", "beta2"):
        if not 0 <= getattr(tc, name) < 1:
            raise TrainError(f"--{name} must be in [0, 1), got {getattr(tc, name)}")
    if tc.batch_size % (world_size * tc.grad_accum):
        raise TrainError(
            f"--batch_size ({tc.batch_size}) must be divisible by processes x --grad_accum "
            f"({world_size} x {tc.grad_accum} = {world_size * tc.grad_accum})"
        )
    if tc.dtype not in ("auto", *DTYPES):
        raise TrainError(f"--dtype must be one of auto, {', '.join(DTYPES)}; got {tc.dtype!r}")
    if tc.arch not in ARCHITECTURES:
        raise TrainError(f"--arch must be one of {', '.join(ARCHITECTURES)}; got {tc.arch!r}")
    if tc.backend not in BACKENDS:
        raise TrainError(f"--backend must be one of {', '.join(BACKENDS)}; got {tc.backend!r}")


def numba_obstacle(tc: TrainConfig, world_size: int, cuda_available: bool) -> str | None:
    """Why the hand-written backend cannot run these settings (a flag and its value), or None."""
    if world_size > 1:
        return f"{world_size} processes (torchrun)"
    if tc.device != "cpu" and not (tc.device == "auto" and not cuda_available):
        return f"--device {tc.device}" + (" (a GPU is present)" if tc.device == "auto" else "")
    if tc.dtype not in ("auto", "float32", "fp32"):
        return f"--dtype {tc.dtype}"
    if tc.dropout > 0:
        return f"--dropout {tc.dropout}"
    if tc.compile:
        return "--compile"
    return None


def choose_backend(tc: TrainConfig, world_size: int, cuda_available: bool) -> tuple[str, str]:
    """(backend, why) for a run: --backend as given, or for auto the hand-written one wherever
    it can run the settings (one process on the CPU, float32, no dropout, no torch.compile),
    because there it trains several times faster than torch (README: Training without autograd),
    and torch otherwise (a GPU, DDP, mixed precision, dropout). TrainError when --backend numba
    is asked for settings it cannot run."""
    obstacle = numba_obstacle(tc, world_size, cuda_available)
    if tc.backend == "numba":
        if obstacle is not None:
            raise TrainError(f"--backend numba trains one process on the CPU in float32 without dropout or "
                             f"torch.compile; {obstacle} needs --backend torch")
        return "numba", "--backend numba"
    if tc.backend == "torch":
        return "torch", "--backend torch"
    if obstacle is not None:
        return "torch", f"auto: {obstacle} needs torch"
    return "numba", "auto: one process on the CPU"


def model_config(tc: TrainConfig, vocab_size: int) -> ModelConfig:
    """The ModelConfig a TrainConfig asks for (ConfigError if the shape is impossible)."""
    default_hidden = 4 * tc.dim if tc.arch == "gpt2" else llama_hidden_dim(tc.dim, tc.multiple_of)
    return ModelConfig(
        arch=tc.arch,
        dim=tc.dim,
        hidden_dim=tc.hidden_dim or default_hidden,
        n_layers=tc.n_layers,
        n_heads=tc.n_heads,
        n_kv_heads=tc.n_kv_heads or tc.n_heads,
        vocab_size=vocab_size,
        seq_len=tc.seq_len,
        shared_classifier=tc.shared_classifier,
    )


def lr_at(it: int, tc: TrainConfig) -> float:
    """Learning rate of step `it`: linear warmup, then cosine decay to min_lr (Loshchilov & Hutter 2016)."""
    decay_iters = tc.lr_decay_iters or tc.max_iters
    if it < tc.warmup_iters:
        return tc.lr * (it + 1) / (tc.warmup_iters + 1)
    if it >= decay_iters:
        return tc.min_lr
    ratio = (it - tc.warmup_iters) / (decay_iters - tc.warmup_iters)
    return tc.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (tc.lr - tc.min_lr)
