"""ModelConfig: the one description of a model's shape, shared by trainer, exporter and engine."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .errors import ConfigError


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

    def __post_init__(self) -> None:
        for name in ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.dim % self.n_heads:
            raise ConfigError(f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.n_kv_heads})")
        if self.head_size % 2:
            raise ConfigError(f"head size dim/n_heads must be even for RoPE, got {self.head_size}")
        if not self.norm_eps > 0 or not self.rope_theta > 0:
            raise ConfigError(f"norm_eps and rope_theta must be positive, got {self.norm_eps}, {self.rope_theta}")

    @property
    def head_size(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_size

    @property
    def kv_mul(self) -> int:
        """How many query heads share one key/value head."""
        return self.n_heads // self.n_kv_heads

    @property
    def n_params(self) -> int:
        """Number of weights, counting a tied classifier once."""
        d, h, L, kv = self.dim, self.hidden_dim, self.n_layers, self.kv_dim
        per_layer = 2 * d + d * d + 2 * kv * d + d * d + 3 * h * d
        classifier = 0 if self.shared_classifier else self.vocab_size * d
        return self.vocab_size * d + L * per_layer + d + classifier

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown model config keys: {sorted(unknown)}")
        return cls(**d)


def llama_hidden_dim(dim: int, multiple_of: int = 32) -> int:
    """Llama's SwiGLU width: 2/3 of 4*dim, rounded up to a multiple of `multiple_of`.

    SwiGLU has three matrices instead of two, so 2/3 keeps the parameter count of a 4*dim MLP
    (Shazeer 2020, "GLU Variants Improve Transformer"). stories260K: dim 64, multiple_of 4 -> 172.
    """
    if dim <= 0 or multiple_of <= 0:
        raise ConfigError(f"dim and multiple_of must be positive, got {dim}, {multiple_of}")
    hidden = int(2 * (4 * dim) / 3)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)
