"""The torch backend of a training run: one CPU/GPU, or many processes under torchrun (DDP).

    babyllama train --data_dir data/tok512 --out_dir out --dim 64 --n_layers 5 --max_iters 2000
    babyllama train --out_dir out --resume --max_iters 4000  # continue exactly where it stopped
    torchrun --standalone --nproc_per_node 4 -m babyllama train --config run.toml

The step loop, logging, evaluation points, checkpoints and interrupts are loop.TrainingRun's
(shared with the hand-written backend, training/grad); this module supplies torch's model
(Llama or GPT-2), autograd, AdamW, gradient clipping, mixed precision and DDP.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import random
from dataclasses import asdict

import numpy as np
import torch

from ..errors import TrainError
from ..formats.ckpt import save_train_checkpoint
from .config import DTYPES, TrainConfig
from .loop import TrainingRun, prepare
from .model import build_model


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
    """Restore what a checkpoint holds; the hand-written backend, which has no torch generator,
    saves None for torch's (nothing it did consumed it)."""
    random.setstate(state["python"])
    np.random.set_state(tuple(state["numpy"]))
    if state.get("torch") is not None:
        torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def train(tc: TrainConfig, explicit: dict | None = None, prepared: tuple | None = None) -> int:
    """Run training as configured; 0 when done, 130 after Ctrl-C or SIGTERM (the last completed
    step saved). `explicit` (the settings the user gave) matters on resume: the other settings
    are taken from the checkpoint, so that `--resume` alone continues the run. `prepared`: the
    (settings, checkpoint) loop.prepare already returned."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    log = (lambda *a: print(*a, flush=True)) if rank == 0 else (lambda *a: None)
    tc, ckpt = prepared if prepared is not None else prepare(tc, explicit, world_size)

    device, dtype = _resolve_device(tc, local_rank, world_size > 1)
    dist = None
    if world_size > 1:
        import torch.distributed as dist

        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    try:
        run = _TorchRun(tc, ckpt, dist, device, dtype, rank, world_size, log)
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


class _TorchRun(TrainingRun):
    """TrainingRun with torch: autograd, torch.optim.AdamW, autocast, DDP."""

    def __init__(self, tc: TrainConfig, ckpt: dict | None, dist, device, dtype, rank: int, world_size: int, log):
        self.dist, self.device, self.dtype = dist, device, dtype
        super().__init__(tc, ckpt, rank, world_size, log)

    # -- setup ----------------------------------------------------------------------------------

    def setup(self, ckpt: dict | None) -> None:
        self._build_model()
        if ckpt is not None:
            self._restore(ckpt)
        self._wrap_model()

    def _build_model(self) -> None:
        """The model, the optimizer, the grad scaler and autocast, seeded."""
        tc, device = self.tc, self.device
        # Same seed on every rank -> identical initial weights; then a per-rank seed so that dropout
        # masks differ between ranks (rank 0 keeps the seed of a 1-process run).
        random.seed(tc.seed)
        np.random.seed(tc.seed)
        torch.manual_seed(tc.seed)
        self.raw_model = build_model(self.cfg, dropout=tc.dropout).to(device)
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
        """Weights, optimizer, scaler and this rank's RNG state from a checkpoint."""
        self.raw_model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
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

    def n_params(self) -> int:
        return sum(p.numel() for p in self.raw_model.parameters())

    def description(self) -> str:
        compiled = ", torch.compile" if self.tc.compile else ""
        return f"{self.device} ({str(self.dtype).replace('torch.', '')}{compiled})"

    # -- the pieces of a step -------------------------------------------------------------------

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def accumulate_gradients(self, it: int) -> torch.Tensor:
        """Forward and backward over this rank's share of step `it`, in grad_accum micro-steps;
        the gradients are clipped; returns the step's mean loss (a 0-d tensor on the device)."""
        tc, device = self.tc, self.device
        x, y = self.train_data.batch(it)  # (rows, T) each
        step_loss = torch.zeros((), device=device)
        for k, (xm, ym) in enumerate(zip(x.split(self.micro), y.split(self.micro))):
            # Under DDP only the last micro-step all-reduces gradients; the others accumulate.
            sync = k == tc.grad_accum - 1
            with (self.model.no_sync() if self.dist is not None and not sync else contextlib.nullcontext()):
                with self.autocast:
                    _, loss = self.model(xm.to(device, non_blocking=True), ym.to(device, non_blocking=True))
                    loss = loss / tc.grad_accum  # the mean over the whole step's micro-batches
                self.scaler.scale(loss).backward()
            step_loss += loss.detach().float()
        if tc.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
            torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), tc.grad_clip)
        return step_loss

    def check_loss_now(self, it: int) -> bool:
        # every step on the CPU (reading the loss is free there); on a GPU only at log steps,
        # where the loop syncs anyway (a per-step .item() would stall the GPU's queue)
        return self.device.type != "cuda"

    def apply_update(self) -> None:
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)

    def rng_state(self) -> dict:
        return _rng_state(self.device)

    def mean_over_ranks(self, t) -> float:
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
