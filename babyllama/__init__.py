"""babyllama: llama2.c in Python.

Train a small Llama in PyTorch, export it to llama2.c's .bin formats, and run any llama2.c
checkpoint from Python at C speed (NumPy + Numba).

    >>> import babyllama
    >>> model = babyllama.load("stories15M.bin")          # tokenizer.bin found beside it
    >>> for piece in model.generate("Once upon a time", steps=64, temperature=0.0):
    ...     print(piece, end="")
"""

from .config import ModelConfig
from .errors import BabyLlamaError, CheckpointError, ConfigError, GenerationError, OutputError, TokenizerError

__version__ = "0.2.0"


def load(model_path=None, tokenizer_path=None, **kwargs):
    """Load a model (and its tokenizer) for generation. See babyllama.api.Model."""
    from .api import Model  # numba is imported only when a model is actually loaded

    return Model.load(model_path, tokenizer_path, **kwargs)


__all__ = [
    "load",
    "ModelConfig",
    "BabyLlamaError",
    "CheckpointError",
    "ConfigError",
    "GenerationError",
    "OutputError",
    "TokenizerError",
]
