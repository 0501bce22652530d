"""The GPT-2 architecture's tensors: names, shapes, tying, and what other formats call them.

GPT-2 (Radford et al. 2019; the block of llm.c's train_gpt2.c): learned position embeddings,
pre-norm LayerNorm with biases, one fused q/k/v projection, a GELU MLP, biases on every linear
layer, and the classifier tied to the token embedding. babyllama names the tensors after their
Llama counterparts where the role is the same (token_embedding, wo, w1 up, w2 down, wcls), so
one grep still finds a role everywhere; what Llama lacks gets a name of its own:

  token_embedding (V, D)   position_embedding (T, D)           per layer (stacked, leading L):
  ln_att, ln_att_bias (D)  wqkv (3D, D), bqkv (3D)  [q | k | v]   wo (D, D), bo (D)
  ln_ffn, ln_ffn_bias (D)  w1 (F, D), b1 (F)        w2 (D, F), b2 (D)
  ln_final, ln_final_bias (D)                                   wcls = token_embedding

q, k and v stay fused: Hugging Face and llm.c both store c_attn as one tensor, and the trainer
computes them with one matrix product. Matrices are (out_features, in_features) like
nn.Linear.weight (and llm.c); Hugging Face's Conv1D stores them transposed (hf_transforms).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..config import ModelConfig
from .tensors import TensorSet, collect, spread, stored_tensors, torch_parameter_keys  # noqa: F401 (re-exported)

LAYER_TENSORS = ("ln_att", "ln_att_bias", "wqkv", "bqkv", "wo", "bo", "ln_ffn", "ln_ffn_bias", "w1", "b1", "w2", "b2")
LAYER_MATRICES = ("wqkv", "wo", "w1", "w2")
NORMS = ("ln_att", "ln_att_bias", "ln_ffn", "ln_ffn_bias", "ln_final", "ln_final_bias")


def tensor_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Shape of every weight tensor (wcls, tied to token_embedding, included)."""
    d, h, L, v, t = cfg.dim, cfg.hidden_dim, cfg.n_layers, cfg.vocab_size, cfg.seq_len
    return {
        "token_embedding": (v, d),
        "position_embedding": (t, d),
        "ln_att": (L, d),
        "ln_att_bias": (L, d),
        "wqkv": (L, 3 * d, d),
        "bqkv": (L, 3 * d),
        "wo": (L, d, d),
        "bo": (L, d),
        "ln_ffn": (L, d),
        "ln_ffn_bias": (L, d),
        "w1": (L, h, d),
        "b1": (L, h),
        "w2": (L, d, h),
        "b2": (L, d),
        "ln_final": (d,),
        "ln_final_bias": (d,),
        "wcls": (v, d),
    }


@dataclass(frozen=True)
class Weights(TensorSet):
    """fp32 weights of a GPT-2 model; wcls is the same array as token_embedding."""

    token_embedding: np.ndarray  # (vocab, dim)            wte
    position_embedding: np.ndarray  # (seq_len, dim)       wpe
    ln_att: np.ndarray  # (L, dim)                          ln_1
    ln_att_bias: np.ndarray  # (L, dim)
    wqkv: np.ndarray  # (L, 3 dim, dim)                     attn.c_attn
    bqkv: np.ndarray  # (L, 3 dim)
    wo: np.ndarray  # (L, dim, dim)                         attn.c_proj
    bo: np.ndarray  # (L, dim)
    ln_ffn: np.ndarray  # (L, dim)                          ln_2
    ln_ffn_bias: np.ndarray  # (L, dim)
    w1: np.ndarray  # (L, hidden, dim)                      mlp.c_fc
    b1: np.ndarray  # (L, hidden)
    w2: np.ndarray  # (L, dim, hidden)                      mlp.c_proj
    b2: np.ndarray  # (L, dim)
    ln_final: np.ndarray  # (dim,)                          ln_f
    ln_final_bias: np.ndarray  # (dim,)
    wcls: np.ndarray  # (vocab, dim)                        lm_head (tied)


