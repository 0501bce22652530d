"""The trainers' RoPE tables in NumPy: cos and sin of every position's angles, computed in float64
and rounded to float32, shared by the torch model (training/model.py) and the hand-written trainer
(training/grad), so both rotate by the same numbers.

Pair i of every head at position pos is rotated by pos * theta^(-2i / head_size) (Su et al. 2021,
"RoFormer"); with rope_scaling, Llama 3.1's rescaled frequencies (Meta's apply_scaling, as the
engine's rope_table). The engine computes its own float32 tables the way llama2.c's run.c does.
"""

from __future__ import annotations

import math

import numpy as np

from ..config import ModelConfig


def rope_tables(cfg: ModelConfig) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin of the RoPE angles, each (seq_len, head_size / 2) float32."""
    hs = cfg.head_size
    inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, hs, 2, dtype=np.float64) / hs))
    s = cfg.rope_scaling
    if s is not None:
        wavelen = 2 * math.pi / inv_freq
        orig = s.original_max_position_embeddings
        smooth = (orig / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
        ramp = (1 - smooth) * inv_freq / s.factor + smooth * inv_freq
        inv_freq = np.where(wavelen > orig / s.low_freq_factor, inv_freq / s.factor,  # long: slowed down
                            np.where(wavelen >= orig / s.high_freq_factor, ramp, inv_freq))  # short: kept
    angles = np.outer(np.arange(cfg.seq_len, dtype=np.float64), inv_freq)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
