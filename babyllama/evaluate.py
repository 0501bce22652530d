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
from babyllama.formats import load_for_inference
from babyllama.generation import generate_ids
loaded = load_for_inference(sys.argv[1], own_tokenizer=False)  # a .bin, a Hugging Face folder or a GGUF file
engine = Engine(loaded.config, loaded.weights)
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




def matmul_flops(cfg, tokens: int) -> float:
    """FLOPs of a forward's matrix products for `tokens` rows (2 per multiply-add; no attention)."""
    d, h, q, kv = cfg.dim, cfg.hidden_dim, cfg.q_dim, cfg.kv_dim
    per_layer = d * q + 2 * d * kv + q * d + 3 * d * h
    return 2.0 * tokens * (cfg.n_layers * per_layer + cfg.vocab_size * d)


def prefill_speed(engine, n_tokens: int, repeats: int) -> tuple[float, float]:
    """(best tok/s, its matmul GFLOP/s) of prefilling an n-token prompt in one call (the last
    position's logits, as generation needs), after a warm-up."""
    n_tokens = min(n_tokens, engine.config.seq_len)
    tokens = np.random.default_rng(0).integers(0, engine.config.vocab_size, n_tokens)
    state = engine.new_state()
    engine.forward(tokens[: min(n_tokens, 8)], 0, state)  # compile / page in
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        engine.forward(tokens, 0, state)
        best = max(best, n_tokens / (time.perf_counter() - t0))
    return best, best * matmul_flops(engine.config, 1) / 1e9


def sgemm_ceiling(cfg, n_tokens: int, repeats: int = 3) -> float:
    """GFLOP/s of numpy's BLAS sgemm (reassociating, so not usable by the engine) on the model's
    matrix shapes for n_tokens rows: the machine's matrix-matrix ceiling."""
    rng = np.random.default_rng(0)
    d, h, q = cfg.dim, cfg.hidden_dim, cfg.q_dim
    shapes = [(q, d), (cfg.kv_dim, d), (cfg.kv_dim, d), (d, q), (h, d), (h, d), (d, h)]
    mats = [(rng.standard_normal((n_tokens, cols), dtype=np.float32), rng.standard_normal((rows, cols), dtype=np.float32))
            for rows, cols in shapes]
    flops = sum(2.0 * n_tokens * rows * cols for rows, cols in shapes)
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        for x, w in mats:
            x @ w.T
        best = max(best, flops / (time.perf_counter() - t0) / 1e9)
    return best


def batch_speed(engine, batch: int, new_tokens: int, repeats: int) -> dict:
    """Aggregate and per-sequence tok/s of `batch` sequences decoding `new_tokens` each from BOS
    together (the scheduler; greedy, never stopping early), the KV cache bytes they hold at the
    end, and the steps' mean rows."""
    from .generation import Sampling, Scheduler

    steps = min(1 + new_tokens, engine.config.seq_len)
    best, kv = 0.0, 0
    for r in range(repeats + 1):  # the first run compiles / pages in
        sched = Scheduler(engine, max_sequences=batch)
        for _ in range(batch):
            sched.add([1], steps, Sampling(temperature=0.0), stop_ids=())
        n, t0 = 0, time.perf_counter()
        while sched.busy:
            n += len(sched.step())
            kv = max(kv, sched.state.kv_bytes_used())
        if r:
            best = max(best, n / (time.perf_counter() - t0))
    return {"tok_s": best, "per_seq_tok_s": best / batch, "kv_mb": kv / 1e6}


def speculative_speed(engine, drafter_factory, steps: int, repeats: int) -> tuple[float, float]:
    """(best tok/s, acceptance) of speculative greedy decoding from BOS (never stopping early)."""
    from .generation.speculative import SpecStats, speculative_ids

    best, acceptance = 0.0, 0.0
    for r in range(repeats + 1):
        stats = SpecStats()
        t0 = time.perf_counter()
        n = sum(1 for _ in speculative_ids(engine, engine.new_state(), [1], steps, lambda lg: int(np.argmax(lg[2:])) + 2,
                                            drafter_factory(), stop_ids=(), stats=stats))
        if r:
            best, acceptance = max(best, n / (time.perf_counter() - t0)), stats.acceptance
    return best, acceptance


def peak_rss() -> int:
    """This process's peak resident memory in bytes (VmHWM)."""
    try:
        return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM"))
    except (OSError, StopIteration):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
