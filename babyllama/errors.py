"""Errors a user can act on.

Every failure caused by input (a file, a flag, a prompt) or by the place output goes raises a
subclass of BabyLlamaError whose message names what was expected and what was found. The CLI
(babyllama/cli) prints that message as one line on stderr and exits non-zero; it never shows a
traceback for these.
"""


class BabyLlamaError(Exception):
    """Base class of babyllama's user-facing errors."""


class ConfigError(BabyLlamaError, ValueError):
    """Model hyperparameters that cannot describe a supported model."""


class CheckpointError(BabyLlamaError):
    """A model file that is missing, truncated, foreign or inconsistent."""


class TokenizerError(BabyLlamaError):
    """A tokenizer file that is missing, malformed, or does not fit the model."""


class GenerationError(BabyLlamaError, ValueError):
    """Generation settings or prompts that cannot be honoured (e.g. prompt longer than the context)."""


class DataError(BabyLlamaError):
    """A corpus, download or token-shard directory that is missing, empty or inconsistent."""


class OutputError(BabyLlamaError):
    """An output path that cannot be written: missing or read-only folder, a special file, the input itself."""


class TrainError(BabyLlamaError, ValueError):
    """Training settings, data or checkpoints that cannot be used as given."""
