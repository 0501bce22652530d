"""Gradient clipping and AdamW over the flat buffers, with the semantics of the torch trainer's
torch.nn.utils.clip_grad_norm_ and torch.optim.AdamW (Loshchilov & Hutter 2019):

  coef = min(1, max_norm / (||g|| + 1e-6));  g <- coef * g                 (clip_grad_norm_)
  p <- p (1 - lr wd)   for matrices only (layout: the prefix [0, n_decay))
  m <- m + (1 - b1)(g - m);  v <- b2 v + (1 - b2) g^2
  p <- p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)

with torch's order of operations; the scalars are formed in float64 as torch's are. The clip
coefficient is applied inside the update kernel instead of by a separate pass over g.
"""

from __future__ import annotations

import math

import numpy as np
from .ops import kernel

EPS = 1e-8  # torch.optim.AdamW's default, which the torch trainer uses


@kernel
def sum_of_squares(g):
    """sum(g^2), accumulated in float64."""
    total = 0.0
    for i in range(g.shape[0]):
        total += np.float64(g[i]) * np.float64(g[i])
    return total


@kernel
def adamw_update(p, g, m, v, n_decay, coef, decay, c1, beta2, c2, step_size, bc2_sqrt, eps):
    """One AdamW step on every element, with g scaled by the clip coefficient first.
    decay = 1 - lr * weight_decay (applied below n_decay); c1 = 1 - beta1, c2 = 1 - beta2;
    step_size = lr / (1 - beta1^t); bc2_sqrt = sqrt(1 - beta2^t). Every scalar arrives as p's
    dtype, rounded from float64 as torch rounds its Python-float scalars."""
    n = p.shape[0]
    for i in range(n):
        gi = g[i] * coef
        if i < n_decay:
            p[i] *= decay
        m[i] += c1 * (gi - m[i])  # torch's lerp_ (for a weight below 0.5)
        v[i] = v[i] * beta2 + c2 * gi * gi
        p[i] -= step_size * (m[i] / (math.sqrt(v[i]) / bc2_sqrt + eps))


class AdamW:
    """The optimizer's state (two moments in the parameters' layout, the step count) and its step."""

    def __init__(self, size: int, n_decay: int, weight_decay: float, beta1: float, beta2: float,
                 dtype=np.float32):
        self.m, self.v = np.zeros(size, dtype), np.zeros(size, dtype)
        self.n_decay, self.weight_decay, self.beta1, self.beta2 = n_decay, weight_decay, beta1, beta2
        self.step_count = 0

    def clip_coefficient(self, grads: np.ndarray, max_norm: float) -> float:
        """clip_grad_norm_'s factor for the gradients (1 when max_norm is 0: no clipping)."""
        if max_norm <= 0:
            return 1.0
        t = grads.dtype.type
        norm = t(math.sqrt(sum_of_squares(grads)))
        return float(min(t(max_norm) / (norm + t(1e-6)), t(1.0)))

    def step(self, params: np.ndarray, grads: np.ndarray, lr: float, coef: float = 1.0) -> None:
        self.step_count += 1
        t, k = params.dtype.type, self.step_count
        adamw_update(params, grads, self.m, self.v, self.n_decay, t(coef), t(1 - lr * self.weight_decay),
                     t(1 - self.beta1), t(self.beta2), t(1 - self.beta2), t(lr / (1 - self.beta1 ** k)),
                     t(math.sqrt(1 - self.beta2 ** k)), t(EPS))
