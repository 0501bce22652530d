"""Bit-exact parity with llama2.c: teacher-forced logits of babyllama next to run.c / runq.c's.

llama2.c's run.c and runq.c, patched only to read a token file and write every position's logits
(a `main` that calls their own build_transformer and forward), built with gcc -Ofast
-march=native. On an AMD Zen 4 machine that is llama2.c's recommended build; on Intel, add
-mtune=znver3 so gcc emits the same 16-lane code shapes (gcc tunes Intel AVX-512 targets to 256-bit
vectors, and babyllama reproduces the 512-bit build). bench-only: the binaries are not part of
babyllama and nothing here runs in CI.

    python bench/parity.py --run /tmp/llama2c/run_logits --runq /tmp/llama2c/runq_logits

For every model below it compares, bit for bit, the C logits with babyllama's token-by-token
decode and with one prefill block of all positions (the batched kernels), and prints a line each.
"""

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from babyllama.arch.llama import Weights  # noqa: E402
from babyllama.config import ModelConfig  # noqa: E402
from babyllama.engine import Engine  # noqa: E402
from babyllama.formats.llama2c import load_checkpoint, write_checkpoint, write_quantized_checkpoint  # noqa: E402
from babyllama.testing import SHAPES, random_weights  # noqa: E402

ODD = {  # head size 6, GQA, remainders past 8 and 16, untied classifiers
    "dim36-hs6-gqa": ModelConfig(dim=36, hidden_dim=100, n_layers=2, n_heads=6, n_kv_heads=3, vocab_size=61, seq_len=64),
    "dim60-untied": ModelConfig(dim=60, hidden_dim=84, n_layers=2, n_heads=5, n_kv_heads=5, vocab_size=75, seq_len=64,
                                shared_classifier=False),
    "dim96-mqa-untied": ModelConfig(dim=96, hidden_dim=256, n_layers=2, n_heads=8, n_kv_heads=1, vocab_size=300,
                                    seq_len=64, shared_classifier=False),
}


def c_logits(binary: str, model: Path, tokens: np.ndarray, vocab: int, tmp: Path) -> np.ndarray:
    tok_file, out = tmp / "tokens.i32", tmp / "logits.f32"
    tokens.astype("<i4").tofile(tok_file)
    subprocess.run([binary, str(model), str(tok_file), str(out)], check=True)
    return np.fromfile(out, "<f4").reshape(len(tokens), vocab)


def ours(model: Path, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    engine = Engine.from_checkpoint(load_checkpoint(model))
    state = engine.new_state()
    steps = np.stack([engine.step(int(t), i, state).copy() for i, t in enumerate(tokens)])
    return steps, engine.logits(tokens)


def same(a: np.ndarray, b: np.ndarray) -> str:
    diff = a.view(np.int32) != b.view(np.int32)
    return "identical" if not diff.any() else f"DIFFERENT at {int(diff.any(1).argmax())} (max |d| {np.abs(a - b).max():.3g})"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="run.c built to print teacher-forced logits")
    p.add_argument("--runq", help="runq.c likewise")
    p.add_argument("--shared", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    p.add_argument("--positions", type=int, default=48)
    args = p.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        models = []
        if (args.shared / "stories260K.bin").exists():
            models.append(("stories260K", args.shared / "stories260K.bin"))
        for name, cfg in [*((f"{k} shape", v) for k, v in SHAPES.items()), *ODD.items()]:
            path = tmp / f"{name.replace(' ', '_')}.bin"
            write_checkpoint(path, cfg, Weights.from_dict(cfg, random_weights(cfg, seed=len(models))))
            models.append((name, path))
        for name, path in models:
            cfg = load_checkpoint(path).config
            tokens = rng.integers(0, cfg.vocab_size, min(args.positions, cfg.seq_len))
            want = c_logits(args.run, path, tokens, cfg.vocab_size, tmp)
            steps, block = ours(path, tokens)
            print(f"fp32 {name}: decode {same(steps, want)}, prefill block {same(block, want)}", flush=True)
            if args.runq:
                gs = next(g for g in (64, 32, 16, 8, 4, 2) if cfg.dim % g == 0 and cfg.hidden_dim % g == 0)
                q = tmp / f"{path.stem}_q8.bin"
                write_quantized_checkpoint(q, cfg, load_checkpoint(path).weights, 2, gs)
                want = c_logits(args.runq, q, tokens, cfg.vocab_size, tmp)
                steps, block = ours(q, tokens)
                print(f"int8 gs{gs} {name}: decode {same(steps, want)}, prefill block {same(block, want)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
