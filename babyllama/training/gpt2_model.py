"""GPT-2 in PyTorch (Radford et al. 2019), the model `babyllama train --arch gpt2` trains: the block
of llm.c's train_gpt2.py, with babyllama's tensor names (arch/gpt2.py).

Learned position embeddings; pre-norm blocks x + attn(ln_att(x)), h + mlp(ln_ffn(h)); LayerNorm
with bias; causal multi-head attention from one fused q/k/v projection; a GELU (tanh
approximation) MLP; biases on every linear layer; the classifier tied to the token embedding.
The interface is training/model.py's Transformer's: forward(tokens, targets) -> (logits, loss).

Shapes in comments: B batch, T tokens, D dim, H heads, hs head size, F hidden width, V vocab.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..errors import ConfigError, GenerationError
from ..formats.ckpt import state_dict_to_weights, weights_to_state_dict
from .model import init_parameters


class GPT2Block(nn.Module):
    """One pre-norm layer. Weights live on the block so the state_dict keys are
    `layers.{i}.wqkv.weight` etc. (arch.gpt2.TORCH_NAMES)."""

    def __init__(self, cfg: ModelConfig, dropout: float):
        super().__init__()
        self.n_heads, self.head_size, self.dropout = cfg.n_heads, cfg.head_size, dropout
        self.ln_att = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.wqkv = nn.Linear(cfg.dim, 3 * cfg.dim)
        self.wo = nn.Linear(cfg.dim, cfg.dim)
        self.ln_ffn = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.w1 = nn.Linear(cfg.dim, cfg.hidden_dim)
        self.w2 = nn.Linear(cfg.hidden_dim, cfg.dim)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x):
        x = x + self.resid_dropout(self.attention(self.ln_att(x)))
        x = x + self.resid_dropout(self.w2(F.gelu(self.w1(self.ln_ffn(x)), approximate="tanh")))  # (B, T, F) -> D
        return x

    def attention(self, x):
        B, T, D = x.shape
        q, k, v = self.wqkv(x).split(D, dim=-1)  # (B, T, D) each
        q, k, v = (a.view(B, T, self.n_heads, self.head_size).transpose(1, 2) for a in (q, k, v))  # (B, H, T, hs)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                             dropout_p=self.dropout if self.training else 0.0)  # (B, H, T, hs)
        return self.wo(out.transpose(1, 2).reshape(B, T, D))  # heads concatenated, projected


class GPT2(nn.Module):
    """A GPT-2 described by a ModelConfig with arch "gpt2"."""

    def __init__(self, cfg: ModelConfig, dropout: float = 0.0):
        super().__init__()
        if cfg.arch != "gpt2":
            raise ConfigError(f"GPT2 needs a config with arch 'gpt2', found {cfg.arch!r}")
        self.cfg = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.position_embedding = nn.Embedding(cfg.seq_len, cfg.dim)
        self.dropout = nn.Dropout(dropout)
        self.layers = nn.ModuleList(GPT2Block(cfg, dropout) for _ in range(cfg.n_layers))
        self.ln_final = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.wcls = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.wcls.weight = self.token_embedding.weight  # GPT-2 always ties (Press & Wolf 2017)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2's initialisation (model.init_parameters, as llm.c's train_gpt2.py), wo and w2
        being the residual projections."""
        init_parameters(self, ("wo.weight", "w2.weight"))

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None):
        """tokens (B, T) int64 -> (logits, loss), as Transformer.forward: with targets, logits
        (B, T, V) and the mean cross-entropy over targets that are not -1; without, the last
        position's logits (B, 1, V) and None."""
        B, T = tokens.shape
        if T > self.cfg.seq_len:
            raise GenerationError(f"sequence of {T} tokens is longer than the model's seq_len {self.cfg.seq_len}")
        pos = torch.arange(T, device=tokens.device)
        h = self.dropout(self.token_embedding(tokens) + self.position_embedding(pos))  # (B, T, D)
        for layer in self.layers:
            h = layer(h)
        h = self.ln_final(h)
        if targets is None:
            return self.wcls(h[:, [-1], :]), None  # (B, 1, V)
        logits = self.wcls(h)  # (B, T, V)
        loss = F.cross_entropy(logits.reshape(B * T, -1).float(), targets.reshape(B * T), ignore_index=-1)
        return logits, loss

    @classmethod
    def from_weights(cls, cfg: ModelConfig, weights, dropout: float = 0.0) -> "GPT2":
        """A model holding copies of fp32 arch.gpt2.Weights."""
        model = cls(cfg, dropout)
        model.load_state_dict(weights_to_state_dict(cfg, weights))
        return model

    def to_weights(self):
        """The model's weights as fp32 arch.gpt2.Weights (copies)."""
        return state_dict_to_weights(self.state_dict(), self.cfg)

