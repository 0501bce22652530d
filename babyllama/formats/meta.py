"""Meta's llama folders: params.json + consolidated.00.pth, read.

Meta rotates interleaved pairs like llama2.c, so no RoPE permutation is needed. params.json's
hyperparameters travel: rope_theta, norm_eps, and Llama 3.1's `use_scaled_rope`, which means
Meta's apply_scaling with its fixed constants (SCALED_ROPE). It carries no context length.
"""

from __future__ import annotations

from pathlib import Path

from ..arch.llama import META_NAMES, Weights, collect
from ..config import ModelConfig, RopeScaling
from ..errors import CheckpointError, ConfigError
from .ckpt import to_numpy, torch_load
from .hf import read_json

# Meta's llama3 apply_scaling(): scale_factor 8, low_freq_factor 1, high_freq_factor 4, old_context_len 8192
SCALED_ROPE = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
DEFAULT_SEQ_LEN = 2048  # what llama2.c's export assumes for Meta models


def meta_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None = None) -> int:
    """Meta's FeedForward width: 2/3 of 4*dim, times ffn_dim_multiplier, rounded up to multiple_of."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def load_meta(folder, seq_len: int | None = None) -> tuple[ModelConfig, Weights]:
    """Read a Meta llama folder. Only single-shard checkpoints (consolidated.00.pth) are supported.

    `seq_len` (default params.json's max_seq_len, else 2048) fills in the context length.
    """
    folder = Path(folder)
    params = read_json(folder, "params.json", "a Meta llama folder")
    shards = sorted(folder.glob("consolidated.*.pth"))
    if len(shards) != 1:
        raise CheckpointError(
            f"{folder}: expected one consolidated.00.pth, found {len(shards)} model-parallel shard(s); "
            "only single-shard Meta checkpoints (e.g. Llama 2 7B) are supported"
        )
    sd = torch_load(shards[0], "Meta checkpoint")
    if not isinstance(sd, dict):
        raise CheckpointError(f"{shards[0]}: expected a state_dict, found {type(sd).__name__}")
    where = str(shards[0])
    try:
        dim, heads = params["dim"], params["n_heads"]
        vocab = params.get("vocab_size", -1)
        if vocab is None or vocab <= 0:  # Llama 2's params.json says -1: the tokenizer decides
            if "tok_embeddings.weight" not in sd:
                raise CheckpointError(f"{where}: missing tensors: expected tok_embeddings.weight, not found")
            vocab = int(sd["tok_embeddings.weight"].shape[0])
        cfg = ModelConfig(
            dim=dim, hidden_dim=meta_hidden_dim(dim, params.get("multiple_of", 256), params.get("ffn_dim_multiplier")),
            n_layers=params["n_layers"], n_heads=heads, n_kv_heads=params.get("n_kv_heads") or heads,
            vocab_size=vocab, seq_len=seq_len or params.get("max_seq_len", DEFAULT_SEQ_LEN), shared_classifier=False,
            norm_eps=float(params.get("norm_eps", 1e-5)), rope_theta=float(params.get("rope_theta", 10000.0)),
            rope_scaling=SCALED_ROPE if params.get("use_scaled_rope") else None,
        )
    except KeyError as e:
        raise CheckpointError(f"{folder / 'params.json'}: missing key {e.args[0]!r}") from None
    except (ConfigError, TypeError, ValueError) as e:
        raise CheckpointError(f"{folder / 'params.json'}: invalid model shape ({e})") from None
    return cfg, collect(lambda k: to_numpy(sd[k]) if k in sd else None, META_NAMES, cfg, where)
