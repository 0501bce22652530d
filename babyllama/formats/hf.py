"""Hugging Face model folders (transformers' LlamaForCausalLM): config.json + safetensors, read
and written, and the tokenizer files `AutoTokenizer.from_pretrained` reads.

HF's rotate_half RoPE pairs dimensions (j, j + head_size/2) where llama2.c pairs (2j, 2j+1), so
wq and wk rows are permuted per head on the way in and out (arch.llama.hf_transforms). Every
hyperparameter travels: rope_theta, rms_norm_eps, head_dim (which may differ from
hidden_size / num_attention_heads) and Llama 3.1's "llama3" rope scaling; what babyllama cannot
run (other RoPE types, biases, other activations) is refused naming the config field.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..arch.llama import HF_NAMES, Weights, collect, hf_transforms, spread
from ..config import ModelConfig, RopeScaling
from ..errors import CheckpointError, ConfigError
from ..fileio import make_folder, write_bytes

ROPE_SCALING_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def _safetensors():
    try:
        import safetensors.numpy
    except ImportError:
        raise CheckpointError("Hugging Face import/export needs safetensors: pip install 'babyllama[train]'") from None
    return safetensors


def read_json(folder: Path, name: str, expected: str) -> dict:
    """folder/name parsed as a JSON object; a missing or broken file is a CheckpointError naming both."""
    path = Path(folder) / name
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{folder}: no {name} (expected {expected})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read ({getattr(e, 'strerror', None) or e})") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def _json_bytes(obj) -> bytes:
    return (json.dumps(obj, indent=2) + "\n").encode()


# ---------------------------------------------------------------------------------------------
# config.json


def hf_config(cfg: ModelConfig) -> dict:
    """config.json for transformers' LlamaForCausalLM. GQA is kept (num_key_value_heads)."""
    s = cfg.rope_scaling
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.hidden_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None if s is None else {"rope_type": "llama3", **{k: getattr(s, k) for k in ROPE_SCALING_KEYS}},
        "tie_word_embeddings": cfg.shared_classifier,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "float32",
    }


def _rope(where: Path, c: dict) -> tuple[float, RopeScaling | None]:
    """(rope_theta, rope_scaling) from transformers 5's rope_parameters or 4's rope_theta + rope_scaling."""
    if isinstance(c.get("rope_parameters"), dict):
        field, rope = "rope_parameters", c["rope_parameters"]
        theta = rope.get("rope_theta", c.get("rope_theta", 10000.0))
    else:
        field, rope = "rope_scaling", c.get("rope_scaling")
        theta = c.get("rope_theta", 10000.0)
    if rope is not None and not isinstance(rope, dict):
        raise CheckpointError(f"{where}: {field}: expected an object or null, found {rope!r}")
    kind = (rope or {}).get("rope_type", (rope or {}).get("type", "default"))
    if kind == "default":
        return theta, None
    if kind != "llama3":
        raise CheckpointError(f"{where}: {field}.rope_type: expected 'default' or 'llama3' (what babyllama runs), "
                              f"found {kind!r}")
    missing = [k for k in ROPE_SCALING_KEYS if k not in rope]
    if missing:
        raise CheckpointError(f"{where}: {field}: expected keys {', '.join(missing)} for rope_type 'llama3', not found")
    try:
        return theta, RopeScaling(**{k: rope[k] for k in ROPE_SCALING_KEYS})
    except ConfigError as e:
        raise CheckpointError(f"{where}: {field}: {e}") from None


