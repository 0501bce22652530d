"""`babyllama train`: train a baby Llama on pretokenized shards, on one CPU/GPU or many via torchrun.

    babyllama train --data_dir data/tok512 --out_dir out --dim 64 --n_layers 5 --max_iters 2000
    babyllama train --config run.toml --lr 1e-3           # flags override the file
    babyllama train --out_dir out --resume --max_iters 4000  # continue exactly where it stopped
    torchrun --standalone --nproc_per_node 4 -m babyllama.train --config run.toml

Settings live in one TrainConfig dataclass; every field is a flag and a TOML key (defaults <
the resumed checkpoint's settings < TOML < flags). `batch_size` is the GLOBAL number of
sequences per optimizer step: the data loader hands each rank its share and each rank splits
that into `grad_accum` micro-batches, so a step sees the same tokens whatever the process count
and the loss curves of 1 and N processes agree.

A checkpoint (out_dir/ckpt.pt, written atomically) holds everything needed to continue
bit-for-bit: weights, optimizer and grad-scaler state, both configs, the step count, the best
validation loss and every RNG state. Ctrl-C finishes nothing half-way: it saves the last
completed step and exits with status 130.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import math
import os
import random
import signal
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch

from .checkpoint import atomic_write
from .config import ModelConfig, llama_hidden_dim
from .errors import BabyLlamaError
from .model import Transformer

CKPT_NAME = "ckpt.pt"
CKPT_FORMAT = "babyllama-train"
CKPT_VERSION = 1
MODEL_FIELDS = ("dim", "n_layers", "n_heads", "n_kv_heads", "multiple_of", "hidden_dim", "seq_len", "shared_classifier")


class TrainError(BabyLlamaError, ValueError):
    """Training settings, data or checkpoints that cannot be used as given."""


def _knob(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """Every knob of a training run. Each field is also a `--flag` and a TOML key."""

    # data and output
    data_dir: str = _knob("data/tok512", "pretokenized shards + meta.json (vocab_size comes from there)")
    out_dir: str = _knob("out", "where ckpt.pt, metrics.jsonl and loss.png go")
    # model shape
    dim: int = _knob(288, "width of the residual stream")
    n_layers: int = _knob(6, "transformer blocks")
    n_heads: int = _knob(6, "query heads")
    n_kv_heads: int = _knob(0, "key/value heads; 0: same as n_heads (grouped-query attention when fewer)")
    multiple_of: int = _knob(32, "SwiGLU width rounding, used when hidden_dim is 0")
    hidden_dim: int = _knob(0, "SwiGLU width; 0: 2/3 of 4*dim rounded up to multiple_of")
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
    seed: int = _knob(1337, "seed of weights, batches and dropout")
    device: str = _knob("auto", "auto (cuda if available, else cpu), cpu, cuda, cuda:N")
    dtype: str = _knob("auto", "auto (bf16, or fp16 without bf16 support, on CUDA; fp32 elsewhere), "
                               "float32, bfloat16, float16")
    compile: bool = _knob(False, "torch.compile the model")


_FIELDS = {f.name: f for f in fields(TrainConfig)}
_TYPES = {name: type(f.default) for name, f in _FIELDS.items()}
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


# ---------------------------------------------------------------------------------------------
# configuration: defaults < resumed checkpoint < TOML < flags


def build_parser() -> argparse.ArgumentParser:
    """The `babyllama train` argument parser: --config plus one flag per TrainConfig field."""
    p = argparse.ArgumentParser(
        prog="babyllama train",
        description="Train a Llama-architecture model on pretokenized shards (torchrun for several processes).",
        argument_default=argparse.SUPPRESS,  # absent flags stay absent, so they do not override the file
    )
    p.add_argument("--config", metavar="TOML", help="read settings from a TOML file (flags override it)")
    for name, f in _FIELDS.items():
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
        if key not in _FIELDS:
            raise TrainError(f"{path}: unknown key {key!r} (known keys: {', '.join(_FIELDS)})")
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
    if tc.dtype not in ("auto", *_DTYPES):
        raise TrainError(f"--dtype must be one of auto, {', '.join(_DTYPES)}; got {tc.dtype!r}")


def model_config(tc: TrainConfig, vocab_size: int) -> ModelConfig:
    """The ModelConfig a TrainConfig asks for (ConfigError if the shape is impossible)."""
    return ModelConfig(
        dim=tc.dim,
        hidden_dim=tc.hidden_dim or llama_hidden_dim(tc.dim, tc.multiple_of),
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


# ---------------------------------------------------------------------------------------------
# runtime pieces: devices, RNG state, checkpoints, interrupts


def _resolve_device(tc: TrainConfig, local_rank: int, ddp: bool) -> tuple[torch.device, torch.dtype]:
    name = tc.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise TrainError(f"--device {tc.device!r} is not a torch device (try auto, cpu, cuda, cuda:1)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise TrainError(f"--device {tc.device}: CUDA is not available here (use --device cpu)")
        if ddp:  # one GPU per process
            device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if tc.dtype == "auto":
        dtype = torch.float32
        if device.type == "cuda":
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    else:
        dtype = _DTYPES[tc.dtype]
        if dtype != torch.float32 and device.type != "cuda":
            raise TrainError(f"--dtype {tc.dtype} is for CUDA (autocast); on {device.type} use float32")
    return device, dtype


def _rng_state(device: torch.device) -> dict:
    # NumPy's key array is stored as a list so that torch.load(weights_only=True) can read it back.
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (name, keys.tolist(), pos, has_gauss, gauss),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
    }


def _set_rng_state(state: dict, device: torch.device) -> None:
    random.setstate(state["python"])
    np.random.set_state(tuple(state["numpy"]))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def load_train_checkpoint(path: str | os.PathLike) -> dict:
    """Read a training checkpoint written by `babyllama train` (tensors on the CPU)."""
    path = Path(path)
    if not path.is_file():
        raise TrainError(f"{path}: no checkpoint to resume from")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: torch raises many kinds
        raise TrainError(f"{path}: not a readable training checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CKPT_FORMAT:
        raise TrainError(f"{path}: not a babyllama training checkpoint")
    if ckpt.get("version") != CKPT_VERSION:
        raise TrainError(f"{path}: training checkpoint version {ckpt.get('version')}, expected {CKPT_VERSION}")
    return ckpt


def _config_diff(old: ModelConfig, new: ModelConfig) -> str:
    return ", ".join(
        f"{k} {v} (checkpoint) vs {new.to_dict()[k]} (requested)"
        for k, v in old.to_dict().items() if new.to_dict()[k] != v
    )


class _Interrupts:
    """Ctrl-C that never lands half-way through a parameter update.

    Outside `update()` SIGINT raises KeyboardInterrupt as usual; inside, it is remembered and
    raised when the update is complete, so the saved state is always a whole step.
    """

    def __init__(self):
        self.in_update = self.pending = False
        self.previous = None

    def _handler(self, signum, frame):
        if self.in_update:
            self.pending = True
        else:
            raise KeyboardInterrupt

    def __enter__(self):
        with contextlib.suppress(ValueError):  # signal handlers can only be set from the main thread
            self.previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)

    @contextlib.contextmanager
    def update(self):
        self.in_update = True
        try:
            yield
        finally:
            self.in_update = False
        if self.pending:
            self.pending = False
            raise KeyboardInterrupt


def _fmt_seconds(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def plot_losses(metrics_path: Path, png_path: Path) -> bool:
    """Draw the train/val loss curves of metrics.jsonl; False if matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    events = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    fig, ax = plt.subplots(figsize=(7, 4))
    for kind, key, label in (("train", "loss", "train"), ("eval", "val_loss", "val")):
        pts = [(e["iter"], e[key]) for e in events if e["event"] == kind]
        if pts:
            ax.plot(*zip(*pts), label=label, marker="o" if kind == "eval" else None)
    ax.set(xlabel="step", ylabel="loss", title="babyllama training loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)
    return True


# ---------------------------------------------------------------------------------------------
# the training run


def main(argv: list[str] | None = None) -> int:
    """`babyllama train`: returns 0 when done, 130 after Ctrl-C; raises BabyLlamaError on bad input."""
    tc, explicit = parse_config(argv)
    return train(tc, explicit)


def train(tc: TrainConfig, explicit: dict | None = None) -> int:
    """Run training as configured. `explicit` (settings given by the user) matters on resume:
    the other settings are taken from the checkpoint so that `--resume` alone continues the run."""
    from .data import TokenWindows  # the shard reader; imported here so `import babyllama.train` stays light

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    ddp, master = world_size > 1, rank == 0
    log = (lambda *a: print(*a, flush=True)) if master else (lambda *a: None)

    out_dir = Path(tc.out_dir)
    ckpt_path = out_dir / CKPT_NAME
    ckpt = None
    if tc.resume:
        ckpt = load_train_checkpoint(ckpt_path)
        saved = {k: v for k, v in ckpt["train_config"].items() if k in _FIELDS}
        tc = replace(TrainConfig(**saved), **(explicit if explicit is not None else asdict(tc)))
        tc = replace(tc, resume=True)
    validate(tc, world_size)
    if not Path(tc.data_dir).is_dir():
        raise TrainError(f"--data_dir {tc.data_dir}: no such directory (run `babyllama data pretokenize` first)")

    device, dtype = _resolve_device(tc, local_rank, ddp)
    dist = None
    if ddp:
        import torch.distributed as dist

        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    try:
        code = _run(tc, ckpt, ckpt_path, out_dir, TokenWindows, dist, device, dtype, rank, world_size, log)
        if dist is not None and code == 0:
            # no rank may tear down gloo's connections while another still uses them (seen as
            # "terminate called without an active exception" / SIGABRT in CI); only after a normal
            # finish, so a failed or interrupted rank cannot leave the others waiting here
            dist.barrier()
        return code
    finally:
        if dist is not None and dist.is_initialized():
            dist.destroy_process_group()


def _run(tc, ckpt, ckpt_path, out_dir, TokenWindows, dist, device, dtype, rank, world_size, log) -> int:
    ddp, master = dist is not None, rank == 0
    train_data = TokenWindows(tc.data_dir, "train", tc.seq_len, tc.batch_size, tc.seed, rank=rank, world_size=world_size)
    val_data = TokenWindows(tc.data_dir, "val", tc.seq_len, tc.batch_size, tc.seed, rank=rank, world_size=world_size)
    cfg = model_config(tc, train_data.vocab_size)
    if ckpt is not None:
        old = ModelConfig.from_dict(ckpt["model_config"])
        if old != cfg:
            raise TrainError(f"{ckpt_path}: cannot resume: the model differs: {_config_diff(old, cfg)}")

    # Same seed on every rank -> identical initial weights; then a per-rank seed so that dropout
    # masks differ between ranks (rank 0 keeps the seed of a 1-process run).
    random.seed(tc.seed)
    np.random.seed(tc.seed)
    torch.manual_seed(tc.seed)
    raw_model = Transformer(cfg, dropout=tc.dropout).to(device)
    torch.manual_seed(tc.seed + rank)

    # AdamW with decoupled weight decay on the matrices only: decaying norm gains pulls them to 0.
    params = [p for p in raw_model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": tc.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    fused = device.type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters
    optimizer = torch.optim.AdamW(groups, lr=tc.lr, betas=(tc.beta1, tc.beta2), **({"fused": True} if fused else {}))
    # fp16 gradients underflow without loss scaling; bf16 and fp32 do not need it.
    if hasattr(torch.amp, "GradScaler"):
        scaler = torch.amp.GradScaler(device.type, enabled=(dtype == torch.float16))
    else:  # torch < 2.3
        scaler = torch.cuda.amp.GradScaler(enabled=(dtype == torch.float16))
    autocast = (
        torch.autocast(device_type=device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
    )

    start_iter, best_val = 0, float("inf")
    if ckpt is not None:
        raw_model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        start_iter, best_val = ckpt["iter_num"], ckpt["best_val_loss"]
        states = ckpt["rng_states"]
        if rank < len(states) and states[rank] is not None:
            _set_rng_state(states[rank], device)
        else:
            log(f"note: no saved RNG state for rank {rank}; dropout masks will differ from an uninterrupted run")
        del ckpt

    if device.type == "cuda":  # TF32 matmuls: much faster on Ampere+, harmless for training
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    model = torch.compile(raw_model) if tc.compile else raw_model
    eval_model = model
    if ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)

    rows = tc.batch_size // world_size  # this rank's share of a step
    micro = rows // tc.grad_accum
    tokens_per_step = tc.batch_size * tc.seq_len
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = out_dir / "metrics.jsonl"
    if master:
        _trim_metrics(metrics_path, start_iter)

    t_run = time.perf_counter()

    def record(event: dict) -> None:
        """Append to metrics.jsonl; elapsed_s (since this process started training) gives loss vs time."""
        if master:
            event["elapsed_s"] = round(time.perf_counter() - t_run, 3)
            with open(metrics_path, "a") as f:
                f.write(json.dumps(event) + "\n")

    def mean_over_ranks(t: torch.Tensor) -> float:
        if ddp:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            t = t / world_size
        return t.item()

    @torch.no_grad()
    def evaluate() -> float:
        """Mean validation loss over the same eval_iters batches every time."""
        eval_model.eval()
        total = torch.zeros((), device=device)
        for i in range(tc.eval_iters):
            x, y = val_data.batch(i)
            for xm, ym in zip(x.split(micro), y.split(micro)):
                with autocast:
                    _, loss = eval_model(xm.to(device), ym.to(device))
                total += loss.float()
        eval_model.train()
        return mean_over_ranks(total / (tc.eval_iters * tc.grad_accum))

    last_saved = start_iter if tc.resume else -1

    def save(completed: int, rng_states: list) -> None:
        nonlocal last_saved
        state = {
            "format": CKPT_FORMAT,
            "version": CKPT_VERSION,
            "model": raw_model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler.is_enabled() else None,
            "model_config": cfg.to_dict(),
            "train_config": asdict(tc),
            "iter_num": completed,
            "best_val_loss": best_val,
            "world_size": world_size,
            "rng_states": rng_states,
        }
        atomic_write(ckpt_path, lambda f: torch.save(state, f))
        last_saved = completed

    def gathered_rng() -> list:
        """Every rank's RNG state (a collective call under DDP), so each rank resumes its own."""
        mine = _rng_state(device)
        if not ddp:
            return [mine]
        allstates = [None] * world_size
        dist.all_gather_object(allstates, mine)
        return allstates

    def eval_and_maybe_save(completed: int, force: bool) -> None:
        nonlocal best_val
        val = evaluate()
        improved = val < best_val
        best_val = min(best_val, val)
        log(f"iter {completed}: val loss {val:.4f}" + (" (best)" if improved else ""))
        record({"event": "eval", "iter": completed, "val_loss": val, "best_val_loss": best_val})
        if completed > 0 and (force or improved or tc.always_save_checkpoint):
            rng = gathered_rng()
            if master:
                save(completed, rng)

    n_params = sum(p.numel() for p in raw_model.parameters())
    log(f"model: {n_params / 1e6:.2f}M parameters, {cfg}")
    log(f"training on {device} ({str(dtype).replace('torch.', '')}), {world_size} process(es), "
        f"{tc.batch_size} x {tc.seq_len} = {tokens_per_step:,} tokens per step, steps {start_iter} -> {tc.max_iters}")
    if start_iter >= tc.max_iters:
        log(f"{ckpt_path} is already at step {start_iter} >= --max_iters {tc.max_iters}; nothing to do")
        return 0

    interrupts = _Interrupts()
    completed = start_iter
    rng_snapshot = _rng_state(device)  # RNG state at the boundary `completed`
    loss_acc = torch.zeros((), device=device)
    steps_acc, t_log, ms_avg = 0, time.perf_counter(), None
    try:
        with interrupts:
            if start_iter == 0:
                eval_and_maybe_save(0, force=False)  # the starting loss, ~ln(vocab_size)
            for it in range(start_iter, tc.max_iters):
                lr = lr_at(it, tc)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                x, y = train_data.batch(it)  # (rows, T) each: this rank's share of step `it`
                for k, (xm, ym) in enumerate(zip(x.split(micro), y.split(micro))):
                    # Under DDP only the last micro-step all-reduces gradients; the others accumulate.
                    sync = k == tc.grad_accum - 1
                    with (model.no_sync() if ddp and not sync else contextlib.nullcontext()):
                        with autocast:
                            _, loss = model(xm.to(device, non_blocking=True), ym.to(device, non_blocking=True))
                            loss = loss / tc.grad_accum  # the mean over the whole step's micro-batches
                        scaler.scale(loss).backward()
                    loss_acc += loss.detach().float()
                if tc.grad_clip > 0:
                    scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
                    torch.nn.utils.clip_grad_norm_(raw_model.parameters(), tc.grad_clip)
                with interrupts.update():
                    scaler.step(optimizer)
                    scaler.update()
                    optimizer.zero_grad(set_to_none=True)
                    completed = it + 1
                    rng_snapshot = _rng_state(device)
                steps_acc += 1

                if completed % tc.log_interval == 0 or completed == tc.max_iters:
                    lossf = mean_over_ranks(loss_acc / steps_acc)  # .item() syncs the GPU here only
                    now = time.perf_counter()
                    ms = 1000 * (now - t_log) / steps_acc
                    ms_avg = ms if ms_avg is None else 0.9 * ms_avg + 0.1 * ms
                    eta = _fmt_seconds((tc.max_iters - completed) * ms_avg / 1000)
                    tok_s = tokens_per_step / (ms / 1000)
                    log(f"iter {completed}/{tc.max_iters} | loss {lossf:.4f} | lr {lr:.2e} | "
                        f"{tok_s:,.0f} tok/s | {ms:.1f} ms/iter | ETA {eta}")
                    record({"event": "train", "iter": completed, "loss": lossf, "lr": lr,
                            "tokens_per_sec": tok_s, "ms_per_iter": ms})
                    loss_acc.zero_()
                    steps_acc, t_log = 0, time.perf_counter()
                if completed % tc.eval_interval == 0 or completed == tc.max_iters:
                    eval_and_maybe_save(completed, force=completed == tc.max_iters)
                    t_log = time.perf_counter()  # evaluation time is not training speed
    except KeyboardInterrupt:
        if master:
            _save_after_interrupt(completed, last_saved, ckpt_path, tc, world_size,
                                  lambda: save(completed, [rng_snapshot] + [None] * (world_size - 1)))
        return 130

    log(f"done: {completed} steps, best val loss {best_val:.4f}, checkpoint {ckpt_path}")
    if master:
        png = out_dir / "loss.png"
        if plot_losses(metrics_path, png):
            log(f"loss curve: {png}")
        else:
            log("matplotlib is not installed; skipping the loss-curve plot")
    return 0


def _save_after_interrupt(completed, last_saved, ckpt_path, tc, world_size, save) -> None:
    resume = f"babyllama train --out_dir {tc.out_dir} --resume"
    if world_size > 1:
        resume = f"torchrun --nproc_per_node {world_size} -m babyllama.train --out_dir {tc.out_dir} --resume"
    try:
        if completed != last_saved and completed > 0:
            save()
    except KeyboardInterrupt:
        where = f"{ckpt_path} (step {last_saved}) was left intact" if last_saved > 0 else "nothing was saved"
        print(f"\ninterrupted while saving; {where}", flush=True)
        return
    if completed > 0:
        print(f"\ninterrupted: step {completed} saved to {ckpt_path}; resume with: {resume}", flush=True)
    else:
        print("\ninterrupted before the first step completed; nothing was saved", flush=True)


def _trim_metrics(path: Path, start_iter: int) -> None:
    """Start a fresh metrics log, or on resume drop events past the checkpoint's step."""
    if start_iter == 0 or not path.exists():
        path.write_text("")
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["iter"] <= start_iter]
    atomic_write(path, lambda f: f.write("".join(line + "\n" for line in kept).encode()))


def _entry() -> int:
    """`python -m babyllama.train` (what torchrun runs): errors as one line on stderr."""
    try:
        return main()
    except BabyLlamaError as e:
        print(f"babyllama train: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(_entry())
