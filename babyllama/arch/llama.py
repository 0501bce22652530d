"""The Llama architecture's tensors: names, shapes, tying, and what other formats call them.

Names are llama2.c's (token_embedding, rms_att, wq wk wv wo, rms_ffn, w1 w2 w3, rms_final,
wcls) in the torch model, every file format and the engine, so one grep finds a weight
everywhere. Matrices are (out_features, in_features) like nn.Linear.weight; per-layer tensors are
stacked along a leading layer axis.

RoPE layout: llama2.c, Meta and GGUF rotate interleaved pairs (2j, 2j+1) of each head, Hugging
Face's rotate_half rotates (j, j + head_size/2). babyllama's engine uses the interleaved layout;
an HF model's wq and wk rows are reordered per head on the way in and out (permute_*_hf); GGUF
tensors need nothing (llama.cpp's converter already permuted them to the interleaved layout).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..config import ModelConfig
from .tensors import TensorSet, collect, spread, stored_tensors, torch_parameter_keys  # noqa: F401 (re-exported)

LAYER_TENSORS = ("rms_att", "wq", "wk", "wv", "wo", "rms_ffn", "w1", "w2", "w3")
LAYER_MATRICES = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
NORMS = ("rms_att", "rms_ffn", "rms_final")


def tensor_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Shape of every weight tensor, wcls included even when it is tied to token_embedding."""
    d, h, L, q, kv, v = cfg.dim, cfg.hidden_dim, cfg.n_layers, cfg.q_dim, cfg.kv_dim, cfg.vocab_size
    return {
        "token_embedding": (v, d),
        "rms_att": (L, d),
        "wq": (L, q, d),
        "wk": (L, kv, d),
        "wv": (L, kv, d),
        "wo": (L, d, q),
        "rms_ffn": (L, d),
        "w1": (L, h, d),
        "w2": (L, d, h),
        "w3": (L, h, d),
        "rms_final": (d,),
        "wcls": (v, d),
    }


@dataclass(frozen=True)
class Weights(TensorSet):
    """fp32 weights of a Llama model. Arrays may be read-only views of a mapped file.

    wcls is the same array as token_embedding when the classifier is shared.
    """

    token_embedding: np.ndarray  # (vocab, dim)
    rms_att: np.ndarray  # (L, dim)
    wq: np.ndarray  # (L, q_dim, dim)
    wk: np.ndarray  # (L, kv_dim, dim)
    wv: np.ndarray  # (L, kv_dim, dim)
    wo: np.ndarray  # (L, dim, q_dim)
    rms_ffn: np.ndarray  # (L, dim)
    w1: np.ndarray  # (L, hidden, dim)
    w2: np.ndarray  # (L, dim, hidden)
    w3: np.ndarray  # (L, hidden, dim)
    rms_final: np.ndarray  # (dim,)
    wcls: np.ndarray  # (vocab, dim)


# llama2.c name -> key in each format; "{i}" marks a per-layer tensor.
TORCH_NAMES = {  # babyllama's torch model (training/model.py) state_dict
    "token_embedding": "token_embedding.weight",
    "rms_att": "layers.{i}.rms_att.weight",
    "wq": "layers.{i}.wq.weight",
    "wk": "layers.{i}.wk.weight",
    "wv": "layers.{i}.wv.weight",
    "wo": "layers.{i}.wo.weight",
    "rms_ffn": "layers.{i}.rms_ffn.weight",
    "w1": "layers.{i}.w1.weight",
    "w2": "layers.{i}.w2.weight",
    "w3": "layers.{i}.w3.weight",
    "rms_final": "rms_final.weight",
    "wcls": "wcls.weight",
}
HF_NAMES = {  # transformers' LlamaForCausalLM
    "token_embedding": "model.embed_tokens.weight",
    "rms_att": "model.layers.{i}.input_layernorm.weight",
    "wq": "model.layers.{i}.self_attn.q_proj.weight",
    "wk": "model.layers.{i}.self_attn.k_proj.weight",
    "wv": "model.layers.{i}.self_attn.v_proj.weight",
    "wo": "model.layers.{i}.self_attn.o_proj.weight",
    "rms_ffn": "model.layers.{i}.post_attention_layernorm.weight",
    "w1": "model.layers.{i}.mlp.gate_proj.weight",
    "w2": "model.layers.{i}.mlp.down_proj.weight",
    "w3": "model.layers.{i}.mlp.up_proj.weight",
    "rms_final": "model.norm.weight",
    "wcls": "lm_head.weight",
}
GGUF_NAMES = {  # llama.cpp's GGUF, architecture "llama"
    "token_embedding": "token_embd.weight",
    "rms_att": "blk.{i}.attn_norm.weight",
    "wq": "blk.{i}.attn_q.weight",
    "wk": "blk.{i}.attn_k.weight",
    "wv": "blk.{i}.attn_v.weight",
    "wo": "blk.{i}.attn_output.weight",
    "rms_ffn": "blk.{i}.ffn_norm.weight",
    "w1": "blk.{i}.ffn_gate.weight",
    "w2": "blk.{i}.ffn_down.weight",
    "w3": "blk.{i}.ffn_up.weight",
    "rms_final": "output_norm.weight",
    "wcls": "output.weight",
}
META_NAMES = {  # Meta's llama consolidated.*.pth
    "token_embedding": "tok_embeddings.weight",
    "rms_att": "layers.{i}.attention_norm.weight",
    "wq": "layers.{i}.attention.wq.weight",
    "wk": "layers.{i}.attention.wk.weight",
    "wv": "layers.{i}.attention.wv.weight",
    "wo": "layers.{i}.attention.wo.weight",
    "rms_ffn": "layers.{i}.ffn_norm.weight",
    "w1": "layers.{i}.feed_forward.w1.weight",
    "w2": "layers.{i}.feed_forward.w2.weight",
    "w3": "layers.{i}.feed_forward.w3.weight",
    "rms_final": "norm.weight",
    "wcls": "output.weight",
}


def permute_to_hf(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorder the rows of a q or k projection from the interleaved RoPE layout to Hugging Face's.

    Within each head, row 2j+p (pair j, member p) moves to row p*head_size/2 + j: evens first,
    then odds, so that HF's rotate_half pairs (j, j + head_size/2) are llama2.c's (2j, 2j+1)
    with the same frequency. Use n_kv_heads for wk.
    """
    rows, cols = w.shape
    hs = rows // n_heads
    return w.reshape(n_heads, hs // 2, 2, cols).transpose(0, 2, 1, 3).reshape(rows, cols)


def permute_from_hf(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of permute_to_hf."""
    rows, cols = w.shape
    hs = rows // n_heads
    return w.reshape(n_heads, 2, hs // 2, cols).transpose(0, 2, 1, 3).reshape(rows, cols)


def torch_parameters(cfg: ModelConfig) -> list[str]:
    """training/model.py's Transformer.parameters() as state_dict keys, in order."""
    return torch_parameter_keys(cfg, TORCH_NAMES, LAYER_TENSORS)


def hf_transforms(cfg: ModelConfig, to_hf: bool) -> dict:
    """The per-tensor RoPE row permutations between the interleaved layout and HF's."""
    p = permute_to_hf if to_hf else permute_from_hf
    return {"wq": lambda w: p(w, cfg.n_heads), "wk": lambda w: p(w, cfg.n_kv_heads)}