# babyllama name -> key in each format; "{i}" marks a per-layer tensor.
TORCH_NAMES = {  # babyllama's torch GPT-2 (training/gpt2_model.py) state_dict
    "token_embedding": "token_embedding.weight",
    "position_embedding": "position_embedding.weight",
    "ln_att": "layers.{i}.ln_att.weight",
    "ln_att_bias": "layers.{i}.ln_att.bias",
    "wqkv": "layers.{i}.wqkv.weight",
    "bqkv": "layers.{i}.wqkv.bias",
    "wo": "layers.{i}.wo.weight",
    "bo": "layers.{i}.wo.bias",
    "ln_ffn": "layers.{i}.ln_ffn.weight",
    "ln_ffn_bias": "layers.{i}.ln_ffn.bias",
    "w1": "layers.{i}.w1.weight",
    "b1": "layers.{i}.w1.bias",
    "w2": "layers.{i}.w2.weight",
    "b2": "layers.{i}.w2.bias",
    "ln_final": "ln_final.weight",
    "ln_final_bias": "ln_final.bias",
    "wcls": "wcls.weight",
}
HF_NAMES = {  # transformers' GPT2LMHeadModel (lm_head.weight is tied and often absent from the file)
    "token_embedding": "transformer.wte.weight",
    "position_embedding": "transformer.wpe.weight",
    "ln_att": "transformer.h.{i}.ln_1.weight",
    "ln_att_bias": "transformer.h.{i}.ln_1.bias",
    "wqkv": "transformer.h.{i}.attn.c_attn.weight",
    "bqkv": "transformer.h.{i}.attn.c_attn.bias",
    "wo": "transformer.h.{i}.attn.c_proj.weight",
    "bo": "transformer.h.{i}.attn.c_proj.bias",
    "ln_ffn": "transformer.h.{i}.ln_2.weight",
    "ln_ffn_bias": "transformer.h.{i}.ln_2.bias",
    "w1": "transformer.h.{i}.mlp.c_fc.weight",
    "b1": "transformer.h.{i}.mlp.c_fc.bias",
    "w2": "transformer.h.{i}.mlp.c_proj.weight",
    "b2": "transformer.h.{i}.mlp.c_proj.bias",
    "ln_final": "transformer.ln_f.weight",
    "ln_final_bias": "transformer.ln_f.bias",
    "wcls": "lm_head.weight",
}
# llm.c's gpt2_124M.bin (train_gpt2.c's ParameterTensors): after its 256 x int32 header, the 16
# tensors in this order, each stacked over layers like babyllama's, matrices (out, in). Version 3
# pads wte's rows to padded_vocab_size (a multiple of 128); the extra rows are not a vocabulary.
LLMC_ORDER = (
    ("token_embedding", "wte"), ("position_embedding", "wpe"), ("ln_att", "ln1w"), ("ln_att_bias", "ln1b"),
    ("wqkv", "qkvw"), ("bqkv", "qkvb"), ("wo", "attprojw"), ("bo", "attprojb"), ("ln_ffn", "ln2w"),
    ("ln_ffn_bias", "ln2b"), ("w1", "fcw"), ("b1", "fcb"), ("w2", "fcprojw"), ("b2", "fcprojb"),
    ("ln_final", "lnfw"), ("ln_final_bias", "lnfb"),
)


def torch_parameters(cfg: ModelConfig) -> list[str]:
    """training/gpt2_model.py's GPT2.parameters() as state_dict keys, in order."""
    return torch_parameter_keys(cfg, TORCH_NAMES, LAYER_TENSORS)


def hf_transforms(cfg: ModelConfig, to_hf: bool) -> dict:
    """HF's Conv1D stores (in_features, out_features): the four matrices transposed, both ways."""
    return {name: (lambda w: np.ascontiguousarray(w.T)) for name in LAYER_MATRICES}
