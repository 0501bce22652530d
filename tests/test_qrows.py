"""The quantized row kernels (engine/qrows.py, through qkernels.qrows_range as the matmuls call
them) against a plain dot product: exact, int8 and int4, on every path (VNNI groups of 32 and 64
four at a time, of 4-16 64 values at a time, their leftovers, the plain loop of other sizes)."""

import os
import subprocess
import sys

import numpy as np
import pytest

from babyllama.engine.qkernels import qrows_range
from babyllama.quant import quantize

# (group size, row length): the fast paths (64, 32: four groups a step; 16, 8, 4: 64 values a step)
# with whole steps and leftovers, and the plain loop for other sizes, odd ones included
CASES = [(64, 64), (64, 128), (64, 256), (64, 320), (64, 768), (32, 288), (32, 512), (32, 96), (16, 64), (16, 80),
         (8, 64), (8, 200), (4, 64), (4, 172), (6, 96), (48, 288), (96, 384)]


def _data(gs, n, bits, rows=5, seed=0):
    """Quantized rows, int8 activations, their scales and group sums; extreme values included."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((rows, n)).astype(np.float32)
    w[0, :gs] = np.where(np.arange(gs) % 2, 1.0, -1.0)  # every value at +-max (q = +-127 or +-7)
    values, scales = quantize(w, gs, bits)
    xq = rng.integers(-127, 128, n).astype(np.int8)
    xq[:gs] = 127  # the largest products
    xs = (rng.random(n // gs) + 0.5).astype(np.float32)
    xsum = xq.astype(np.int32).reshape(-1, gs).sum(axis=1).astype(np.int32)
    return values.view(np.int8), scales, xq, xs, xsum


def _reference_row(values, scales, xq, xs, gs, bits, row):
    """float32 sum over groups, in order, of float32(int sum) times the scales, in runq's order."""
    n = xq.shape[0]
    val = np.float32(0)
    for g in range(n // gs):
        if bits == 8:
            q = values[row * n + g * gs : row * n + (g + 1) * gs].astype(np.int64)
        else:
            b = values[(row * n + g * gs) // 2 : (row * n + (g + 1) * gs) // 2].view(np.uint8).astype(np.int64)
            q = np.concatenate([(b & 15) - 8, (b >> 4) - 8])  # values j, then j + half
        isum = np.float32(int((q * xq[g * gs : (g + 1) * gs].astype(np.int64)).sum()))
        ws = scales[row * (n // gs) + g]
        prod = isum * (ws * xs[g]) if bits == 8 else np.float32(isum * ws) * xs[g]
        val = np.float32(val + prod)
    return val


def _kernel_rows(values, scales, xq, xs, xsum, gs, bits, rows):
    n = xq.shape[0]
    out = np.zeros((1, rows), np.float32)
    qrows_range(out, 0, (values, np.zeros(1, np.int64), scales), 0, 0, rows, xq, 0, xs, 0, xsum, n, gs, bits)
    return list(out[0])


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("gs, n", CASES)
def test_row_equals_plain_dot_product(gs, n, bits):
    if bits == 4 and gs % 2:
        pytest.skip("int4 groups are whole bytes: even sizes only")
    values, scales, xq, xs, xsum = _data(gs, n, bits)
    got = _kernel_rows(values, scales, xq, xs, xsum, gs, bits, 5)
    assert got == [_reference_row(values, scales, xq, xs, gs, bits, r) for r in range(5)]


_PORTABLE = """
import sys, numpy as np
sys.path.insert(0, sys.argv[1])
from test_qrows import CASES, _data, _kernel_rows
for gs, n in CASES:
    for bits in (8, 4):
        if bits == 8 or gs % 2 == 0:
            print(*(np.float32(v).view(np.uint32) for v in _kernel_rows(*_data(gs, n, bits), gs, bits, 5)))
"""


def test_portable_path_gives_the_same_bits(tmp_path):
    """Compiled for a CPU without AVX-512 VNNI, the fast path's plain-IR twin gives the same bits."""
    env = dict(os.environ, NUMBA_CPU_NAME="generic", NUMBA_CPU_FEATURES="", NUMBA_CACHE_DIR=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", _PORTABLE, os.path.dirname(__file__)], env=env,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    here = [" ".join(str(np.float32(v).view(np.uint32)) for v in _kernel_rows(*_data(gs, n, bits), gs, bits, 5))
            for gs, n in CASES for bits in (8, 4) if bits == 8 or gs % 2 == 0]
    assert out.stdout.split("\n")[: len(here)] == here
