"""Measuring a model: decode speed, time to first token in a fresh process, peak memory, perplexity,
and a llama2.c `run` binary's speed on the same file. `babyllama bench` (cli/bench.py) reports
these; they are also plain functions for scripts."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from .errors import BabyLlamaError
from .generation import generate_ids


def decode_speed(engine, steps: int, repeats: int) -> tuple[float, float]:
    """(best tok/s, mean tok/s) of greedy decoding `steps` positions from BOS, after a warm-up."""
    def argmax(logits):
        return int(np.argmax(logits))

    state = engine.new_state()
    for _ in generate_ids(engine, state, [1], min(steps, 8), argmax):  # compile / page in
        pass
    rates = []
    for _ in range(repeats):
        n, t0 = 0, time.perf_counter()
        # tokens are forced not to end on BOS: a random model may sample it at any step
        for _ in generate_ids(engine, state, [1], steps, lambda lg: int(np.argmax(lg[2:])) + 2):
            n += 1
        rates.append(n / (time.perf_counter() - t0))
    return max(rates), sum(rates) / len(rates)


def peer_speed(binary: str, model_path: Path, tokenizer: Path, steps: int, threads: int) -> float:
    """tok/s that a llama2.c `run` binary reports (stderr "achieved tok/s") decoding greedily."""
    cmd = [binary, str(model_path), "-z", str(tokenizer), "-n", str(steps), "-s", "42", "-t", "0"]
    try:
        out = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS=str(threads)), capture_output=True, text=True)
    except OSError as e:
        raise BabyLlamaError(f"--peer {binary}: cannot run it ({e.strerror})") from None
    found = re.search(r"achieved tok/s: ([0-9.]+)", out.stderr)
    if out.returncode != 0 or not found:
        raise BabyLlamaError(f"--peer {binary}: no 'achieved tok/s' on its stderr (exit {out.returncode}): "
                             f"{out.stderr.strip()[-200:]!r}")
    return float(found.group(1))


def perplexity(model, text: str, max_tokens: int) -> tuple[float, int]:
    """exp(mean negative log-likelihood) of the text's tokens, in windows of the model's context."""
    tokens = model.encode(text)[: max_tokens + 1]
    if len(tokens) < 2:
        raise BabyLlamaError("perplexity text is empty after tokenization")
    seq_len = model.config.seq_len
    nll, count = 0.0, 0
    for start in range(0, len(tokens) - 1, seq_len - 1):
        window = tokens[start : start + seq_len]
        if len(window) < 2:
            break
        logits = model.logits(window[:-1]).astype(np.float64)
        m = logits.max(-1, keepdims=True)
        logz = (m[:, 0] + np.log(np.exp(logits - m).sum(-1)))
        target = np.asarray(window[1:])
        nll += float((logz - logits[np.arange(len(target)), target]).sum())
        count += len(target)
    return math.exp(nll / count), count


_PROBE = r"""
import sys, time
from babyllama.engine import Engine
from babyllama.formats.llama2c import load_checkpoint
from babyllama.generation import generate_ids
engine = Engine.from_checkpoint(load_checkpoint(sys.argv[1]))
state = engine.new_state()
it = generate_ids(engine, state, [1], int(sys.argv[2]), lambda lg: int(lg[2:].argmax()) + 2)
next(it)
t_first = time.time()  # wall clock: the parent compares it with the moment it spawned us
for _ in it:
    pass
# VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so it would report the parent's peak
try:
    rss = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))
except OSError:
    import resource
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(t_first, rss)
"""


def first_token_probe(model_path: Path, steps: int, cache_dir: str) -> tuple[float, int]:
    """(seconds from process start to the first token, peak RSS bytes) in a fresh interpreter."""
    env = dict(os.environ, NUMBA_CACHE_DIR=cache_dir)
    t_spawn = time.time()  # the interpreter's own start-up is part of what a user waits for
    out = subprocess.run([sys.executable, "-c", _PROBE, str(model_path), str(steps)], env=env,
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise BabyLlamaError(f"first-token probe failed: {out.stderr.strip().splitlines()[-1:]}")
    t_first, rss = out.stdout.split()
    return float(t_first) - t_spawn, int(rss)


