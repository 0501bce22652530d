#!/usr/bin/env python3
"""Single-stream decode and prefill next to the peers, in turns, on the same weights.

    python bench/peers.py --run /tmp/llama2c/run --run /tmp/llama2c/runomp --lcpp-python /tmp/lcpp/bin/python

For each shape (stories260K's real weights, then random weights of llama2.c's 15M / 42M / 110M
shapes) it writes the model once as a v0 .bin, its int8 (v2) and int4 (v3) copies (`babyllama
quantize`'s default group size) and, through bench/llamacpp_peer.py, GGUF F32 / Q8_0 / Q4_0 files
of the same weights (files under --out, reused by later runs). Then, round after round, every
contender decodes 256 greedy tokens from BOS in a fresh process (babyllama fp32/int8/int4 with
`babyllama bench`, llama2.c's `run` binaries, llama.cpp through llama-cpp-python), and, with
--prefill N, babyllama and llama.cpp each take an N-token prompt in one call. The machine is
shared and noisy: a contender's number is its best round, and the ratios compare bests of the
same rounds. Prints a Markdown table per measure and writes every round's numbers to
OUT/peers.jsonl. Bench only: the peers are never dependencies and nothing here runs in CI.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))

ORDER = ("260K", "15M", "42M", "110M")


def prepare(out: Path, shape: str, lcpp_python: str | None) -> dict:
    """The shape's files: {'bin', 'q8', 'q4', 'tokenizer', 'gguf': folder}; written once."""
    from babyllama.arch.llama import Weights
    from babyllama.convert import quantize_file
    from babyllama.formats.llama2c import write_checkpoint
    from babyllama.testing import SHAPES, random_weights

    d = out / shape
    d.mkdir(parents=True, exist_ok=True)
    files = {"bin": d / "model.bin", "q8": d / "model_q8.bin", "q4": d / "model_q4.bin", "gguf": d}
    if shape == "260K":
        files["bin"] = SHARED / "stories260K.bin"
        files["tokenizer"] = ROOT / "babyllama" / "assets" / "tokenizer.bin"
    else:
        files["tokenizer"] = SHARED / "tokenizer.bin"  # llama2.c's 32000-token vocabulary
        if not files["bin"].is_file():
            cfg = SHAPES[shape]
            print(f"writing random {shape} weights...", file=sys.stderr, flush=True)
            write_checkpoint(files["bin"], cfg, Weights.from_dict(cfg, random_weights(cfg, seed=0)), version=0)
    for key, bits in (("q8", 8), ("q4", 4)):
        if not files[key].is_file():
            quantize_file(files["bin"], files[key], bits, None)
    if lcpp_python:  # converts once (--keep); --decode 0 times nothing. Q8_0/Q4_0 need rows of 32s
        types = "f32" if shape == "260K" else "f32,q8_0,q4_0"  # stories260K's hidden 172 is not
        subprocess.run([lcpp_python, str(ROOT / "bench" / "llamacpp_peer.py"), str(files["bin"]), "--keep", str(d),
                        "--types", types, "--decode", "0", "--repeats", "0"], check=True, capture_output=True)
    return files


def babyllama(path: Path, steps: int, prefill: int) -> dict:
    cmd = [sys.executable, "-m", "babyllama", "bench", str(path), "--no-ttft", "--repeats", "2", "--steps", str(steps),
           "--json"] + (["--prefill", str(prefill)] if prefill else [])
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stderr[-1500:]}")
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"decode": row["tok_s"], **({"prefill": row["prefill_tok_s"]} if prefill else {})}


def llama2c(binary: str, files: dict, steps: int, threads: int) -> dict:
    cmd = [binary, str(files["bin"]), "-z", str(files["tokenizer"]), "-t", "0", "-n", str(steps), "-s", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    found = re.search(r"achieved tok/s: ([0-9.]+)", proc.stderr)
    if proc.returncode != 0 or not found:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stderr[-800:]}")
    return {"decode": float(found.group(1))}


