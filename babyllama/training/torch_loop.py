"""The torch training run: one CPU/GPU, or many processes under torchrun (DDP).

    babyllama train --data_dir data/tok512 --out_dir out --dim 64 --n_layers 5 --max_iters 2000
    babyllama train --out_dir out --resume --max_iters 4000  # continue exactly where it stopped
    torchrun --standalone --nproc_per_node 4 -m babyllama train --config run.toml

A checkpoint (out_dir/ckpt.pt, formats/ckpt.py, written atomically) holds everything needed to
continue bit-for-bit: weights, optimizer and grad-scaler state, both configs, the step count, the
best validation loss and every RNG state. Ctrl-C or SIGTERM finishes nothing half-way: it saves
the last completed step and exits with status 130.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import json
import os
import random
import signal
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from ..config import ModelConfig
from ..errors import TrainError
from ..fileio import check_output, make_folder, write_bytes
from ..formats.ckpt import load_train_checkpoint, save_train_checkpoint
from .config import DTYPES, FIELDS, TrainConfig, lr_at, model_config, validate
from .model import Transformer

CKPT_NAME = "ckpt.pt"


# ---------------------------------------------------------------------------------------------
# runtime pieces: devices, RNG state, interrupts, the metrics log


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
        dtype = getattr(torch, DTYPES[tc.dtype])
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


def _config_diff(old: ModelConfig, new: ModelConfig) -> str:
    return ", ".join(
        f"{k} {v} (checkpoint) vs {new.to_dict()[k]} (requested)"
        for k, v in old.to_dict().items() if new.to_dict()[k] != v
    )


class _Interrupts:
    """Ctrl-C (SIGINT) or SIGTERM that never lands half-way through a parameter update.

    Outside `update()` either signal raises KeyboardInterrupt at once; inside, it is remembered
    and raised when the update is complete, so the saved state is always a whole step.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.in_update = self.pending = False
        self.previous = {}

    def _handler(self, signum, frame):
        if self.in_update:
            self.pending = True
        else:
            raise KeyboardInterrupt

    def __enter__(self):
        for sig in self.SIGNALS:
            with contextlib.suppress(ValueError):  # signal handlers can only be set from the main thread
                self.previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}

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
    png = io.BytesIO()
    fig.savefig(png, format="png")
    plt.close(fig)
    write_bytes(png_path, png.getvalue())
    return True


def _trim_metrics(path: Path, start_iter: int) -> None:
    """Start a fresh metrics log, or on resume drop events past the checkpoint's step."""
    kept = []
    if start_iter > 0 and path.exists():
        lines = path.read_text().splitlines()
        kept = [line for line in lines if line.strip() and json.loads(line)["iter"] <= start_iter]
    write_bytes(path, "".join(line + "\n" for line in kept).encode())


def _resume_command(tc: TrainConfig, world_size: int) -> str:
    if world_size > 1:
        return f"torchrun --nproc_per_node {world_size} -m babyllama train --out_dir {tc.out_dir} --resume"
    return f"babyllama train --out_dir {tc.out_dir} --resume"


# ---------------------------------------------------------------------------------------------
# the training run


