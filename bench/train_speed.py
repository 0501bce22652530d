#!/usr/bin/env python3
"""Training speed, side by side in one run: `babyllama train` with the hand-written backend
(--backend numba) next to torch eager (--backend torch) and torch.compile (--backend torch
--compile), the same steps from the same seed, on the TinyStories excerpt.

    bench/train_speed.py                      # stories260K's shape and a GPT-2 of the same size
    bench/train_speed.py --threads 1,2 --rounds 5 --steps 60

Every run is a fresh `babyllama train` process; the variants take turns, round after round (the
machine is shared and noisy: a run's speed is the median of its steps after the first few, and a
variant's the best of its rounds). Next to wall time it reports the CPU time a step costs (all
the process's threads; metrics.jsonl's cpu_ms_per_iter), which other processes on the machine
inflate far less: with one thread it is the work itself. The loss curves of the last round go on one plot (loss.png,
when matplotlib is installed); with the same seed all variants start from the same weights and
see the same batches, so their curves should lie on top of each other.

Data: the excerpt tokenized with llama2.c's 512-token vocabulary (../shared/data/tok512.model,
the one stories260K was trained with), as bench/train_excerpt.sh does with a vocabulary of its own.
Bench only, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"

SHAPES = {  # the model flags; both train with the same optimisation settings below
    "llama": ["--dim", "64", "--n_layers", "5", "--n_heads", "8", "--n_kv_heads", "4", "--multiple_of", "4"],
    "gpt2": ["--arch", "gpt2", "--dim", "64", "--n_layers", "5", "--n_heads", "8"],
}
SHAPE_NAMES = {"llama": "stories260K (Llama: dim 64, 5 layers, 8 heads, 4 kv heads, hidden 172)",
               "gpt2": "GPT-2 (dim 64, 5 layers, 8 heads, hidden 256)"}
COMMON = ["--seq_len", "256", "--batch_size", "16", "--lr", "5e-3", "--min_lr", "5e-4", "--warmup_iters", "10",
          "--weight_decay", "0.1", "--grad_clip", "1.0", "--eval_iters", "2", "--log_interval", "1",
          "--device", "cpu", "--seed", "1337"]
VARIANTS = {
    "numba": ["--backend", "numba"],
    "torch eager": ["--backend", "torch"],
    "torch.compile": ["--backend", "torch", "--compile"],
}
WARMUP_STEPS = 5  # compilation (numba's kernels, torch.compile's graphs) happens in these


def babyllama(*args, env=None, log=None) -> None:
    cmd = [sys.executable, "-m", "babyllama", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if log is not None:
        log.write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-2000:]}")


def prepare_data(args) -> Path:
    data = args.out / "data"
    if not (data / "meta.json").is_file():
        args.out.mkdir(parents=True, exist_ok=True)
        babyllama("data", "pretokenize", "--tokenizer", str(args.tokenizer), "--input", str(args.excerpt),
                  "--out", str(data), "--val-fraction", "0.05")
    return data


def one_run(args, data: Path, arch: str, variant: str, threads: int, tag: str) -> dict:
    out = args.out / f"{arch}-{variant.replace(' ', '_').replace('.', '_')}-t{threads}-{tag}"
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "NUMBA_NUM_THREADS": str(threads),
           "PYTHONPATH": str(ROOT)}
    if out.exists():
        for f in out.iterdir():
            f.unlink()
    t0 = time.perf_counter()
    babyllama("train", "--data_dir", str(data), "--out_dir", str(out), *SHAPES[arch], *COMMON,
              "--max_iters", str(args.steps), "--eval_interval", str(args.steps), *VARIANTS[variant],
              env=env, log=args.out / f"{out.name}.log")
    wall = time.perf_counter() - t0
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [e for e in events if e["event"] == "train"]
    steady = [e for e in train if e["iter"] > WARMUP_STEPS]
    ms = statistics.median(e["ms_per_iter"] for e in steady)
    cpu = statistics.median(e["cpu_ms_per_iter"] for e in steady)
    return {"arch": arch, "variant": variant, "threads": threads, "ms_per_step": ms, "cpu_ms_per_step": cpu,
            "tokens_per_s": 16 * 256 / (ms / 1000), "process_s": wall,
            "losses": [e["loss"] for e in train], "val_loss": [e["val_loss"] for e in events if e["event"] == "eval"]}


def plot(results: list[dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    archs = sorted({r["arch"] for r in results}, key=list(SHAPES).index)
    fig, axes = plt.subplots(1, len(archs), figsize=(6 * len(archs), 4), squeeze=False)
    for ax, arch in zip(axes[0], archs):
        for r in results:
            if r["arch"] == arch:
                ax.plot(range(1, len(r["losses"]) + 1), r["losses"], label=f"{r['variant']} ({r['threads']} threads)",
                        linewidth=1)
        ax.set(title=SHAPE_NAMES[arch].split(" (")[0], xlabel="step", ylabel="train loss")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    return True


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--excerpt", type=Path, default=SHARED / "tinystories_excerpt.txt")
    p.add_argument("--tokenizer", type=Path, default=SHARED / "tok512.model")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "train_speed")
    p.add_argument("--steps", type=int, default=50, help="optimizer steps per run (default 50)")
    p.add_argument("--rounds", type=int, default=3, help="turns each variant takes (default 3)")
    p.add_argument("--threads", default=str(len(os.sched_getaffinity(0))), help="comma-separated thread counts")
    p.add_argument("--arch", default="llama,gpt2", help="comma-separated: llama, gpt2")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated: " + ", ".join(VARIANTS))
    args = p.parse_args()
    archs, threads = args.arch.split(","), [int(t) for t in args.threads.split(",")]
    variants = args.variants.split(",")
    data = prepare_data(args)

    best: dict[tuple, dict] = {}
    best_cpu: dict[tuple, float] = {}
    last: dict[tuple, dict] = {}
    for rnd in range(args.rounds):
        for arch in archs:
            for variant in variants:
                for n in threads:
                    r = one_run(args, data, arch, variant, n, f"r{rnd}")
                    key = (arch, variant, n)
                    last[key] = r
                    if key not in best or r["ms_per_step"] < best[key]["ms_per_step"]:
                        best[key] = r
                    if key not in best_cpu or r["cpu_ms_per_step"] < best_cpu[key]:
                        best_cpu[key] = r["cpu_ms_per_step"]
                    print(f"round {rnd + 1}/{args.rounds} {arch:5} {variant:13} {n} threads: "
                          f"{r['ms_per_step']:7.1f} ms/step {r['tokens_per_s']:8,.0f} tok/s, "
                          f"CPU {r['cpu_ms_per_step']:7.1f} ms/step (process {r['process_s']:.0f} s, "
                          f"load {os.getloadavg()[0]:.1f})", flush=True)

    print(f"\n{args.steps} steps of 16 x 256 tokens, best of {args.rounds} rounds (median step after "
          f"{WARMUP_STEPS}); load average at the end {os.getloadavg()[0]:.1f}")
    print("| model | trainer | threads | ms/step | tokens/s | vs torch eager | CPU ms/step | CPU vs torch eager "
          "| loss at the last step |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for arch in archs:
        for n in threads:
            eager, eager_cpu = best.get((arch, "torch eager", n)), best_cpu.get((arch, "torch eager", n))
            for variant in variants:
                r, cpu = best[(arch, variant, n)], best_cpu[(arch, variant, n)]
                ratio = f"{eager['ms_per_step'] / r['ms_per_step']:.2f}x" if eager else "-"
                cpu_ratio = f"{eager_cpu / cpu:.2f}x" if eager_cpu else "-"
                print(f"| {SHAPE_NAMES[arch].split(' (')[0]} | {variant} | {n} | {r['ms_per_step']:.1f} | "
                      f"{r['tokens_per_s']:,.0f} | {ratio} | {cpu:.1f} | {cpu_ratio} | {r['losses'][-1]:.4f} |")
    results = list(last.values())
    (args.out / "results.json").write_text(json.dumps({"best": list(best.values()), "last": results}, indent=1))
    png = args.out / "loss.png"
    print(f"\nloss curves: {png}" if plot(results, png) else "\nmatplotlib is not installed: no loss.png")


if __name__ == "__main__":
    main()
