"""The Llama Transformer in PyTorch, the model the trainer trains (also usable for GPU inference).

The same architecture as llama2.c's model.py and run.c: pre-norm residual blocks with RMSNorm,
rotary position embeddings on interleaved pairs, grouped-query attention and a SwiGLU
feed-forward layer, with every ModelConfig hyperparameter honoured (rope_theta, norm_eps,
head_dim, Llama 3.1 rope scaling). Weight names are the ones the file formats and the NumPy
engine use (token_embedding, rms_att, wq, wk, wv, wo, rms_ffn, w1, w2, w3, rms_final, wcls),
so one grep finds a weight everywhere.

Shapes in comments: B batch, T tokens, D dim, H query heads, KV key/value heads,
hs head size, Q = H * hs, F hidden (feed-forward) width, V vocab.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..arch.llama import Weights
from ..config import ModelConfig
from ..errors import GenerationError
from ..formats.ckpt import state_dict_to_weights, weights_to_state_dict
from .rope import rope_tables

INIT_STD = 0.02  # GPT-2 / llama2.c initialisation scale


@torch.no_grad()
def init_parameters(model: nn.Module, residual: tuple[str, ...]) -> None:
    """GPT-2's initialisation, as llama2.c uses it: N(0, 0.02) for matrices and embeddings, the
    projections that write into the residual stream (names ending in `residual`) at
    0.02 / sqrt(2 n_layers) so the stream's variance does not grow with depth (Radford et al.
    2019), norm gains 1, biases 0."""
    residual_std = INIT_STD / math.sqrt(2 * model.cfg.n_layers)
    for name, p in model.named_parameters():  # a tied classifier is listed once
        if name.endswith(residual):
            nn.init.normal_(p, mean=0.0, std=residual_std)
        elif p.dim() == 2:
            nn.init.normal_(p, mean=0.0, std=INIT_STD)
        elif name.endswith(".bias"):
            nn.init.zeros_(p)
        else:
            nn.init.ones_(p)


class RMSNorm(nn.Module):
    """Root-mean-square layer norm (Zhang & Sennrich 2019): x / rms(x) * weight, no mean, no bias."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 even under autocast: the mean of squares loses too much in bf16.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


def rope_frequencies(cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the RoPE angles, each (seq_len, head_size / 2) float32 (training/rope.py)."""
    cos, sin = rope_tables(cfg)
    return torch.from_numpy(cos), torch.from_numpy(sin)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[..., 2i], x[..., 2i+1]) of x (B, T, heads, hs) by the angles.

    cos and sin are (T, hs / 2): row t holds the angles of the token at x[:, t].
    """
    xf = x.float().unflatten(-1, (-1, 2))  # (B, T, heads, hs/2, 2)
    x0, x1 = xf[..., 0], xf[..., 1]  # (B, T, heads, hs/2) each
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]  # broadcast over batch and heads
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).type_as(x)  # (B, T, heads, hs)


