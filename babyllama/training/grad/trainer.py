"""`babyllama train --backend numba`: training/loop.py's run with the hand-written arithmetic.

The same settings, data windows (TokenWindows.batch_numpy), learning-rate schedule, gradient
accumulation (each micro-step's loss scaled by 1 / grad_accum, as the torch trainer's), clipping,
AdamW, evaluation and ckpt.pt as `babyllama train --backend torch`; the initial weights are the
torch model's for the seed. One process on the CPU, float32, no dropout (training/config.py's
choose_backend refuses other settings).
"""

from __future__ import annotations

import random
from dataclasses import asdict

import numpy as np
from threadpoolctl import threadpool_limits

from ...formats.ckpt import save_train_checkpoint
from ..config import TrainConfig
from ..loop import TrainingRun, prepare
from . import state
from .adamw import AdamW
from .gpt2 import GPT2
from .layout import Layout
from .llama import Llama
from .workers import Workers, threads

MODELS = {"llama": Llama, "gpt2": GPT2}


def initial_weights(cfg, seed: int):
    """The torch trainer's initial weights for this seed (the same generator calls, so either
    backend starts from the same model)."""
    import torch

    from ..model import build_model

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return build_model(cfg).to_weights()


def _rng_state() -> dict:
    """What the torch trainer saves, less torch's generators (this backend draws from none)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(), "numpy": (name, keys.tolist(), pos, has_gauss, gauss),
            "torch": None, "cuda": None}


def train(tc: TrainConfig, explicit: dict | None = None, prepared: tuple | None = None) -> int:
    """As torch_loop.train, for one process: 0 when done, 130 after Ctrl-C or SIGTERM."""
    tc, ckpt = prepared if prepared is not None else prepare(tc, explicit)
    log = lambda *a: print(*a, flush=True)  # noqa: E731
    with threadpool_limits(1, user_api="blas"):  # one BLAS thread per worker (workers.py says why)
        run = NumbaRun(tc, ckpt, rank=0, world_size=1, log=log)
        try:
            return run.run()
        finally:
            run.workers.close()


class NumbaRun(TrainingRun):
    """TrainingRun on flat NumPy buffers: parameters, gradients and AdamW's moments."""

    def setup(self, ckpt: dict | None) -> None:
        tc, cfg = self.tc, self.cfg
        Model = MODELS[cfg.arch]
        self.layout = Layout(cfg, Model.FUSED)
        self.params, self.grads = self.layout.zeros(), self.layout.zeros()
        self.P = self.layout.views(self.params)
        self.workers = Workers(Model, cfg, self.layout, self.micro, threads())
        self.opt = AdamW(self.layout.size, self.layout.n_decay, tc.weight_decay, tc.beta1, tc.beta2)
        self.lr = tc.lr
        if ckpt is None:
            state.load_into(self.layout, self.params, initial_weights(cfg, tc.seed))
        else:
            state.restore(self.layout, self.params, self.opt, ckpt, str(self.ckpt_path))
            saved = ckpt["rng_states"][0] if ckpt["rng_states"] else None
            if saved is not None:  # nothing here draws from them; kept for a torch resume
                random.setstate(saved["python"])
                np.random.set_state(tuple(saved["numpy"]))

    def n_params(self) -> int:
        return self.layout.size

    def description(self) -> str:
        return f"cpu (float32, hand-written forward and backward, {len(self.workers.models)} threads)"

    def set_lr(self, lr: float) -> None:
        self.lr = lr

    def accumulate_gradients(self, it: int) -> float:
        """Forward and backward over step `it` in grad_accum micro-steps -> the step's mean loss."""
        tc, T = self.tc, self.cfg.seq_len
        x, y = self.train_data.batch_numpy(it)  # (batch, T) each
        self.workers.zero_grad()
        loss = 0.0
        for k in range(tc.grad_accum):
            rows = slice(k * self.micro, (k + 1) * self.micro)
            # the mean over the whole step's tokens: each micro-step's mean loss / grad_accum
            loss += self.workers.forward_backward(self.P, x[rows], y[rows],
                                                  1.0 / (self.micro * T * tc.grad_accum)) / tc.grad_accum
        self.workers.gradient(self.grads)
        self.clip = self.opt.clip_coefficient(self.grads, tc.grad_clip)
        return loss

    def check_loss_now(self, it: int) -> bool:
        return True  # the loss is a Python float already

    def apply_update(self) -> None:
        self.opt.step(self.params, self.grads, self.lr, self.clip)

    def rng_state(self) -> dict:
        return _rng_state()

    def gathered_rng(self) -> list:
        return [_rng_state()]

    def evaluate(self) -> float:
        """Mean validation loss over the same eval_iters batches every time (as the torch trainer)."""
        tc, total = self.tc, 0.0
        for i in range(tc.eval_iters):
            x, y = self.val_data.batch_numpy(i)
            for k in range(tc.grad_accum):
                rows = slice(k * self.micro, (k + 1) * self.micro)
                total += self.workers.forward(self.P, x[rows], y[rows])
        return total / (tc.eval_iters * tc.grad_accum)

    def save(self, completed: int, rng_states: list) -> None:
        tc = self.tc
        save_train_checkpoint(
            self.ckpt_path, self.cfg, state.model_state_dict(self.layout, self.params),
            optimizer=state.optimizer_state_dict(self.layout, self.opt, self.lr, (tc.beta1, tc.beta2),
                                                 tc.weight_decay),
            scaler=None, train_config=asdict(tc), iter_num=completed, best_val_loss=self.best_val, world_size=1,
            rng_states=rng_states,
        )
