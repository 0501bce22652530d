"""The training run both backends share: settings merged on resume, the step loop with its
schedule, logging, evaluation, checkpoint points, Ctrl-C/SIGTERM and non-finite-loss stops. No
torch here: the torch backend (torch_loop.py) and the hand-written one (grad/trainer.py) each
subclass TrainingRun with their arithmetic (build, accumulate gradients, update, evaluate, save),
so the two cannot drift apart in what a step, a log line or a checkpoint means.

A checkpoint (out_dir/ckpt.pt, formats/ckpt.py, written atomically) holds everything needed to
continue bit-for-bit: weights, optimizer state, both configs, the step count, the best validation
loss and every RNG state. Ctrl-C or SIGTERM finishes nothing half-way: it saves the last completed
step and exits with status 130. A non-finite training or validation loss stops the run with a
one-line error before anything of that step is saved, so ckpt.pt keeps the last good step.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import signal
import time
from dataclasses import asdict, replace
from pathlib import Path

from ..config import ModelConfig
from ..errors import TrainError
from ..fileio import check_output, make_folder, write_bytes
from .config import FIELDS, TrainConfig, lr_at, model_config, validate

CKPT_NAME = "ckpt.pt"


def prepare(tc: TrainConfig, explicit: dict | None, world_size: int = 1) -> tuple[TrainConfig, dict | None]:
    """The run's settings and the checkpoint it resumes (None for a fresh run), checked.

    On --resume the settings not given explicitly come from the checkpoint, so that `--resume`
    alone continues the run; `explicit` is what the user gave (all of tc when None)."""
    ckpt = None
    if tc.resume:
        from ..formats.ckpt import load_train_checkpoint  # torch: only to read a ckpt.pt

        ckpt_path = Path(tc.out_dir) / CKPT_NAME
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
    return tc, ckpt


def _config_diff(old: ModelConfig, new: ModelConfig) -> str:
    return ", ".join(
        f"{k} {v} (checkpoint) vs {new.to_dict()[k]} (requested)"
        for k, v in old.to_dict().items() if new.to_dict()[k] != v
    )


class Interrupts:
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


class TrainingRun:
    """One process's share of a training run. The constructor opens the data, checks a resumed
    checkpoint's model, lets the backend build (and restore) its model and optimizer, and prepares
    the output folder; `run()` steps, evaluates and saves.

    A backend implements: setup(ckpt), n_params(), description(), set_lr(lr),
    accumulate_gradients(it) -> the step's loss (float or 0-d tensor), check_loss_now(it),
    apply_update(), rng_state(), gathered_rng(), evaluate() -> float, save(completed, rng_states),
    and may override mean_over_ranks(loss) (DDP).
    """

    def __init__(self, tc: TrainConfig, ckpt: dict | None, rank: int, world_size: int, log):
        from ..data import TokenWindows  # imported here so importing the trainers stays light

        self.tc, self.log = tc, log
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
        self.micro = tc.batch_size // world_size // tc.grad_accum  # rows of one micro-step on this rank
        self.tokens_per_step = tc.batch_size * tc.seq_len
        self.start_iter, self.best_val = 0, float("inf")
        if ckpt is not None:
            self.start_iter, self.best_val = ckpt["iter_num"], ckpt["best_val_loss"]
        self.setup(ckpt)
        make_folder(self.out_dir, [tc.data_dir])
        self.metrics_path = self.out_dir / "metrics.jsonl"
        if self.master:
            _trim_metrics(self.metrics_path, self.start_iter)
        self.t_run = time.perf_counter()
        self.last_saved = self.start_iter if tc.resume else -1

    # -- what a backend may override ----------------------------------------------------------

    def mean_over_ranks(self, loss) -> float:
        return float(loss)

    # -- metrics, evaluation, checkpoints -------------------------------------------------------

    def record(self, event: dict) -> None:
        """Append to metrics.jsonl; elapsed_s (since this process started training) gives loss vs time."""
        if self.master:
            event["elapsed_s"] = round(time.perf_counter() - self.t_run, 3)
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(event) + "\n")

    def stop_if_not_finite(self, loss: float, what: str, step: int) -> None:
        """A NaN or infinite loss ends the run before that step is saved (ckpt.pt keeps the last
        good one): a one-line TrainError saying where it happened and what is on disk."""
        if math.isfinite(loss):
            return
        kept = (f"{self.ckpt_path} keeps step {self.last_saved}, the last good one"
                if self.last_saved > 0 else "nothing was saved")
        raise TrainError(f"step {step}: the {what} loss is {loss} (not finite); training stopped and {kept}; "
                         "try a lower --lr, or --grad_clip")

    def eval_and_maybe_save(self, completed: int, force: bool) -> None:
        val = self.evaluate()
        self.stop_if_not_finite(val, "validation", completed)
        improved = val < self.best_val
        self.best_val = min(self.best_val, val)
        self.log(f"iter {completed}: val loss {val:.4f}" + (" (best)" if improved else ""))
        self.record({"event": "eval", "iter": completed, "val_loss": val, "best_val_loss": self.best_val})
        if completed > 0 and (force or improved or self.tc.always_save_checkpoint):
            rng = self.gathered_rng()
            if self.master:
                self.save(completed, rng)
                self.last_saved = completed

    def save_after_interrupt(self, completed: int, rng_snapshot: dict) -> None:
        """The master's save on Ctrl-C / SIGTERM: the last completed step, unless already saved."""
        try:
            if completed != self.last_saved and completed > 0:
                self.save(completed, [rng_snapshot] + [None] * (self.world_size - 1))
                self.last_saved = completed
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

    def run(self) -> int:
        """Train from start_iter to max_iters: 0 when done, 130 when interrupted."""
        tc = self.tc
        self.log(f"model: {self.n_params() / 1e6:.2f}M parameters, {self.cfg}")
        self.log(f"training on {self.description()}, {self.world_size} process(es), "
                 f"{tc.batch_size} x {tc.seq_len} = {self.tokens_per_step:,} tokens per step, "
                 f"steps {self.start_iter} -> {tc.max_iters}")
        if self.start_iter >= tc.max_iters:
            self.log(f"{self.ckpt_path} is already at step {self.start_iter} >= --max_iters {tc.max_iters}; "
                     "nothing to do")
            return 0

        interrupts = Interrupts()
        completed = self.start_iter
        rng_snapshot = self.rng_state()  # RNG state at the boundary `completed`
        loss_acc, steps_acc, t_log, cpu_log, ms_avg = 0.0, 0, time.perf_counter(), time.process_time(), None
        try:
            with interrupts:
                if self.start_iter == 0:
                    self.eval_and_maybe_save(0, force=False)  # the starting loss, ~ln(vocab_size)
                for it in range(self.start_iter, tc.max_iters):
                    lr = lr_at(it, tc)
                    self.set_lr(lr)
                    loss = self.accumulate_gradients(it)
                    logging = (it + 1) % tc.log_interval == 0 or it + 1 == tc.max_iters
                    if self.check_loss_now(it) or logging:  # before the update: ckpt.pt stays good
                        self.stop_if_not_finite(float(loss), "training", it + 1)
                    with interrupts.update():
                        self.apply_update()
                        completed = it + 1
                        rng_snapshot = self.rng_state()
                    loss_acc, steps_acc = loss_acc + loss, steps_acc + 1

                    if logging:
                        lossf = self.mean_over_ranks(loss_acc / steps_acc)  # .item() syncs the GPU here only
                        ms = 1000 * (time.perf_counter() - t_log) / steps_acc
                        # CPU time of all this process's threads: the work a step costs, which a
                        # busy shared machine does not inflate the way it inflates wall time
                        cpu_ms = 1000 * (time.process_time() - cpu_log) / steps_acc
                        ms_avg = ms if ms_avg is None else 0.9 * ms_avg + 0.1 * ms
                        self.log_progress(completed, lossf, lr, ms, ms_avg, cpu_ms)
                        loss_acc, steps_acc, t_log, cpu_log = 0.0, 0, time.perf_counter(), time.process_time()
                    if completed % tc.eval_interval == 0 or completed == tc.max_iters:
                        self.eval_and_maybe_save(completed, force=completed == tc.max_iters)
                        t_log, cpu_log = time.perf_counter(), time.process_time()  # evaluation is not training
        except KeyboardInterrupt:
            if self.master:
                self.save_after_interrupt(completed, rng_snapshot)
            return 130
        self.finish(completed)
        return 0

    def log_progress(self, completed: int, loss: float, lr: float, ms: float, ms_avg: float, cpu_ms: float) -> None:
        tc = self.tc
        eta = _fmt_seconds((tc.max_iters - completed) * ms_avg / 1000)
        tok_s = self.tokens_per_step / (ms / 1000)
        self.log(f"iter {completed}/{tc.max_iters} | loss {loss:.4f} | lr {lr:.2e} | "
                 f"{tok_s:,.0f} tok/s | {ms:.1f} ms/iter | ETA {eta}")
        self.record({"event": "train", "iter": completed, "loss": loss, "lr": lr,
                     "tokens_per_sec": tok_s, "ms_per_iter": ms, "cpu_ms_per_iter": round(cpu_ms, 2)})

    def finish(self, completed: int) -> None:
        self.log(f"done: {completed} steps, best val loss {self.best_val:.4f}, checkpoint {self.ckpt_path}")
        if self.master:
            png = self.out_dir / "loss.png"
            if plot_losses(self.metrics_path, png):
                self.log(f"loss curve: {png}")
            else:
                self.log("matplotlib is not installed; skipping the loss-curve plot")
