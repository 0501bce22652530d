"""What the hand-written Llama and GPT-2 share: the activations a forward keeps for its backward,
the final norm, the classifier and the loss, and the norm/linear steps with their gradients.

Shapes in comments: B sequences, T tokens each, N = B * T rows, D dim, H query heads, KV
key/value heads, hs head size, Q = H * hs, F hidden width, V vocab, L layers. Activations are
allocated once per model for B rows of seq_len and reused every micro-step.
"""

from __future__ import annotations

import numpy as np

from ...config import ModelConfig
from ...errors import TrainError
from . import ops


class Model:
    """Buffers and shared steps; llama.Llama and gpt2.GPT2 add the block's own and write out
    forward() and backward()."""

    FUSED: dict = {}  # tensors the model fuses (layout.Layout)
    CENTER = False  # LayerNorm (subtract the mean, add a bias) rather than RMSNorm
    FINAL_NORM = ("rms_final", None)  # the final norm's weight and bias names

    def __init__(self, cfg: ModelConfig, batch: int, dtype=np.float32):
        self.cfg, self.B, self.T, self.dtype = cfg, batch, cfg.seq_len, np.dtype(dtype)
        N, D, L, V = batch * cfg.seq_len, cfg.dim, cfg.n_layers, cfg.vocab_size
        Q, KV, T = cfg.q_dim, cfg.kv_dim, cfg.seq_len
        e = self.buffer
        # kept by the forward for the backward, per layer
        self.x = e(L + 1, N, D)  # the residual stream into each layer (x[L]: out of the last)
        self.xa, self.ma, self.ra = e(L, N, D), e(L, N), e(L, N)  # norm before attention; its mean, 1/std
        self.qkv = e(L, N, Q + 2 * KV)  # [q | k | v], RoPE applied (Llama)
        self.att = e(L, batch, cfg.n_heads, T * (T + 1) // 2)  # softmax probabilities, causal triangle
        self.ao = e(L, N, Q)  # attention output, heads concatenated
        self.mid = e(L, N, D)  # the residual stream after attention
        self.xf, self.mf, self.rf = e(L, N, D), e(L, N), e(L, N)  # norm before the feed-forward
        self.g = e(L, N, cfg.hidden_dim)  # the activation into the down projection
        self.xn, self.mn, self.rn = e(N, D), e(N), e(N)  # the final norm
        self.logits, self.losses = e(N, V), e(N)  # logits become their gradient (ops.cross_entropy)
        # backward scratch
        self.dx, self.dn = e(N, D), e(N, D)  # the residual stream's gradient; a norm output's
        self.dao, self.dqkv = e(N, Q), e(N, Q + 2 * KV)
        self.dg = e(N, cfg.hidden_dim)
        self.no_bias = e(D)  # RMSNorm has none
        self.no_positions = e(0, D)  # Llama has no position table
        self.tokens = np.zeros(N, np.int64)

    def buffer(self, *shape) -> np.ndarray:
        return np.zeros(shape, self.dtype)

    def load_batch(self, tokens: np.ndarray, targets: np.ndarray) -> None:
        """tokens, targets (B, T) int; ids outside the vocabulary would index out of the tables."""
        if tokens.shape != (self.B, self.T) or targets.shape != (self.B, self.T):
            raise TrainError(f"expected token batches of shape {(self.B, self.T)}, found {tokens.shape}")
        V = self.cfg.vocab_size
        for what, a in (("token", tokens), ("target", targets)):
            if a.min() < 0 or a.max() >= V:
                raise TrainError(f"a {what} id of {a.min()}..{a.max()} is outside the vocabulary of {V}: "
                                 "the token shards do not match the model (pretokenize again?)")
        self.tokens[:] = tokens.reshape(-1)
        self.targets = targets.reshape(-1)

    # -- steps shared by both blocks ------------------------------------------------------------

    def norm(self, x, w, b, out, mean, rstd) -> None:
        """out (N, D) = RMSNorm or LayerNorm of x (N, D)."""
        ops.norm_forward(x, w, self.no_bias if b is None else b, self.cfg.norm_eps, self.CENTER, out, mean, rstd)

    def norm_backward(self, dout, x, w, mean, rstd, dx, dw, db) -> None:
        """dx += the norm's input gradient; dw (and db) += its weight (bias) gradient."""
        ops.norm_backward(dout, x, w, mean, rstd, self.CENTER, dx, dw, self.no_bias if db is None else db)

    def head_forward(self, P, loss_scale: float | None) -> float:
        """The final norm, the classifier and the loss: the mean cross-entropy over the N rows.
        With loss_scale, logits become loss_scale * d(sum of row losses)/d(logits)."""
        L, (w, b) = self.cfg.n_layers, self.FINAL_NORM
        self.norm(self.x[L], P[w], P[b] if b else None, self.xn, self.mn, self.rn)  # (N, D)
        ops.linear_forward(self.xn, P["wcls"], None, self.logits)  # (N, V)
        ops.cross_entropy(self.logits, self.targets, 0.0 if loss_scale is None else loss_scale, self.losses,
                          loss_scale is not None)
        return float(self.losses.sum(dtype=np.float64) / self.losses.shape[0])

    def head_backward(self, P, G) -> None:
        """From the logits' gradient to dx = the gradient of x[L] (overwritten)."""
        L = self.cfg.n_layers
        ops.linear_backward(self.logits, self.xn, P["wcls"], G["wcls"], None, self.dn, False)  # dn (N, D)
        self.dx[:] = 0
        w, b = self.FINAL_NORM
        self.norm_backward(self.dn, self.x[L], P[w], self.mn, self.rn, self.dx, G[w], G[b] if b else None)
