"""`babyllama quantize`: write an int8 (llama2.c v2, "Q8_0") or int4 (babyllama v3) copy of an fp32 model.

    babyllama quantize stories15M.bin stories15M_q80.bin              # int8, group size chosen
    babyllama quantize model.bin model_q4.bin --bits 4 --group-size 32

The input is any fp32 llama2.c file (v0 or v1), a Hugging Face folder (F32/F16/BF16) or a GGUF
file (a Q8_0 / Q4_0 one becomes v2 / v3 with its own integers and scales, group size 32). The
group size defaults to the largest size <= 64 that divides dim and hidden_dim (and is even, for
int4); see quant.py for the formats.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from ..convert import quantize_file
from ..formats.llama2c import load_checkpoint
from ..quant import BITS_VERSION
from . import OneLineParser


def main(argv: list[str] | None = None) -> int:
    """`babyllama quantize INPUT OUTPUT ...`; raises BabyLlamaError on bad input."""
    p = OneLineParser(prog="babyllama quantize", description=__doc__.split("\n\n")[0])
    p.add_argument("input", type=Path, help="fp32 model .bin (v0 or v1), Hugging Face folder or GGUF file")
    p.add_argument("output", type=Path, help="quantized model to write")
    p.add_argument("--bits", type=int, choices=[8, 4], default=8, help="8 = llama2.c v2 (default), 4 = babyllama v3")
    p.add_argument("--group-size", type=int, default=None,
                   help="weights per scale; must divide dim and hidden_dim (default: the largest <= 64)")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    gs = quantize_file(args.input, args.output, args.bits, args.group_size)
    size_in = sum(f.stat().st_size for f in args.input.iterdir()) if args.input.is_dir() else args.input.stat().st_size
    size_out = args.output.stat().st_size
    print(f"wrote {args.output} (v{BITS_VERSION[args.bits]}, int{args.bits}, group size {gs}): "
          f"{size_out / 1e6:.1f} MB from {size_in / 1e6:.1f} MB in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    note = wont_pay(load_checkpoint(args.output).config)
    if note:
        print(f"babyllama: note: {note}", file=sys.stderr)
    return 0


# Below this many bytes of fp32 weights a model stays in the CPU caches, where decode is not
# bound by memory and the quantized kernels' extra work (quantizing every activation vector,
# scales per group) costs more than the bytes they save. Measured on a 2-core AMD EPYC (README,
# Benchmarks): stories260K (1 MB) int8 16,000 tok/s against fp32's 28,400; the 15M shape (61 MB)
# int8 1.5x fp32.
CACHE_RESIDENT_BYTES = 8 << 20


def wont_pay(cfg) -> str | None:
    """A one-line reason when quantizing this model is unlikely to make decoding faster."""
    fp32 = 4 * cfg.n_params
    if fp32 >= CACHE_RESIDENT_BYTES:
        return None
    return (f"this model's fp32 weights ({fp32 / 1e6:.1f} MB) fit in the CPU caches, where int8/int4 decode "
            "runs slower than fp32 (stories260K: 0.56x); quantizing pays on models whose weights stream from "
            "memory (from the 15M shape on: 1.5-3.3x)")
