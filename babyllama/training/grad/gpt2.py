"""The GPT-2 model's forward and backward, written out (llm.c's train_gpt2.c, in NumPy + Numba).

Embedding: wte[token] + wpe[position]. Per layer: x -> LayerNorm -> [q | k | v] = wqkv x + bqkv
-> causal attention (no RoPE, every head its own k and v) -> wo + bo -> + x; then LayerNorm ->
w1 + b1 -> GELU (tanh) -> w2 + b2 -> + residual. Then LayerNorm, the tied classifier and
cross-entropy. The backward runs the same steps in reverse.
"""

from __future__ import annotations

import numpy as np

from ...config import ModelConfig
from ...errors import ConfigError
from . import ops
from .model import Model


class GPT2(Model):
    CENTER = True
    FINAL_NORM = ("ln_final", "ln_final_bias")

    def __init__(self, cfg: ModelConfig, batch: int, dtype=np.float32):
        if cfg.arch != "gpt2":
            raise ConfigError(f"grad.gpt2.GPT2 needs arch 'gpt2', found {cfg.arch!r}")
        super().__init__(cfg, batch, dtype)
        N, L, F = batch * cfg.seq_len, cfg.n_layers, cfg.hidden_dim
        self.h = self.buffer(L, N, F)  # w1 x + b1, before the GELU
        self.dh = self.buffer(N, F)
        self.no_rope = self.buffer(0, cfg.head_size // 2)

    def forward(self, P, tokens, targets, loss_scale: float | None = None) -> float:
        """As llama.Llama.forward."""
        cfg, T, H, hs = self.cfg, self.T, self.cfg.n_heads, self.cfg.head_size
        self.load_batch(tokens, targets)
        ops.embedding_forward(self.tokens, T, P["token_embedding"], P["position_embedding"], self.x[0])  # (N, D)
        for l in range(cfg.n_layers):
            x, mid = self.x[l], self.mid[l]
            self.norm(x, P["ln_att"][l], P["ln_att_bias"][l], self.xa[l], self.ma[l], self.ra[l])  # (N, D)
            ops.linear_forward(self.xa[l], P["wqkv"][l], P["bqkv"][l], self.qkv[l])  # (N, 3D)
            ops.attention_forward(self.qkv[l], T, H, H, hs, self.no_rope, self.no_rope, self.att[l], self.ao[l])
            ops.linear_forward(self.ao[l], P["wo"][l], P["bo"][l], mid)  # (N, D)
            mid += x
            self.norm(mid, P["ln_ffn"][l], P["ln_ffn_bias"][l], self.xf[l], self.mf[l], self.rf[l])  # (N, D)
            ops.linear_forward(self.xf[l], P["w1"][l], P["b1"][l], self.h[l])  # (N, F)
            ops.gelu_forward(self.h[l], self.g[l])  # (N, F)
            ops.linear_forward(self.g[l], P["w2"][l], P["b2"][l], self.x[l + 1])  # (N, D)
            self.x[l + 1] += mid
        return self.head_forward(P, loss_scale)

    def backward(self, P, G) -> None:
        """As llama.Llama.backward."""
        cfg, T, H, hs = self.cfg, self.T, self.cfg.n_heads, self.cfg.head_size
        self.head_backward(P, G)
        dx, dn = self.dx, self.dn
        for l in reversed(range(cfg.n_layers)):
            # x[l+1] = mid + w2 gelu(w1 ln_ffn(mid) + b1) + b2
            ops.linear_backward(dx, self.g[l], P["w2"][l], G["w2"][l], G["b2"][l], self.dg, False)  # (N, F)
            ops.gelu_backward(self.dg, self.h[l], self.dh)  # (N, F)
            ops.linear_backward(self.dh, self.xf[l], P["w1"][l], G["w1"][l], G["b1"][l], dn, False)  # (N, D)
            self.norm_backward(dn, self.mid[l], P["ln_ffn"][l], self.mf[l], self.rf[l], dx, G["ln_ffn"][l],
                               G["ln_ffn_bias"][l])
            # mid = x + wo attention(wqkv ln_att(x) + bqkv) + bo; dx is d mid now
            ops.linear_backward(dx, self.ao[l], P["wo"][l], G["wo"][l], G["bo"][l], self.dao, False)  # (N, D)
            ops.attention_backward(self.dao, self.qkv[l], self.att[l], T, H, H, hs, self.no_rope, self.no_rope,
                                   self.dqkv)  # (N, 3D)
            ops.linear_backward(self.dqkv, self.xa[l], P["wqkv"][l], G["wqkv"][l], G["bqkv"][l], dn, False)
            self.norm_backward(dn, self.x[l], P["ln_att"][l], self.ma[l], self.ra[l], dx, G["ln_att"][l],
                               G["ln_att_bias"][l])
        ops.embedding_backward(self.tokens, T, dx, G["token_embedding"], G["position_embedding"])
