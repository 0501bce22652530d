"""Training a model: the run's settings (config.py), the torch training loop with DDP
(torch_loop.py: `train(TrainConfig)`), and the torch Transformer it trains (model.py).

Importing this package does not import torch; torch_loop and model do. The command line is
`babyllama train` (babyllama/cli/train.py); `python -m babyllama.training` is the same.
"""

from .config import TrainConfig, lr_at, model_config, parse_config, validate

__all__ = ["TrainConfig", "lr_at", "model_config", "parse_config", "validate"]
