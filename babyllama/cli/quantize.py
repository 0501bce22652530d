"""`babyllama quantize`: write an int8 (llama2.c v2, "Q8_0") or int4 (babyllama v3) copy of an fp32 model.

    babyllama quantize stories15M.bin stories15M_q80.bin              # int8, group size chosen
    babyllama quantize model.bin model_q4.bin --bits 4 --group-size 32

The input is any fp32 llama2.c file (v0 or v1). The group size defaults to the largest size
<= 64 that divides dim and hidden_dim (and is even, for int4); see quant.py for the formats.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .checkpoint import load_checkpoint, write_quantized_checkpoint
from .errors import CheckpointError
from .quant import BITS_VERSION, DEFAULT_MAX_GROUP_SIZE, choose_group_size


def default_group_size(cfg, bits: int) -> int:
    """The group size `quantize` and `export --version 2/3` use when none is given.

    64 for both widths: the int4 kernel is fastest at 64 (see engine/qkernels.py); pass
    --group-size 32 for a little more int4 quality at a little more size.
    """
    return choose_group_size(cfg, bits, DEFAULT_MAX_GROUP_SIZE)


def quantize_file(src, dst, bits: int = 8, group_size: int | None = None) -> int:
    """Quantize the fp32 model at src into dst (v2 for 8 bits, v3 for 4); return the group size."""
    src, dst = Path(src), Path(dst)
    ck = load_checkpoint(src)
    if ck.version not in (0, 1):
        raise CheckpointError(
            f"{src}: is already a quantized v{ck.version} model; quantize from the fp32 (v0/v1) original"
        )
    if src.resolve() == dst.resolve():
        raise CheckpointError(f"{dst}: output would overwrite the input model")
    gs = default_group_size(ck.config, bits) if group_size is None else group_size
    return write_quantized_checkpoint(dst, ck.config, ck.weights, BITS_VERSION[bits], gs)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="babyllama quantize", description=__doc__.split("\n\n")[0])
    p.add_argument("input", type=Path, help="fp32 model .bin (v0 or v1)")
    p.add_argument("output", type=Path, help="quantized model to write")
    p.add_argument("--bits", type=int, choices=[8, 4], default=8, help="8 = llama2.c v2 (default), 4 = babyllama v3")
    p.add_argument("--group-size", type=int, default=None,
                   help="weights per scale; must divide dim and hidden_dim (default: the largest <= 64)")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    gs = quantize_file(args.input, args.output, args.bits, args.group_size)
    size_in, size_out = args.input.stat().st_size, args.output.stat().st_size
    print(f"wrote {args.output} (v{BITS_VERSION[args.bits]}, int{args.bits}, group size {gs}): "
          f"{size_out / 1e6:.1f} MB from {size_in / 1e6:.1f} MB in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
