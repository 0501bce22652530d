"""float64 torch references for the hand-written trainer's gradient checks (tests/test_grad_*.py).

Written from the papers' formulas with torch's differentiable functions, in float64 all the way
(babyllama's torch models cast norms, RoPE and the loss to float32, which would hide float64
errors of 1e-8). Weights are a dict of the architecture's stacked tensors (arch/llama.py,
arch/gpt2.py names) with requires_grad; a tied wcls is the same tensor as token_embedding.
"""

import math

import numpy as np
import torch
import torch.nn.functional as F

from babyllama.arch import module as arch_module
from babyllama.arch.tensors import stored_tensors


def rms_norm(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def layer_norm(x, w, b, eps):
    return F.layer_norm(x, (x.shape[-1],), w, b, eps)


def rope(x, cos, sin):
    """x (B, T, heads, hs): rotate interleaved pairs (2i, 2i+1) by the angles of cos/sin (T, hs/2)."""
    x0, x1 = x[..., 0::2], x[..., 1::2]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1).flatten(-2)


def attention(q, k, v):
    """q (B, T, H, hs), k and v (B, T, KV, hs) -> (B, T, H * hs): causal softmax(q k^T / sqrt(hs)) v,
    query head h reading key/value head h // (H / KV)."""
    B, T, H, hs = q.shape
    rep = H // k.shape[2]
    k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
    scores = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(hs)
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    p = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    return torch.einsum("bhts,bshd->bthd", p, v).reshape(B, T, H * hs)


def gelu_tanh(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def llama_loss(cfg, W, tokens, targets, cos, sin):
    B, T = tokens.shape
    H, KV, hs = cfg.n_heads, cfg.n_kv_heads, cfg.head_size
    x = W["token_embedding"][tokens]  # (B, T, D)
    for l in range(cfg.n_layers):
        h = rms_norm(x, W["rms_att"][l], cfg.norm_eps)
        q = rope((h @ W["wq"][l].T).view(B, T, H, hs), cos[:T], sin[:T])
        k = rope((h @ W["wk"][l].T).view(B, T, KV, hs), cos[:T], sin[:T])
        v = (h @ W["wv"][l].T).view(B, T, KV, hs)
        x = x + attention(q, k, v) @ W["wo"][l].T
        h = rms_norm(x, W["rms_ffn"][l], cfg.norm_eps)
        x = x + (F.silu(h @ W["w1"][l].T) * (h @ W["w3"][l].T)) @ W["w2"][l].T
    logits = rms_norm(x, W["rms_final"], cfg.norm_eps) @ W["wcls"].T
    return F.cross_entropy(logits.reshape(B * T, -1), targets.reshape(-1))


def gpt2_loss(cfg, W, tokens, targets):
    B, T = tokens.shape
    H, D, hs = cfg.n_heads, cfg.dim, cfg.head_size
    x = W["token_embedding"][tokens] + W["position_embedding"][:T]
    for l in range(cfg.n_layers):
        h = layer_norm(x, W["ln_att"][l], W["ln_att_bias"][l], cfg.norm_eps)
        q, k, v = (h @ W["wqkv"][l].T + W["bqkv"][l]).split(D, dim=-1)
        a = attention(q.view(B, T, H, hs), k.view(B, T, H, hs), v.view(B, T, H, hs))
        x = x + a @ W["wo"][l].T + W["bo"][l]
        h = layer_norm(x, W["ln_ffn"][l], W["ln_ffn_bias"][l], cfg.norm_eps)
        x = x + gelu_tanh(h @ W["w1"][l].T + W["b1"][l]) @ W["w2"][l].T + W["b2"][l]
    logits = layer_norm(x, W["ln_final"], W["ln_final_bias"], cfg.norm_eps) @ W["wcls"].T
    return F.cross_entropy(logits.reshape(B * T, -1), targets.reshape(-1))


def random_tensors(cfg, seed: int) -> dict:
    """float64 arrays for every stored tensor: matrices N(0, 1/fan_in), norm gains near 1, biases
    and embeddings of moderate size, so every path of the model carries gradient."""
    rng = np.random.default_rng(seed)
    shapes = arch_module(cfg.arch).tensor_shapes(cfg)
    out = {}
    for name in stored_tensors(cfg):
        shape = shapes[name]
        if name.startswith(("rms", "ln_")) and not name.endswith("bias"):
            out[name] = 1.0 + 0.2 * rng.standard_normal(shape)
        elif len(shape) >= 2 and name.endswith(("embedding",)):
            out[name] = 0.5 * rng.standard_normal(shape)
        elif name.endswith("bias") or name.startswith("b"):
            out[name] = 0.1 * rng.standard_normal(shape)
        else:
            out[name] = rng.standard_normal(shape) / math.sqrt(shape[-1])
    return out


def loss_and_grads(cfg, arrays: dict, tokens, targets, cos=None, sin=None):
    """(loss, {name: gradient}) of the float64 reference for the stored tensors `arrays`."""
    W = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in arrays.items()}
    if cfg.shared_classifier:
        W["wcls"] = W["token_embedding"]
    tok, tgt = torch.as_tensor(tokens), torch.as_tensor(targets)
    if cfg.arch == "gpt2":
        loss = gpt2_loss(cfg, W, tok, tgt)
    else:
        loss = llama_loss(cfg, W, tok, tgt, torch.as_tensor(cos, dtype=torch.float64),
                          torch.as_tensor(sin, dtype=torch.float64))
    loss.backward()
    return loss.item(), {k: W[k].grad.numpy() for k in arrays}