class TransformerBlock(nn.Module):
    """One pre-norm layer: x + attention(rms_att(x)), then h + ffn(rms_ffn(h)).

    The attention and feed-forward weights live directly on the block (not in sub-modules) so
    that the state_dict keys are `layers.{i}.wq.weight` etc., the names used by the file formats.
    """

    def __init__(self, cfg: ModelConfig, dropout: float):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_size = cfg.n_heads, cfg.n_kv_heads, cfg.head_size
        self.dropout = dropout
        self.rms_att = RMSNorm(cfg.dim, cfg.norm_eps)
        self.wq = nn.Linear(cfg.dim, cfg.q_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.kv_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.kv_dim, bias=False)
        self.wo = nn.Linear(cfg.q_dim, cfg.dim, bias=False)
        self.rms_ffn = RMSNorm(cfg.dim, cfg.norm_eps)
        self.w1 = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.w2 = nn.Linear(cfg.hidden_dim, cfg.dim, bias=False)
        self.w3 = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x, cos, sin, cache=None, start_pos: int = 0):
        x = x + self.resid_dropout(self.attention(self.rms_att(x), cos, sin, cache, start_pos))
        x = x + self.resid_dropout(self.feed_forward(self.rms_ffn(x)))
        return x

    def attention(self, x, cos, sin, cache, start_pos):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_size)  # (B, T, H, hs)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_size)  # (B, T, KV, hs)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_size)  # (B, T, KV, hs)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # heads first: (B, *, T, hs)

        if cache is None:  # training / full-sequence forward: causal over the T tokens given
            mask, is_causal = None, True
        else:  # cached decoding: store this chunk's keys and values, attend over everything so far
            k_cache, v_cache = cache  # (B, KV, seq_len, hs) each
            end = start_pos + T
            k_cache[:, :, start_pos:end] = k
            v_cache[:, :, start_pos:end] = v
            k, v = k_cache[:, :, :end], v_cache[:, :, :end]  # (B, KV, end, hs)
            # Query t (at position start_pos + t) may see keys 0..start_pos + t. SDPA's is_causal
            # aligns the mask top-left, which is only right when start_pos == 0, so build it.
            mask = None if T == 1 else torch.ones(T, end, dtype=torch.bool, device=x.device).tril(start_pos)
            is_causal = False

        # Grouped-query attention: query head h reads key/value head h // kv_mul (as run.c does).
        kv_mul = self.n_heads // self.n_kv_heads
        if kv_mul > 1:
            k = k.repeat_interleave(kv_mul, dim=1)  # (B, H, *, hs)
            v = v.repeat_interleave(kv_mul, dim=1)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=self.dropout if self.training else 0.0
        )  # (B, H, T, hs); scaled by 1/sqrt(hs)
        out = out.transpose(1, 2).reshape(B, T, -1)  # (B, T, Q): heads concatenated again
        return self.wo(out)

    def feed_forward(self, x):
        # SwiGLU (Shazeer 2020): a SiLU-gated linear unit instead of a plain MLP.
        return self.w2(F.silu(self.w1(x)) * self.w3(x))  # (B, T, F) -> (B, T, D)