def llamacpp(lcpp_python: str, files: dict, qtype: str, steps: int, prefill: int, threads: int) -> dict:
    cmd = [lcpp_python, str(ROOT / "bench" / "llamacpp_peer.py"), str(files["bin"]), "--keep", str(files["gguf"]),
           "--types", qtype, "--decode", str(steps), "--prefill", str(prefill), "--repeats", "2",
           "--threads", str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:  # this machine's llama-cpp-python build has crashed on some types: say so, go on
        return {"error": f"rc {proc.returncode}"}
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"decode": row["decode_tok_s"], **({"prefill": row["prefill_tok_s"]} if prefill else {})}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default=",".join(ORDER), help="comma-separated: " + ", ".join(ORDER))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=256)
    p.add_argument("--prefill", type=int, default=256, help="prompt length for the prefill column (0: none)")
    p.add_argument("--run", action="append", default=[], help="a llama2.c run binary (repeatable; its name labels it)")
    p.add_argument("--lcpp-python", help="the Python of a virtualenv with llama-cpp-python and gguf")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "peers")
    args = p.parse_args()

    shapes = [s for s in args.shapes.split(",") if s]
    files = {s: prepare(args.out, s, args.lcpp_python) for s in shapes}
    contenders = [("babyllama fp32", "bin"), ("babyllama int8", "q8"), ("babyllama int4", "q4")]
    contenders += [(f"llama2.c {Path(b).name}", b) for b in args.run]
    if args.lcpp_python:
        contenders += [(f"llama.cpp {t}", t) for t in ("f32", "q8_0", "q4_0")]
    best: dict = {}
    log = (args.out / "peers.jsonl").open("a")
    for r in range(args.rounds):
        for s in shapes:
            for name, what in contenders:
                # stories260K fits in the caches and runs serially in babyllama: give the peers one thread too
                threads = 1 if s == "260K" else args.threads
                if name.startswith("llama.cpp") and not (files[s]["gguf"] / f"{files[s]['bin'].stem}_{what}.gguf").is_file():
                    continue
                t0 = time.perf_counter()
                if name.startswith("babyllama"):
                    row = babyllama(files[s][what], args.steps, args.prefill)
                elif name.startswith("llama2.c"):
                    row = llama2c(what, files[s], args.steps, threads)
                else:
                    row = llamacpp(args.lcpp_python, files[s], what, args.steps, args.prefill, threads)
                log.write(json.dumps({"round": r, "shape": s, "contender": name, **row}) + "\n")
                log.flush()
                print(f"round {r + 1}/{args.rounds} {s:>5} {name:<22} {row} ({time.perf_counter() - t0:.0f} s, "
                      f"load {os.getloadavg()[0]:.1f})", file=sys.stderr, flush=True)
                for k, v in row.items():
                    if k != "error":
                        best[s, name, k] = max(best.get((s, name, k), 0.0), v)

    def cell(s, name, k):
        v = best.get((s, name, k))
        return f"{v:,.1f}" if v else "-"

    def ratio(s, ours, peers, k):
        theirs = [best[s, n, k] for n in peers if (s, n, k) in best]
        return f"{best[s, ours, k] / max(theirs):.2f}" if theirs and (s, ours, k) in best else "-"

    names = [n for n, _ in contenders]
    print(f"\n### decode tok/s ({args.steps} greedy tokens, best of {args.rounds} rounds)\n")
    print("| shape | " + " | ".join(names) + " | fp32 / fastest fp32 peer | int8 / Q8_0 | int4 / Q4_0 |")
    print("|---" * (len(names) + 4) + "|")
    fp32_peers = [n for n in names if n.startswith("llama2.c") or n == "llama.cpp f32"]
    for s in shapes:
        print(f"| {s} | " + " | ".join(cell(s, n, "decode") for n in names) + " | "
              + " | ".join([ratio(s, "babyllama fp32", fp32_peers, "decode"),
                            ratio(s, "babyllama int8", ["llama.cpp q8_0"], "decode"),
                            ratio(s, "babyllama int4", ["llama.cpp q4_0"], "decode")]) + " |")
    if args.prefill:
        pre = [n for n in names if not n.startswith("llama2.c")]
        print(f"\n### prefill tok/s ({args.prefill}-token prompt in one call, best of {args.rounds} rounds)\n")
        print("| shape | " + " | ".join(pre) + " | fp32 / llama.cpp f32 | int8 / Q8_0 | int4 / Q4_0 |")
        print("|---" * (len(pre) + 4) + "|")
        for s in shapes:
            print(f"| {s} | " + " | ".join(cell(s, n, "prefill") for n in pre) + " | "
                  + " | ".join([ratio(s, "babyllama fp32", ["llama.cpp f32"], "prefill"),
                                ratio(s, "babyllama int8", ["llama.cpp q8_0"], "prefill"),
                                ratio(s, "babyllama int4", ["llama.cpp q4_0"], "prefill")]) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