def train(tc: TrainConfig, explicit: dict | None = None) -> int:
    """Run training as configured; 0 when done, 130 after Ctrl-C or SIGTERM (the last completed
    step saved). `explicit` (the settings the user gave) matters on resume: the other settings
    are taken from the checkpoint, so that `--resume` alone continues the run."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    log = (lambda *a: print(*a, flush=True)) if rank == 0 else (lambda *a: None)

    ckpt_path = Path(tc.out_dir) / CKPT_NAME
    ckpt = None
    if tc.resume:
        if not ckpt_path.is_file():
            raise TrainError(f"{ckpt_path}: no checkpoint to resume from")
        ckpt = load_train_checkpoint(ckpt_path)
        saved = {k: v for k, v in ckpt["train_config"].items() if k in FIELDS}
        tc = replace(TrainConfig(**saved), **(explicit if explicit is not None else asdict(tc)))
        tc = replace(tc, resume=True)
    validate(tc, world_size)
    if not Path(tc.data_dir).is_dir():
        raise TrainError(f"--data_dir {tc.data_dir}: no such directory (run `babyllama data pretokenize` first)")
    check_output(tc.out_dir, [tc.data_dir], folder=True)

    device, dtype = _resolve_device(tc, local_rank, world_size > 1)
    dist = None
    if world_size > 1:
        import torch.distributed as dist

        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    try:
        run = _Run(tc, ckpt, dist, device, dtype, rank, world_size, log)
        ckpt = None  # its tensors are in the model and optimizer now
        code = run.run()
        if dist is not None and code == 0:
            # no rank may tear down gloo's connections while another still uses them (seen as
            # "terminate called without an active exception" / SIGABRT in CI); only after a normal
            # finish, so a failed or interrupted rank cannot leave the others waiting here
            dist.barrier()
        return code
    finally:
        if dist is not None and dist.is_initialized():
            dist.destroy_process_group()


class _Run:
    """One process's share of a training run: set up by the constructor (data, model, optimizer,
    the resumed state, the output folder), then `run()` steps, evaluates and saves."""

    def __init__(self, tc: TrainConfig, ckpt: dict | None, dist, device, dtype, rank: int, world_size: int, log):
        from ..data import TokenWindows  # imported here so `import babyllama.training.torch_loop` stays light

        self.tc, self.dist, self.device, self.dtype, self.log = tc, dist, device, dtype, log
        self.rank, self.world_size, self.master = rank, world_size, rank == 0
        self.out_dir = Path(tc.out_dir)
        self.ckpt_path = self.out_dir / CKPT_NAME
        self.train_data, self.val_data = (
            TokenWindows(tc.data_dir, split, tc.seq_len, tc.batch_size, tc.seed, rank=rank, world_size=world_size)
            for split in ("train", "val"))
        self.cfg = model_config(tc, self.train_data.vocab_size)
        if ckpt is not None and ckpt["model_config"] != self.cfg:
            raise TrainError(f"{self.ckpt_path}: cannot resume: the model differs: "
                             f"{_config_diff(ckpt['model_config'], self.cfg)}")
        self._build_model()
        self.start_iter, self.best_val = 0, float("inf")
        if ckpt is not None:
            self._restore(ckpt)
        self._wrap_model()

        self.micro = tc.batch_size // world_size // tc.grad_accum  # rows of one micro-step on this rank
        self.tokens_per_step = tc.batch_size * tc.seq_len
        make_folder(self.out_dir, [tc.data_dir])
        self.metrics_path = self.out_dir / "metrics.jsonl"
        if self.master:
            _trim_metrics(self.metrics_path, self.start_iter)
        self.t_run = time.perf_counter()
        self.last_saved = self.start_iter if tc.resume else -1

    # -- setup ----------------------------------------------------------------------------------

    def _build_model(self) -> None:
        """The model, the optimizer, the grad scaler and autocast, seeded."""
        tc, device = self.tc, self.device
        # Same seed on every rank -> identical initial weights; then a per-rank seed so that dropout
        # masks differ between ranks (rank 0 keeps the seed of a 1-process run).
        random.seed(tc.seed)
        np.random.seed(tc.seed)
        torch.manual_seed(tc.seed)
        self.raw_model = Transformer(self.cfg, dropout=tc.dropout).to(device)
        torch.manual_seed(tc.seed + self.rank)

        # AdamW with decoupled weight decay on the matrices only: decaying norm gains pulls them to 0.
        params = [p for p in self.raw_model.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": tc.weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        fused = device.type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters
        self.optimizer = torch.optim.AdamW(groups, lr=tc.lr, betas=(tc.beta1, tc.beta2),
                                           **({"fused": True} if fused else {}))
        # fp16 gradients underflow without loss scaling; bf16 and fp32 do not need it.
        if hasattr(torch.amp, "GradScaler"):
            self.scaler = torch.amp.GradScaler(device.type, enabled=(self.dtype == torch.float16))
        else:  # torch < 2.3
            self.scaler = torch.cuda.amp.GradScaler(enabled=(self.dtype == torch.float16))
        self.autocast = (torch.autocast(device_type=device.type, dtype=self.dtype) if self.dtype != torch.float32
                         else contextlib.nullcontext())

    def _restore(self, ckpt: dict) -> None:
        """Weights, optimizer, scaler, step, best loss and this rank's RNG state from a checkpoint."""
        self.raw_model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.start_iter, self.best_val = ckpt["iter_num"], ckpt["best_val_loss"]
        states = ckpt["rng_states"]
        if self.rank < len(states) and states[self.rank] is not None:
            _set_rng_state(states[self.rank], self.device)
        else:
            self.log(f"note: no saved RNG state for rank {self.rank}; dropout masks will differ from an "
                     "uninterrupted run")

    def _wrap_model(self) -> None:
        """TF32 on CUDA, torch.compile, DDP: self.model trains, self.eval_model evaluates."""
        if self.device.type == "cuda":  # TF32 matmuls: much faster on Ampere+, harmless for training
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.model = torch.compile(self.raw_model) if self.tc.compile else self.raw_model
        self.eval_model = self.model
        if self.dist is not None:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.model = DDP(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                             broadcast_buffers=False)

    # -- metrics, evaluation, checkpoints -------------------------------------------------------

    def record(self, event: dict) -> None:
        """Append to metrics.jsonl; elapsed_s (since this process started training) gives loss vs time."""
        if self.master:
            event["elapsed_s"] = round(time.perf_counter() - self.t_run, 3)
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(event) + "\n")

    def mean_over_ranks(self, t: torch.Tensor) -> float:
        if self.dist is not None:
            self.dist.all_reduce(t, op=self.dist.ReduceOp.SUM)
            t = t / self.world_size
        return t.item()

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean validation loss over the same eval_iters batches every time."""
        tc, model = self.tc, self.eval_model
        model.eval()
        total = torch.zeros((), device=self.device)
        for i in range(tc.eval_iters):
            x, y = self.val_data.batch(i)
            for xm, ym in zip(x.split(self.micro), y.split(self.micro)):
                with self.autocast:
                    _, loss = model(xm.to(self.device), ym.to(self.device))
                total += loss.float()
        model.train()
        return self.mean_over_ranks(total / (tc.eval_iters * tc.grad_accum))

    def gathered_rng(self) -> list:
        """Every rank's RNG state (a collective call under DDP), so each rank resumes its own."""
        mine = _rng_state(self.device)
        if self.dist is None:
            return [mine]
        states = [None] * self.world_size
        self.dist.all_gather_object(states, mine)
        return states

    def save(self, completed: int, rng_states: list) -> None:
        save_train_checkpoint(
            self.ckpt_path, self.cfg, self.raw_model.state_dict(), optimizer=self.optimizer.state_dict(),
            scaler=self.scaler.state_dict() if self.scaler.is_enabled() else None, train_config=asdict(self.tc),
            iter_num=completed, best_val_loss=self.best_val, world_size=self.world_size, rng_states=rng_states,
        )
        self.last_saved = completed

    def eval_and_maybe_save(self, completed: int, force: bool) -> None:
        val = self.evaluate()
        improved = val < self.best_val
        self.best_val = min(self.best_val, val)
        self.log(f"iter {completed}: val loss {val:.4f}" + (" (best)" if improved else ""))
        self.record({"event": "eval", "iter": completed, "val_loss": val, "best_val_loss": self.best_val})
        if completed > 0 and (force or improved or self.tc.always_save_checkpoint):
            rng = self.gathered_rng()
            if self.master:
                self.save(completed, rng)

    def save_after_interrupt(self, completed: int, rng_snapshot: dict) -> None:
        """The master's save on Ctrl-C / SIGTERM: the last completed step, unless already saved."""
        try:
            if completed != self.last_saved and completed > 0:
                self.save(completed, [rng_snapshot] + [None] * (self.world_size - 1))
        except KeyboardInterrupt:
            where = (f"{self.ckpt_path} (step {self.last_saved}) was left intact" if self.last_saved > 0
                     else "nothing was saved")
            print(f"\ninterrupted while saving; {where}", flush=True)
            return
        if completed > 0:
            print(f"\ninterrupted: step {completed} saved to {self.ckpt_path}; resume with: "
                  f"{_resume_command(self.tc, self.world_size)}", flush=True)
        else:
            print("\ninterrupted before the first step completed; nothing was saved", flush=True)

    # -- the step loop --------------------------------------------------------------------------

    def accumulate_gradients(self, it: int, loss_acc: torch.Tensor) -> None:
        """Forward and backward over this rank's share of step `it`, in grad_accum micro-steps;
        the step's loss is added to loss_acc."""
        tc, device = self.tc, self.device
        x, y = self.train_data.batch(it)  # (rows, T) each
        for k, (xm, ym) in enumerate(zip(x.split(self.micro), y.split(self.micro))):
            # Under DDP only the last micro-step all-reduces gradients; the others accumulate.
            sync = k == tc.grad_accum - 1
            with (self.model.no_sync() if self.dist is not None and not sync else contextlib.nullcontext()):
                with self.autocast:
                    _, loss = self.model(xm.to(device, non_blocking=True), ym.to(device, non_blocking=True))
                    loss = loss / tc.grad_accum  # the mean over the whole step's micro-batches
                self.scaler.scale(loss).backward()
            loss_acc += loss.detach().float()
        if tc.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
            torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), tc.grad_clip)

    def run(self) -> int:
        """Train from start_iter to max_iters: 0 when done, 130 when interrupted."""
        tc = self.tc
        n_params = sum(p.numel() for p in self.raw_model.parameters())
        self.log(f"model: {n_params / 1e6:.2f}M parameters, {self.cfg}")
        self.log(f"training on {self.device} ({str(self.dtype).replace('torch.', '')}), {self.world_size} process(es), "
                 f"{tc.batch_size} x {tc.seq_len} = {self.tokens_per_step:,} tokens per step, "
                 f"steps {self.start_iter} -> {tc.max_iters}")
        if self.start_iter >= tc.max_iters:
            self.log(f"{self.ckpt_path} is already at step {self.start_iter} >= --max_iters {tc.max_iters}; "
                     "nothing to do")
            return 0

        interrupts = _Interrupts()
        completed = self.start_iter
        rng_snapshot = _rng_state(self.device)  # RNG state at the boundary `completed`
        loss_acc = torch.zeros((), device=self.device)
        steps_acc, t_log, ms_avg = 0, time.perf_counter(), None
        try:
            with interrupts:
                if self.start_iter == 0:
                    self.eval_and_maybe_save(0, force=False)  # the starting loss, ~ln(vocab_size)
                for it in range(self.start_iter, tc.max_iters):
                    lr = lr_at(it, tc)
                    for group in self.optimizer.param_groups:
                        group["lr"] = lr
                    self.accumulate_gradients(it, loss_acc)
                    with interrupts.update():
                        self.scaler.step(self.optimizer)
                        self.scaler.update()
                        self.optimizer.zero_grad(set_to_none=True)
                        completed = it + 1
                        rng_snapshot = _rng_state(self.device)
                    steps_acc += 1

                    if completed % tc.log_interval == 0 or completed == tc.max_iters:
                        lossf = self.mean_over_ranks(loss_acc / steps_acc)  # .item() syncs the GPU here only
                        ms = 1000 * (time.perf_counter() - t_log) / steps_acc
                        ms_avg = ms if ms_avg is None else 0.9 * ms_avg + 0.1 * ms
                        self.log_progress(completed, lossf, lr, ms, ms_avg)
                        loss_acc.zero_()
                        steps_acc, t_log = 0, time.perf_counter()
                    if completed % tc.eval_interval == 0 or completed == tc.max_iters:
                        self.eval_and_maybe_save(completed, force=completed == tc.max_iters)
                        t_log = time.perf_counter()  # evaluation time is not training speed
        except KeyboardInterrupt:
            if self.master:
                self.save_after_interrupt(completed, rng_snapshot)
            return 130
        self.finish(completed)
        return 0

    def log_progress(self, completed: int, loss: float, lr: float, ms: float, ms_avg: float) -> None:
        tc = self.tc
        eta = _fmt_seconds((tc.max_iters - completed) * ms_avg / 1000)
        tok_s = self.tokens_per_step / (ms / 1000)
        self.log(f"iter {completed}/{tc.max_iters} | loss {loss:.4f} | lr {lr:.2e} | "
                 f"{tok_s:,.0f} tok/s | {ms:.1f} ms/iter | ETA {eta}")
        self.record({"event": "train", "iter": completed, "loss": loss, "lr": lr,
                     "tokens_per_sec": tok_s, "ms_per_iter": ms})

    def finish(self, completed: int) -> None:
        self.log(f"done: {completed} steps, best val loss {self.best_val:.4f}, checkpoint {self.ckpt_path}")
        if self.master:
            png = self.out_dir / "loss.png"
            if plot_losses(self.metrics_path, png):
                self.log(f"loss curve: {png}")
            else:
                self.log("matplotlib is not installed; skipping the loss-curve plot")
