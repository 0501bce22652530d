"""ModelConfig: the one description of a model's shape, shared by trainer, formats and engine.

Every hyperparameter a model file can carry lives here (rope_theta, rope_scaling, norm_eps,
head_dim), so a loader that reads one passes it on and a writer that cannot store one refuses
(formats/llama2c.py) instead of dropping it.

`arch` picks the block (arch/llama.py, arch/gpt2.py). GPT-2 (Radford et al. 2019) uses the same
fields with its own meaning and limits: norm_eps is LayerNorm's epsilon, seq_len is n_positions
(the learned position table), hidden_dim is the MLP width (4 * dim in GPT-2, but any width is
accepted), and the model has neither RoPE nor grouped-query attention nor an untied classifier.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from .errors import ConfigError

ARCHITECTURES = ("llama", "gpt2")


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1's RoPE frequency scaling (rope_type "llama3"): long wavelengths are divided by
    `factor`, short ones kept, with a smooth ramp between (Meta's `apply_scaling`)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int
    rope_type: str = "llama3"

    def __post_init__(self) -> None:
        if self.rope_type != "llama3":
            raise ConfigError(f"rope_scaling.rope_type: expected 'llama3', found {self.rope_type!r}")
        for name in ("factor", "low_freq_factor", "high_freq_factor"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ConfigError(f"rope_scaling.{name} must be a positive number, got {value!r}")
        if not self.high_freq_factor > self.low_freq_factor:
            raise ConfigError(f"rope_scaling: high_freq_factor ({self.high_freq_factor}) must exceed "
                              f"low_freq_factor ({self.low_freq_factor})")
        n = self.original_max_position_embeddings
        if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            raise ConfigError(f"rope_scaling.original_max_position_embeddings must be a positive integer, got {n!r}")


@dataclass(frozen=True)
class ModelConfig:
    dim: int  # width of the residual stream
    hidden_dim: int  # width of the SwiGLU feed-forward layer
    n_layers: int
    n_heads: int  # query heads
    n_kv_heads: int  # key/value heads (grouped-query attention when < n_heads)
    vocab_size: int
    seq_len: int  # maximum context length
    shared_classifier: bool = True  # output head tied to token_embedding
    norm_eps: float = 1e-5  # RMSNorm epsilon (llama2.c hard-codes 1e-5)
    rope_theta: float = 10000.0  # RoPE base frequency (llama2.c hard-codes 10000)
    head_dim: int = 0  # width of one attention head; 0 = dim // n_heads (llama2.c's only choice)
    rope_scaling: RopeScaling | None = None  # Llama 3.1+ long-context frequency scaling
    arch: str = "llama"

    def __post_init__(self) -> None:
        for name in ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.arch not in ARCHITECTURES:
            raise ConfigError(f"arch: expected one of {', '.join(ARCHITECTURES)}, found {self.arch!r}")
        if isinstance(self.head_dim, bool) or not isinstance(self.head_dim, int) or self.head_dim < 0:
            raise ConfigError(f"head_dim must be a positive integer (or 0 for dim / n_heads), got {self.head_dim!r}")
        if self.head_dim == 0:
            if self.dim % self.n_heads:
                raise ConfigError(f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
            object.__setattr__(self, "head_dim", self.dim // self.n_heads)  # derived, so equal configs compare equal
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.n_kv_heads})")
        if self.arch == "gpt2":
            self._check_gpt2()
        elif self.head_dim % 2:
            raise ConfigError(f"head size must be even for RoPE, got {self.head_dim}")
        for name in ("norm_eps", "rope_theta"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
                raise ConfigError(f"{name} must be a positive number, got {value!r}")
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", _rope_scaling(self.rope_scaling))
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, RopeScaling):
            raise ConfigError(f"rope_scaling must be None or a RopeScaling, got {self.rope_scaling!r}")

    def _check_gpt2(self) -> None:
        """GPT-2's block has one shape: what a field would change in a Llama it cannot express."""
        fixed = {
            "n_kv_heads": (self.n_kv_heads, self.n_heads, "GPT-2 has no grouped-query attention"),
            "head_dim": (self.head_dim * self.n_heads, self.dim, "GPT-2's heads split dim"),
            "shared_classifier": (self.shared_classifier, True, "GPT-2 ties its classifier to wte"),
            "rope_theta": (self.rope_theta, 10000.0, "GPT-2 has no RoPE (learned positions)"),
            "rope_scaling": (self.rope_scaling, None, "GPT-2 has no RoPE (learned positions)"),
        }
        for name, (found, expected, why) in fixed.items():
            if found != expected:
                what = "n_heads * head_dim" if name == "head_dim" else name
                raise ConfigError(f"arch gpt2: {what} must be {expected!r} ({why}), found {found!r}")

    @property
    def head_size(self) -> int:
        return self.head_dim

    @property
    def q_dim(self) -> int:
        """Width of the concatenated query heads (= dim unless head_dim was given)."""
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    @property
    def kv_mul(self) -> int:
        """How many query heads share one key/value head."""
        return self.n_heads // self.n_kv_heads

    @property
    def has_llama2c_defaults(self) -> bool:
        """True when run.c's hard-coded values (theta 10000, eps 1e-5, head = dim / heads, no
        scaling) describe this model, i.e. a legacy v0 file can hold it."""
        return (self.arch == "llama" and self.rope_theta == 10000.0 and self.norm_eps == 1e-5
                and self.head_dim * self.n_heads == self.dim and self.rope_scaling is None)

    @property
    def n_params(self) -> int:
        """Number of weights, counting a tied classifier once."""
        d, h, L, kv, q = self.dim, self.hidden_dim, self.n_layers, self.kv_dim, self.q_dim
        if self.arch == "gpt2":  # + learned positions; per layer: 2 LayerNorms, qkv, proj, fc, proj, with biases
            per_layer = 4 * d + (3 * d * d + 3 * d) + (d * d + d) + (h * d + h) + (d * h + d)
            return self.vocab_size * d + self.seq_len * d + L * per_layer + 2 * d
        per_layer = 2 * d + q * d + 2 * kv * d + d * q + 3 * h * d
        classifier = 0 if self.shared_classifier else self.vocab_size * d
        return self.vocab_size * d + L * per_layer + d + classifier

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown model config keys: {sorted(unknown)}")
        try:
            return cls(**d)
        except TypeError as e:  # a required key is missing
            raise ConfigError(f"incomplete model config ({e})") from None


def _rope_scaling(d: dict) -> RopeScaling:
    known = {f.name for f in fields(RopeScaling)}
    unknown = set(d) - known
    if unknown:
        raise ConfigError(f"unknown rope_scaling keys: {sorted(unknown)}")
    try:
        return RopeScaling(**d)
    except TypeError as e:
        raise ConfigError(f"incomplete rope_scaling ({e})") from None


def llama_hidden_dim(dim: int, multiple_of: int = 32) -> int:
    """Llama's SwiGLU width: 2/3 of 4*dim, rounded up to a multiple of `multiple_of`.

    SwiGLU has three matrices instead of two, so 2/3 keeps the parameter count of a 4*dim MLP
    (Shazeer 2020, "GLU Variants Improve Transformer"). stories260K: dim 64, multiple_of 4 -> 172.
    """
    if dim <= 0 or multiple_of <= 0:
        raise ConfigError(f"dim and multiple_of must be positive, got {dim}, {multiple_of}")
    hidden = int(2 * (4 * dim) / 3)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)
