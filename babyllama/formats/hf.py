"""Hugging Face model folders (transformers' LlamaForCausalLM and MistralForCausalLM; GPT2LMHeadModel
through hf_gpt2.py, picked by model_type or the config's arch): config.json
+ safetensors (one file or a sharded index), read for the engine and for conversion, and written;
and the tokenizer files `AutoTokenizer.from_pretrained` reads, written (reading them is
tokenizers/hf.py's).

HF's rotate_half RoPE pairs dimensions (j, j + head_size/2) where llama2.c pairs (2j, 2j+1), so
wq and wk rows are permuted per head on the way in and out (arch.llama.hf_transforms). Every
hyperparameter travels: rope_theta, rms_norm_eps, head_dim (which may differ from
hidden_size / num_attention_heads) and Llama 3.1's "llama3" rope scaling; what babyllama cannot
run (other architectures, other RoPE types, biases, other activations, a sliding window shorter
than the context) is refused naming the config field or tensor.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..arch.llama import HF_NAMES, Weights, hf_transforms, spread
from ..config import ModelConfig, RopeScaling
from ..errors import CheckpointError, ConfigError
from ..fileio import make_folder, map_readonly, write_bytes
from .assemble import FLOAT_BYTES, Stored, build, gather, names_a_tensor, stored_bytes

ROPE_SCALING_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
MODEL_TYPES = ("llama", "mistral")  # Mistral's architecture is Llama's plus an optional sliding window
ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
MAX_CONTEXT = 1 << 24  # a larger max_position_embeddings is a broken file, not a model


def _safetensors():
    try:
        import safetensors.numpy
    except ImportError:
        raise CheckpointError("Hugging Face models need safetensors: pip install 'babyllama[hf]'") from None
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


def _positive_int(where: Path, c: dict, key: str, default=None, limit: int = 1 << 31) -> int:
    value = c.get(key, default)
    if value is None:
        raise CheckpointError(f"{where}: missing key {key!r}")
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= limit:
        raise CheckpointError(f"{where}: {key}: expected a positive integer up to {limit}, found {value!r}")
    return value


def model_config(folder: Path, c: dict) -> ModelConfig:
    """The ModelConfig of a parsed config.json; what babyllama cannot run is refused naming the key."""
    where = Path(folder) / "config.json"
    if c.get("model_type") not in MODEL_TYPES:
        raise CheckpointError(f"{where}: model_type: expected one of {', '.join(map(repr, MODEL_TYPES + ('gpt2',)))} "
                              f"(the Llama architecture, or GPT-2), found {c.get('model_type')!r}")
    archs = c.get("architectures") or []
    if not isinstance(archs, list) or any(a not in ARCHITECTURES for a in archs):
        raise CheckpointError(f"{where}: architectures: expected {' or '.join(ARCHITECTURES)}, found {archs!r}")
    unsupported = {
        "hidden_act": (c.get("hidden_act", "silu"), "silu"),
        "attention_bias": (c.get("attention_bias", False), False),
        "mlp_bias": (c.get("mlp_bias", False), False),
    }
    for key, (found, expected) in unsupported.items():
        if found != expected:
            raise CheckpointError(f"{where}: {key}: expected {expected!r} (what llama2.c models use), found {found!r}")
    seq_len = _positive_int(where, c, "max_position_embeddings", 2048, MAX_CONTEXT)
    window = c.get("sliding_window")
    if window is not None and c.get("use_sliding_window", True) is not False:
        if isinstance(window, bool) or not isinstance(window, int) or window < seq_len:
            raise CheckpointError(f"{where}: sliding_window: expected null or at least max_position_embeddings "
                                  f"({seq_len}): babyllama attends to the whole context, found {window!r}")
    theta, scaling = _rope(where, c)
    heads = _positive_int(where, c, "num_attention_heads")
    kv_heads = c.get("num_key_value_heads") or heads
    head_dim = c.get("head_dim") or 0
    for key, value in (("num_key_value_heads", kv_heads), ("head_dim", head_dim or 1)):
        _positive_int(where, {key: value}, key)
    try:
        return ModelConfig(
            dim=_positive_int(where, c, "hidden_size"), hidden_dim=_positive_int(where, c, "intermediate_size"),
            n_layers=_positive_int(where, c, "num_hidden_layers"), n_heads=heads, n_kv_heads=kv_heads,
            vocab_size=_positive_int(where, c, "vocab_size"), seq_len=seq_len,
            shared_classifier=bool(c.get("tie_word_embeddings", False)),  # transformers' default is False
            norm_eps=float(c.get("rms_norm_eps", 1e-6)), rope_theta=float(theta), head_dim=head_dim,
            rope_scaling=scaling,
        )
    except (ConfigError, TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: invalid model shape ({e})") from None


# ---------------------------------------------------------------------------------------------
# weights


def map_safetensors(path) -> dict[str, Stored]:
    """The tensors of one .safetensors file as read-only views of its mapping (no copy).

    The safetensors library checks the file first (header, offsets, dtypes, the exact size); the
    already validated header is then read again to find each tensor's bytes. Dtypes other than
    F32, F16 and BF16 (int8 or fp8 quantizations) are refused, naming the tensor.
    """
    _safetensors()
    from safetensors import safe_open

    path = Path(path)
    buf = map_readonly(path, CheckpointError, "safetensors file")
    try:
        with safe_open(path, framework="numpy") as f:
            keys = set(f.keys())
    except Exception as e:  # SafetensorError: truncated, foreign, inconsistent
        raise CheckpointError(f"{path}: not a valid safetensors file ({e})") from None
    n = int.from_bytes(bytes(buf[:8]), "little")
    header = json.loads(bytes(buf[8 : 8 + n]))
    base = 8 + n
    out = {}
    for key in sorted(keys):
        info = header[key]
        dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        if dtype not in FLOAT_BYTES:
            raise CheckpointError(f"{path}: tensor {key}: expected dtype F32, F16 or BF16, found {dtype}")
        if end - begin != stored_bytes(dtype, shape) or base + end > buf.size:
            raise CheckpointError(f"{path}: tensor {key}: {end - begin} bytes do not hold {dtype} {list(shape)}")
        out[key] = Stored(key, dtype, shape, buf[base + begin : base + end])
    return out


def _shard_names(folder: Path) -> list[str]:
    """The safetensors files of a folder: the index's shards, or model.safetensors."""
    index_path = folder / "model.safetensors.index.json"
    if index_path.is_file():
        index = read_json(folder, index_path.name, "a safetensors index")
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index_path}: expected a non-empty 'weight_map' object")
        names = sorted(set(weight_map.values()), key=str)
        for name in names:
            if not isinstance(name, str) or Path(name).name != name or not (folder / name).is_file():
                raise CheckpointError(f"{index_path}: weight_map names shard {name!r}: expected a file in {folder}")
        return names
    if (folder / "model.safetensors").is_file():
        return ["model.safetensors"]
    found = sorted(p.name for p in folder.iterdir())[:8]
    raise CheckpointError(f"{folder}: expected model.safetensors or model.safetensors.index.json, found {found}")


