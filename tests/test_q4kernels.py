"""The int4 row kernel (engine/q4kernels.py) against a plain dot product: exact, on every path."""

import os
import subprocess
import sys

import numpy as np
import pytest

from babyllama.engine.q4kernels import row_q4
from babyllama.quant import quantize

# (group size, row length): the group-of-64 fast path with 1, 2, 4, 5 and 12 groups (blocks of
# four and leftovers), and the plain loop for other sizes, odd ones included
CASES = [(64, 64), (64, 128), (64, 256), (64, 320), (64, 768), (4, 172), (6, 96), (32, 512), (48, 288), (96, 384)]


def _data(gs, n, rows=5, seed=0):
    """Packed int4 rows, int8 activations and their scales; extreme values included."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((rows, n)).astype(np.float32)
    w[0, :gs] = np.where(np.arange(gs) % 2, 1.0, -1.0)  # every nibble at 1 or 15 (q = -7, 7)
    packed, scales = quantize(w, gs, 4)
    xq = rng.integers(-127, 128, n).astype(np.int8)
    xq[:gs] = 127  # the largest products
    xs = (rng.random(n // gs) + 0.5).astype(np.float32)
    return packed.view(np.int8), scales, xq, xs


def _reference_row(packed, scales, xq, xs, gs, row):
    """float32 sum over groups, in order, of float32(int sum) * w_scale * x_scale."""
    n = xq.shape[0]
    half = gs // 2
    val = np.float32(0)
    for g in range(n // gs):
        b = packed[(row * n + g * gs) // 2 : (row * n + (g + 1) * gs) // 2].view(np.uint8).astype(np.int64)
        q = np.concatenate([(b & 15) - 8, (b >> 4) - 8])  # values j, then j + half
        assert q.shape[0] == 2 * half
        isum = int((q * xq[g * gs : (g + 1) * gs].astype(np.int64)).sum())
        val = np.float32(val + np.float32(np.float32(isum) * scales[row * (n // gs) + g]) * xs[g])
    return val


def _kernel_rows(packed, scales, xq, xs, gs, rows):
    n = xq.shape[0]
    return [row_q4(packed, r * n // 2, xq, 0, xs, 0, scales, r * (n // gs), n, gs) for r in range(rows)]


@pytest.mark.parametrize("gs, n", CASES)
def test_row_q4_equals_plain_dot_product(gs, n):
    packed, scales, xq, xs = _data(gs, n)
    got = _kernel_rows(packed, scales, xq, xs, gs, 5)
    assert got == [_reference_row(packed, scales, xq, xs, gs, r) for r in range(5)]


_PORTABLE = """
import sys, numpy as np
sys.path.insert(0, sys.argv[1])
from test_q4kernels import CASES, _data, _kernel_rows
for gs, n in CASES:
    print(*(np.float32(v).view(np.uint32) for v in _kernel_rows(*_data(gs, n), gs, 5)))
"""


def test_portable_path_gives_the_same_bits(tmp_path):
    """Compiled for a CPU without AVX-512 VNNI, the fast path's plain-IR twin gives the same bits."""
    env = dict(os.environ, NUMBA_CPU_NAME="generic", NUMBA_CPU_FEATURES="", NUMBA_CACHE_DIR=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", _PORTABLE, os.path.dirname(__file__)], env=env,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    here = [" ".join(str(np.float32(v).view(np.uint32)) for v in _kernel_rows(*_data(gs, n), gs, 5))
            for gs, n in CASES]
    assert out.stdout.split("\n")[: len(CASES)] == here
