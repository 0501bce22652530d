"""The Llama model's forward and backward, written out (llama2.c's model.py, by hand).

Per layer: x -> RMSNorm -> [q | k | v] = one matmul with wq, wk, wv stacked (wqkv) -> RoPE and
causal GQA attention (ops.attention_*, fused) -> wo -> + x; then RMSNorm -> [h1 | h3] = one matmul
with w1, w3 stacked (w13) -> silu(h1) * h3 -> w2 -> + residual. Then RMSNorm, the classifier wcls
(tied or not) and cross-entropy. The backward runs the same steps in reverse, each with its own
gradient, the residual stream's gradient flowing through dx.
"""

from __future__ import annotations

import numpy as np

from ...config import ModelConfig
from ...errors import ConfigError
from ..rope import rope_tables
from . import ops
from .model import Model


class Llama(Model):
    FUSED = {"wqkv": ("wq", "wk", "wv"), "w13": ("w1", "w3")}

    def __init__(self, cfg: ModelConfig, batch: int, dtype=np.float32):
        if cfg.arch != "llama":
            raise ConfigError(f"grad.llama.Llama needs arch 'llama', found {cfg.arch!r}")
        super().__init__(cfg, batch, dtype)
        N, L, F = batch * cfg.seq_len, cfg.n_layers, cfg.hidden_dim
        self.h13 = self.buffer(L, N, 2 * F)  # [w1 x | w3 x] before the SwiGLU gate
        self.dh13 = self.buffer(N, 2 * F)
        cos, sin = rope_tables(cfg)  # the torch model's float32 tables
        self.cos, self.sin = cos.astype(self.dtype), sin.astype(self.dtype)

    def forward(self, P, tokens, targets, loss_scale: float | None = None) -> float:
        """tokens, targets (B, T) -> the mean loss; P: layout views of the parameters. With
        loss_scale the activations are kept and the logits' gradient (for loss_scale * the sum of
        the row losses) is left for backward()."""
        cfg, T = self.cfg, self.T
        H, KV, hs, F = cfg.n_heads, cfg.n_kv_heads, cfg.head_size, cfg.hidden_dim
        self.load_batch(tokens, targets)
        ops.embedding_forward(self.tokens, T, P["token_embedding"], self.no_positions, self.x[0])  # (N, D)
        for l in range(cfg.n_layers):
            x, mid = self.x[l], self.mid[l]
            self.norm(x, P["rms_att"][l], None, self.xa[l], self.ma[l], self.ra[l])  # (N, D)
            ops.linear_forward(self.xa[l], P["wqkv"][l], None, self.qkv[l])  # (N, Q + 2 KV)
            ops.attention_forward(self.qkv[l], T, H, KV, hs, self.cos, self.sin, self.att[l], self.ao[l])  # (N, Q)
            ops.linear_forward(self.ao[l], P["wo"][l], None, mid)  # (N, D)
            mid += x
            self.norm(mid, P["rms_ffn"][l], None, self.xf[l], self.mf[l], self.rf[l])  # (N, D)
            ops.linear_forward(self.xf[l], P["w13"][l], None, self.h13[l])  # (N, 2F)
            ops.swiglu_forward(self.h13[l], F, self.g[l])  # (N, F)
            ops.linear_forward(self.g[l], P["w2"][l], None, self.x[l + 1])  # (N, D)
            self.x[l + 1] += mid
        return self.head_forward(P, loss_scale)

    def backward(self, P, G) -> None:
        """Add the gradient of the last forward's loss_scale * (sum of row losses) to G (layout
        views of the gradient buffer)."""
        cfg, T = self.cfg, self.T
        H, KV, hs, F = cfg.n_heads, cfg.n_kv_heads, cfg.head_size, cfg.hidden_dim
        self.head_backward(P, G)  # dx: d loss / d x[L]
        dx, dn = self.dx, self.dn
        for l in reversed(range(cfg.n_layers)):
            # x[l+1] = mid + w2 swiglu(w13 rms_ffn(mid))
            ops.linear_backward(dx, self.g[l], P["w2"][l], G["w2"][l], None, self.dg, False)  # (N, F)
            ops.swiglu_backward(self.dg, self.h13[l], F, self.dh13)  # (N, 2F)
            ops.linear_backward(self.dh13, self.xf[l], P["w13"][l], G["w13"][l], None, dn, False)  # (N, D)
            self.norm_backward(dn, self.mid[l], P["rms_ffn"][l], self.mf[l], self.rf[l], dx, G["rms_ffn"][l], None)
            # mid = x + wo attention(wqkv rms_att(x)); dx is d mid now
            ops.linear_backward(dx, self.ao[l], P["wo"][l], G["wo"][l], None, self.dao, False)  # (N, Q)
            ops.attention_backward(self.dao, self.qkv[l], self.att[l], T, H, KV, hs, self.cos, self.sin,
                                   self.dqkv)  # (N, Q + 2 KV)
            ops.linear_backward(self.dqkv, self.xa[l], P["wqkv"][l], G["wqkv"][l], None, dn, False)  # (N, D)
            self.norm_backward(dn, self.x[l], P["rms_att"][l], self.ma[l], self.ra[l], dx, G["rms_att"][l], None)
        ops.embedding_backward(self.tokens, T, dx, G["token_embedding"], self.no_positions)
