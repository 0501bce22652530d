"""`babyllama bench`: decode speed, time to first token, memory, and (optionally) quality.

    babyllama bench stories15M.bin                 # a real model
    babyllama bench --shape 110M                   # random weights of a llama2.c model's shape
    babyllama bench model.bin --ppl story.txt      # + perplexity on a text
    babyllama bench --shape 110M --quantize 8,4    # fp32 next to int8 and int4 copies, one run
    babyllama bench --shape 110M --peer ./run      # next to llama2.c's own `run` binary

Decode speed is single-stream greedy decoding from BOS, best of --repeats runs (a shared machine
is noisy: the best run is the one least disturbed). GB/s is weights streamed per second: every
decode step reads every weight once, so this is the number to compare with memory bandwidth.
Time to first token is measured in a fresh process, from its start to the first sampled token:
"cold" with an empty compile cache (the first-ever run), "warm" with the cache it left.
--peer times a llama2.c `run` binary (which the project does not ship: build it from llama2.c's
run.c) on each v0 model, greedy from BOS with the same steps and threads, its runs interleaved
with ours so both see the same machine; it reports run.c's own "achieved tok/s".
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from .config import ModelConfig
from .errors import BabyLlamaError

# Shapes of Karpathy's llama2.c models (tinyllamas), for random-weight timing runs.
SHAPES = {
    "260K": ModelConfig(dim=64, hidden_dim=172, n_layers=5, n_heads=8, n_kv_heads=4, vocab_size=512, seq_len=512),
    "15M": ModelConfig(dim=288, hidden_dim=768, n_layers=6, n_heads=6, n_kv_heads=6, vocab_size=32000, seq_len=256),
    "42M": ModelConfig(dim=512, hidden_dim=1376, n_layers=8, n_heads=8, n_kv_heads=8, vocab_size=32000, seq_len=1024),
    "110M": ModelConfig(dim=768, hidden_dim=2048, n_layers=12, n_heads=12, n_kv_heads=12, vocab_size=32000,
                        seq_len=1024),
}


def random_weights(cfg: ModelConfig, seed: int = 0, scale: float | None = None) -> dict[str, np.ndarray]:
    """Random fp32 tensors of the right shapes: norms near 1, matrices N(0, scale^2).

    scale=None uses 1/sqrt(fan_in), which keeps activations of any depth in a trained model's range.
    """
    from .checkpoint import tensor_shapes

    rng = np.random.default_rng(seed)
    tensors = {}
    for name, shape in tensor_shapes(cfg).items():
        if name == "wcls" and cfg.shared_classifier:
            continue
        if name.startswith("rms"):
            tensors[name] = (1.0 + 0.1 * rng.standard_normal(shape, dtype=np.float32)).astype(np.float32)
        else:
            std = scale if scale is not None else 1.0 / math.sqrt(shape[-1])
            tensors[name] = rng.standard_normal(shape, dtype=np.float32) * np.float32(std)
    return tensors


def random_model(cfg: ModelConfig, path: Path, seed: int = 0) -> Path:
    """Write a v0 checkpoint of random weights for timing."""
    from .checkpoint import Weights, write_checkpoint

    write_checkpoint(path, cfg, Weights.from_dict(cfg, random_weights(cfg, seed)), version=0)
    return path


def placeholder_tokenizer(vocab_size: int):
    """A tokenizer of vocab_size pieces for random models: <unk> <s> </s>, the 256 byte tokens
    (when they fit), then "t<id>" pieces; only its size and printable pieces matter."""
    from .tokenizer import Tokenizer

    pieces = [b"<unk>", b"<s>", b"</s>"] + [f"<0x{b:02X}>".encode() for b in range(256)]
    pieces = pieces[:vocab_size] + [f"t{i}".encode() for i in range(len(pieces), vocab_size)]
    return Tokenizer(pieces, np.zeros(vocab_size, np.float32))


def decode_speed(engine, steps: int, repeats: int) -> tuple[float, float]:
    """(best tok/s, mean tok/s) of greedy decoding `steps` positions from BOS, after a warm-up."""
    from .generate import generate_ids

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
from babyllama.checkpoint import load_checkpoint
from babyllama.generate import engine_for, generate_ids
ck = load_checkpoint(sys.argv[1])
engine = engine_for(ck)
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


def bench_one(model_path: Path, label: str, args) -> dict:
    from .checkpoint import load_checkpoint
    from .generate import engine_for

    ck = load_checkpoint(model_path)
    engine = engine_for(ck, parallel=args.parallel)
    steps = min(args.steps, ck.config.seq_len)
    peers = args.peer if ck.version == 0 else []  # run.c reads only the v0 format
    if peers:  # one run of ours, then one of each peer, and again: the same machine state for all
        from numba import get_num_threads

        from .generate import find_tokenizer

        tokenizer = find_tokenizer(model_path, args.tokenizer)
        threads = get_num_threads() if engine.parallel else 1
        ours, theirs = [], {p: [] for p in peers}
        for _ in range(args.repeats):
            ours.append(decode_speed(engine, steps, 1)[0])
            for p in peers:
                theirs[p].append(peer_speed(p, model_path, tokenizer, steps, threads))
        best, mean = max(ours), sum(ours) / len(ours)
    else:
        best, mean = decode_speed(engine, steps, args.repeats)
    row = {
        "model": label,
        "format": f"v{ck.version}" + (f" gs{ck.group_size}" if ck.group_size else ""),
        "file_mb": round(model_path.stat().st_size / 1e6, 2),
        "params_m": round(ck.config.n_params / 1e6, 2),
        "threads": "n" if engine.parallel else "1",
        "steps": steps,
        "tok_s": round(best, 1),
        "tok_s_mean": round(mean, 1),
        "gb_s": round(best * engine.weight_bytes / 1e9, 1),
    }
    for p in peers:
        name = Path(p).name
        row[f"{name}_tok_s"] = round(max(theirs[p]), 1)
        row[f"vs_{name}"] = round(best / max(theirs[p]), 2)  # ours / theirs
    if args.ttft:
        with tempfile.TemporaryDirectory() as cache:
            cold, _ = first_token_probe(model_path, 2, cache)
            warm, rss = first_token_probe(model_path, steps, cache)
        row.update(ttft_cold_s=round(cold, 3), ttft_warm_s=round(warm, 3), peak_rss_mb=round(rss / 1e6, 1))
    if args.ppl:
        from .generate import Model, find_tokenizer
        from .tokenizer import Tokenizer

        tok = Tokenizer.load(find_tokenizer(model_path, args.tokenizer), ck.config.vocab_size)
        ppl, n = perplexity(Model(engine, tok, model_path), Path(args.ppl).read_text(encoding="utf-8"), args.ppl_tokens)
        row.update(ppl=round(ppl, 4), ppl_tokens=n)
    return row


def _with_quantized(jobs: list, bits_list: str, tmp: Path) -> list:
    """Each fp32 job followed by its quantized copies (`babyllama quantize` with default group size)."""
    from .checkpoint import load_checkpoint
    from .quantize import quantize_file

    try:
        bits = [int(b) for b in bits_list.split(",")]
    except ValueError:
        raise BabyLlamaError(f"--quantize expects bit widths like 8,4, got {bits_list!r}") from None
    if any(b not in (8, 4) for b in bits):
        raise BabyLlamaError(f"--quantize bit widths must be 8 or 4, got {bits_list!r}")
    out = []
    for path, label in jobs:
        out.append((path, label))
        if load_checkpoint(path).version not in (0, 1):
            continue
        for b in bits:
            print(f"quantizing {label} to int{b}...", file=sys.stderr)
            q = tmp / f"{Path(path).stem}_q{b}.bin"
            quantize_file(path, q, b)
            out.append((q, f"{label} int{b}"))
    return out


def print_table(rows: list[dict]) -> None:
    cols = [c for c in rows[0]]
    for r in rows[1:]:
        cols += [c for c in r if c not in cols]
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in cols}
    print("  ".join(c.rjust(widths[c]) for c in cols))
    for r in rows:
        print("  ".join(str(r.get(c, "")).rjust(widths[c]) for c in cols))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="babyllama bench", description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="*", type=Path, help="model .bin files (any supported format)")
    p.add_argument("--shape", action="append", choices=list(SHAPES), default=[],
                   help="also time a random-weight model of this llama2.c shape (repeatable)")
    p.add_argument("-z", dest="tokenizer", help="tokenizer for --ppl and --peer (default: beside the model)")
    p.add_argument("--steps", type=int, default=256, help="positions to decode per run (default 256)")
    p.add_argument("--repeats", type=int, default=3, help="runs per model; the best is reported (default 3)")
    p.add_argument("--no-ttft", dest="ttft", action="store_false", help="skip the fresh-process first-token runs")
    p.add_argument("--ppl", metavar="TEXT", help="also report perplexity on this UTF-8 text file")
    p.add_argument("--ppl-tokens", type=int, default=20000, help="tokens of the text to score (default 20000)")
    p.add_argument("--serial", dest="parallel", action="store_const", const=False, default=None,
                   help="force one thread")
    p.add_argument("--parallel", dest="parallel", action="store_const", const=True, help="force the thread pool")
    p.add_argument("--quantize", metavar="BITS", default="",
                   help="also time int8/int4 copies of each fp32 model, e.g. 8,4 (written to a temp dir)")
    p.add_argument("--peer", metavar="RUN", action="append", default=[],
                   help="also time this llama2.c `run` binary on each v0 model, interleaved with ours (repeatable)")
    p.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    args = p.parse_args(argv)
    if not args.models and not args.shape:
        p.error("give a model file or --shape")
    if args.steps < 2 or args.repeats < 1 or args.ppl_tokens < 1:
        p.error("--steps must be >= 2, --repeats and --ppl-tokens >= 1")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        jobs = [(m, m.name) for m in args.models]
        for shape in args.shape:
            print(f"writing a random {shape} model...", file=sys.stderr)
            folder = Path(tmp) / shape
            folder.mkdir()
            if args.peer:  # run.c needs a tokenizer.bin of the model's vocabulary size beside it
                placeholder_tokenizer(SHAPES[shape].vocab_size).save(folder / "tokenizer.bin")
            jobs.append((random_model(SHAPES[shape], folder / f"{shape}.bin"), f"random {shape}"))
        if args.quantize:
            if args.ppl and args.tokenizer is None and args.models:  # the copies live in tmp: keep the original's
                from .generate import find_tokenizer

                args.tokenizer = str(find_tokenizer(args.models[0]))
            jobs = _with_quantized(jobs, args.quantize, Path(tmp))
        for path, label in jobs:
            print(f"benchmarking {label}...", file=sys.stderr)
            row = bench_one(path, label, args)
            rows.append(row)
            if args.json:
                print(json.dumps(row), flush=True)
    if not args.json:
        print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