class Transformer(nn.Module):
    """A Llama 2 model described by a ModelConfig.

    `dropout` is a training setting, not part of the model's shape, so it is an argument here
    and not a ModelConfig field.
    """

    def __init__(self, cfg: ModelConfig, dropout: float = 0.0):
        super().__init__()
        self.cfg = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.dropout = nn.Dropout(dropout)
        self.layers = nn.ModuleList(TransformerBlock(cfg, dropout) for _ in range(cfg.n_layers))
        self.rms_final = RMSNorm(cfg.dim, cfg.norm_eps)
        self.wcls = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.shared_classifier:
            # Weight tying (Press & Wolf 2017): one (V, D) matrix embeds tokens and scores them.
            self.wcls.weight = self.token_embedding.weight
        # Derived tables, not weights: non-persistent so state_dict holds only the file-format names.
        cos, sin = rope_frequencies(cfg)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """llama2.c's initialisation (init_parameters), with wo and w3 as the residual projections
        (llama2.c scales w3, not w2)."""
        init_parameters(self, ("wo.weight", "w3.weight"))

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None):
        """tokens (B, T) int64 -> (logits, loss).

        With targets (B, T): logits (B, T, V) for every position and the mean cross-entropy over
        targets that are not -1. Without: logits (B, 1, V) of the last position only and loss None
        (the classifier is the most expensive matmul of a small model; sampling needs one row).
        """
        B, T = tokens.shape
        if T > self.cfg.seq_len:
            raise GenerationError(f"sequence of {T} tokens is longer than the model's seq_len {self.cfg.seq_len}")
        h = self.dropout(self.token_embedding(tokens))  # (B, T, D)
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]  # (T, hs/2)
        for layer in self.layers:
            h = layer(h, cos, sin)  # (B, T, D)
        h = self.rms_final(h)
        if targets is None:
            return self.wcls(h[:, [-1], :]), None  # (B, 1, V)
        logits = self.wcls(h)  # (B, T, V)
        loss = F.cross_entropy(logits.reshape(B * T, -1).float(), targets.reshape(B * T), ignore_index=-1)
        return logits, loss

    def _forward_cached(self, tokens: torch.Tensor, start_pos: int, caches) -> torch.Tensor:
        """tokens (B, T) at positions start_pos.. -> logits (B, V) of the last one; fills the caches."""
        T = tokens.shape[1]
        h = self.token_embedding(tokens)  # (B, T, D)
        cos, sin = self.rope_cos[start_pos : start_pos + T], self.rope_sin[start_pos : start_pos + T]
        for layer, cache in zip(self.layers, caches):
            h = layer(h, cos, sin, cache, start_pos)
        return self.wcls(self.rms_final(h[:, -1, :]))  # (B, V)

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Continue each row of idx (B, T) by max_new_tokens sampled tokens -> (B, T + max_new_tokens).

        The prompt is processed in one pass, then one token per step against a key/value cache
        allocated for this call, so each step costs O(T) instead of recomputing the sequence.
        temperature 0 picks the argmax (first maximum); top_k keeps the k most likely tokens.
        Runs in eval mode (no dropout) and restores the previous mode.
        """
        B, T = idx.shape
        if T == 0:
            raise GenerationError("generate needs at least one prompt token")
        if max_new_tokens < 0 or temperature < 0 or (top_k is not None and top_k <= 0):
            raise GenerationError(
                f"need max_new_tokens >= 0, temperature >= 0, top_k > 0; got {max_new_tokens}, {temperature}, {top_k}"
            )
        total = T + max_new_tokens
        if total > self.cfg.seq_len:
            raise GenerationError(
                f"prompt ({T}) + max_new_tokens ({max_new_tokens}) = {total} exceeds seq_len {self.cfg.seq_len}"
            )
        if max_new_tokens == 0:
            return idx
        was_training = self.training
        self.eval()
        try:
            p = self.token_embedding.weight
            shape = (B, self.cfg.n_kv_heads, total, self.cfg.head_size)
            caches = [(p.new_zeros(shape), p.new_zeros(shape)) for _ in self.layers]
            out = torch.empty(B, total, dtype=idx.dtype, device=idx.device)
            out[:, :T] = idx
            logits = self._forward_cached(idx, 0, caches)  # prefill: (B, V)
            for pos in range(T, total):
                out[:, pos] = _sample(logits.float(), temperature, top_k, generator)
                if pos + 1 < total:
                    logits = self._forward_cached(out[:, pos : pos + 1], pos, caches)
            return out
        finally:
            self.train(was_training)

    # -- conversion to and from the file formats' stacked NumPy arrays -------------------------

    @classmethod
    def from_weights(cls, cfg: ModelConfig, weights: Weights, dropout: float = 0.0) -> "Transformer":
        """A model holding copies of fp32 Weights (e.g. a loaded .bin checkpoint)."""
        model = cls(cfg, dropout)
        model.load_state_dict(weights_to_state_dict(cfg, weights))
        return model

    def to_weights(self) -> Weights:
        """The model's weights as fp32 NumPy arrays (copies), per-layer tensors stacked, as the files store them."""
        return state_dict_to_weights(self.state_dict(), self.cfg)


def _sample(logits: torch.Tensor, temperature: float, top_k: int | None, generator) -> torch.Tensor:
    """One token per row of logits (B, V) -> (B,)."""
    if temperature == 0:
        return logits.argmax(dim=-1)  # torch's argmax returns the first maximum, like run.c
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, [-1]]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def build_model(cfg: ModelConfig, dropout: float = 0.0) -> nn.Module:
    """The torch model of a config's architecture: Transformer (Llama) or gpt2_model.GPT2."""
    if cfg.arch == "gpt2":
        from .gpt2_model import GPT2

        return GPT2(cfg, dropout)
    return Transformer(cfg, dropout)