def model_config(folder: Path, c: dict) -> ModelConfig:
    """The ModelConfig of a parsed config.json."""
    where = Path(folder) / "config.json"
    if c.get("model_type") != "llama":
        raise CheckpointError(f"{where}: expected model_type 'llama', found {c.get('model_type')!r}")
    unsupported = {
        "hidden_act": (c.get("hidden_act", "silu"), "silu"),
        "attention_bias": (c.get("attention_bias", False), False),
        "mlp_bias": (c.get("mlp_bias", False), False),
    }
    for key, (found, expected) in unsupported.items():
        if found != expected:
            raise CheckpointError(f"{where}: {key}: expected {expected!r} (what llama2.c models use), found {found!r}")
    theta, scaling = _rope(where, c)
    try:
        heads = c["num_attention_heads"]
        return ModelConfig(
            dim=c["hidden_size"], hidden_dim=c["intermediate_size"], n_layers=c["num_hidden_layers"],
            n_heads=heads, n_kv_heads=c.get("num_key_value_heads") or heads, vocab_size=c["vocab_size"],
            seq_len=c.get("max_position_embeddings", 2048),
            shared_classifier=bool(c.get("tie_word_embeddings", False)),  # transformers' default is False
            norm_eps=float(c.get("rms_norm_eps", 1e-6)), rope_theta=float(theta), head_dim=c.get("head_dim") or 0,
            rope_scaling=scaling,
        )
    except KeyError as e:
        raise CheckpointError(f"{where}: missing key {e.args[0]!r}") from None
    except (ConfigError, TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: invalid model shape ({e})") from None


# ---------------------------------------------------------------------------------------------
# weights


def load_hf(folder) -> tuple[ModelConfig, Weights]:
    """Read a LlamaForCausalLM folder: config.json + model.safetensors (or a sharded index)."""
    _safetensors()
    from safetensors import safe_open

    folder = Path(folder)
    cfg = model_config(folder, read_json(folder, "config.json", "a Hugging Face model folder"))
    if (folder / "model.safetensors.index.json").is_file():
        index = read_json(folder, "model.safetensors.index.json", "a safetensors index")
        if not isinstance(index.get("weight_map"), dict):
            raise CheckpointError(f"{folder / 'model.safetensors.index.json'}: expected a 'weight_map' object")
        file_of = index["weight_map"]
    elif (folder / "model.safetensors").is_file():
        with safe_open(folder / "model.safetensors", framework="numpy") as f:
            file_of = {k: "model.safetensors" for k in f.keys()}
    else:
        found = sorted(p.name for p in folder.iterdir())[:8]
        raise CheckpointError(f"{folder}: expected model.safetensors or model.safetensors.index.json, found {found}")
    handles: dict[str, object] = {}

    def get(key):
        if key not in file_of:
            return None
        name = file_of[key]
        if name not in handles:
            handles[name] = safe_open(folder / name, framework="numpy")
        try:
            return handles[name].get_tensor(key).astype(np.float32, copy=False)
        except TypeError:  # bfloat16 has no NumPy dtype: go through torch
            with safe_open(folder / name, framework="pt") as f:
                return f.get_tensor(key).float().numpy()

    return cfg, collect(get, HF_NAMES, cfg, str(folder), hf_transforms(cfg, to_hf=False))


def export_hf(out_dir, cfg: ModelConfig, weights: Weights, inputs=()) -> Path:
    """Write out_dir/model.safetensors and out_dir/config.json (the latter last), atomically.

    out_dir may exist (its model files are replaced) or be created, one level; it must not be
    one of `inputs`.
    """
    safetensors = _safetensors()
    out_dir = make_folder(out_dir, inputs)
    tensors = spread(cfg, weights, HF_NAMES, hf_transforms(cfg, to_hf=True))
    # transformers refuses safetensors files without a "format" entry in the metadata
    write_bytes(out_dir / "model.safetensors", safetensors.numpy.save(tensors, metadata={"format": "pt"}), inputs)
    write_bytes(out_dir / "config.json", _json_bytes(hf_config(cfg)), inputs)
    return out_dir


# ---------------------------------------------------------------------------------------------
# tokenizer


def write_hf_tokenizer(out_dir, sentencepiece_model: bytes | None, special: dict[str, str], max_length: int,
                       inputs=()) -> Path:
    """Write a sentencepiece vocabulary as transformers' LlamaTokenizer reads it: tokenizer.model
    (unless sentencepiece_model is None: already in place), tokenizer_config.json and
    special_tokens_map.json. `special`: the bos, eos and unk pieces."""
    out_dir = Path(out_dir)
    tokens = {f"{name}_token": special[name] for name in ("bos", "eos", "unk")}
    config = {
        "tokenizer_class": "LlamaTokenizer",
        **tokens,
        "pad_token": None,
        "add_bos_token": True,  # llama2.c's encode starts with BOS, never ends with EOS
        "add_eos_token": False,
        "model_max_length": max_length,
        "clean_up_tokenization_spaces": False,
        "legacy": False,
    }
    if sentencepiece_model is not None:
        write_bytes(out_dir / "tokenizer.model", sentencepiece_model, inputs)
    write_bytes(out_dir / "special_tokens_map.json", _json_bytes(tokens), inputs)
    write_bytes(out_dir / "tokenizer_config.json", _json_bytes(config), inputs)
    return out_dir