def hf_tensors(folder, cfg: ModelConfig) -> dict:
    """gather's tensors of an HF folder: every shard mapped, Llama's names checked. Biases and
    tensors of other architectures are refused, naming the first one."""
    folder = Path(folder)
    lookup: dict[str, Stored] = {}
    for name in _shard_names(folder):
        lookup.update(map_safetensors(folder / name))
    for key in sorted(lookup):
        if names_a_tensor(HF_NAMES, key, cfg.n_layers) or key.endswith("rotary_emb.inv_freq"):  # (old files: RoPE's)
            continue
        if key.endswith(".bias"):
            raise CheckpointError(f"{folder}: tensor {key}: biases are not part of the Llama architecture "
                                  "babyllama runs (expected weights only)")
        raise CheckpointError(f"{folder}: unexpected tensor {key} (expected Llama's model.* and lm_head.weight)")
    return gather(cfg, HF_NAMES, lookup, str(folder))


def load_hf(folder) -> tuple[ModelConfig, Weights]:
    """(config, fp32 Weights) of a LlamaForCausalLM folder: config.json + model.safetensors (or a
    sharded index), in F32, F16 or BF16. For conversion; load_hf_model is the inference path."""
    return load_hf_model(folder)


def load_hf_model(folder, quantize: int | None = None, note=None):
    """(config, weights) of an HF folder for the engine: fp32 Weights (the embedding and an untied
    classifier mapped when stored as F32; per-layer tensors stacked once, wq/wk rows put in the
    interleaved RoPE order), or with quantize=8|4 QuantWeights quantized one layer at a time."""
    folder = Path(folder)
    c = read_json(folder, "config.json", "a Hugging Face model folder")
    if c.get("model_type") == "gpt2":  # GPT2LMHeadModel: hf_gpt2.py
        from .hf_gpt2 import load_hf_gpt2

        if quantize is not None:
            raise CheckpointError(f"{folder}: --quantize: the GPT-2 engine runs fp32 weights only, found --quantize "
                                  f"{quantize}")
        return load_hf_gpt2(folder, c)
    cfg = model_config(folder, c)
    tensors = hf_tensors(folder, cfg)
    return cfg, build(cfg, tensors, hf_transforms(cfg, to_hf=False), quantize, note)


def export_hf(out_dir, cfg: ModelConfig, weights: Weights, inputs=()) -> Path:
    """Write out_dir/model.safetensors and out_dir/config.json (the latter last), atomically.

    out_dir may exist (its model files are replaced) or be created, one level; it must not be
    one of `inputs`.
    """
    if cfg.arch == "gpt2":
        from .hf_gpt2 import export_hf_gpt2

        return export_hf_gpt2(out_dir, cfg, weights, inputs)
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
