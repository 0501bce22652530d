"""Threads for the hand-written trainer: data parallelism inside one process.

A micro-batch is cut into one share of sequences per thread; each thread runs the whole forward
and backward of its share with its own activation and gradient buffers (the kernels release the
GIL, and so do NumPy's matrix products), and the shares' gradients are then added in share order.
No kernel ever waits on a thread pool, and nothing spins while another part runs: on a shared
2-core machine, pools of spinning BLAS and OpenMP threads were measured up to 7x slower than this.
BLAS is held to one thread per caller for the same reason (threadpoolctl).

The sums depend on how the batch is cut, so an exact resume wants the same thread count
(threads(): NUMBA_NUM_THREADS, else OMP_NUM_THREADS, else the CPUs this process may use).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np


def threads() -> int:
    for var in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS"):
        if os.environ.get(var, "").strip().isdigit() and int(os.environ[var]) > 0:
            return int(os.environ[var])
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class Workers:
    """`n` model replicas over shares of `rows` sequences, and their gradient buffers."""

    def __init__(self, model_class, cfg, layout, rows: int, n: int, dtype=np.float32):
        n = max(1, min(n, rows))
        self.sizes = [rows // n + (i < rows % n) for i in range(n)]
        self.starts = np.cumsum([0] + self.sizes)
        self.models = [model_class(cfg, size, dtype) for size in self.sizes]
        self.grads = [layout.zeros(dtype) for _ in range(n)]
        self.G = [layout.views(g) for g in self.grads]
        self.pool = ThreadPoolExecutor(n - 1, thread_name_prefix="babyllama-train") if n > 1 else None

    def _each(self, work) -> list:
        """work(i) for every share: share 0 on this thread, the others on the pool."""
        futures = [self.pool.submit(work, i) for i in range(1, len(self.models))] if self.pool else []
        first = work(0)
        return [first] + [f.result() for f in futures]

    def zero_grad(self) -> None:
        for g in self.grads:
            g[:] = 0

    def forward_backward(self, P, x: np.ndarray, y: np.ndarray, loss_scale: float) -> float:
        """Add every share's gradient of loss_scale * (sum of row losses) to its buffer; return the
        mean loss over all of x's rows."""
        def work(i):
            lo, hi = self.starts[i], self.starts[i + 1]
            loss = self.models[i].forward(P, x[lo:hi], y[lo:hi], loss_scale)
            self.models[i].backward(P, self.G[i])
            return loss * self.sizes[i]
        return sum(self._each(work)) / x.shape[0]

    def forward(self, P, x: np.ndarray, y: np.ndarray) -> float:
        """The mean loss over x's rows, no gradients."""
        def work(i):
            lo, hi = self.starts[i], self.starts[i + 1]
            return self.models[i].forward(P, x[lo:hi], y[lo:hi]) * self.sizes[i]
        return sum(self._each(work)) / x.shape[0]

    def gradient(self, out: np.ndarray) -> np.ndarray:
        """out = the shares' gradients added in share order."""
        out[:] = self.grads[0]
        for g in self.grads[1:]:
            out += g
        return out

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()
