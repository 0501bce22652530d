"""Many token rows times a quantized matrix: the int8/int4 GEMM, with runq's result in every element.

For one row and one token, runq computes each output as a sequence over groups g of
    val += float32(exact int32 group dot product) * (w_scale * x_scale)     (int8)
    val += (float32(exact int32 group dot product) * w_scale) * x_scale     (int4, qkernels.row_q4)
The integer part is exact in any order; the float part must run group after group. Here the
integer part runs across 16 tokens at once: the activations of a block of 16 tokens are
transposed (`transpose_block`) so that each 32-bit lane of a 64-byte vector holds 4 consecutive
values of one token, and one AVX-512 VNNI instruction (vpdpbusd: 64 unsigned x signed byte
products summed into 16 int32 lanes) advances all 16 tokens' dot products by 4 values, against 4
weight values broadcast to every lane. After a group the 16 lanes are 16 tokens' exact group sums,
with no horizontal reduction; the float part then runs lane-wise, group after group, with the
same roundings as the one-token kernels. So a batch gives each token exactly its decode bits.

vpdpbusd multiplies unsigned by signed bytes:
- int8 (signed weights w, signed activations x): the transposed activations are stored as
  x + 128 (unsigned), so the instruction sums (x + 128) * w; subtracting 128 * sum(w) over the
  group (per weight row and group: `weight_sums`, computed once at load) leaves sum(x * w).
- int4 (v3 stores each value q as the nibble q + 8, unsigned): the nibbles are broadcast as they
  are against the signed activations, and 8 * sum(x) (one more vpdpbusd per step, shared by all
  rows) is subtracted, as qkernels.row_q4 does.
Every partial sum fits int32 (|64 * 255 * 127| < 2**31), so the result is the plain loop's.
Without AVX-512 VNNI the same IR computes vpdpbusd's lanes with plain vector operations.
"""

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from ..simd.jit import JIT
from .q4kernels import _dpbusd

LANES = 16  # tokens per block: the int32 lanes of a 512-bit vector
_I8, _I32, _I64 = ir.IntType(8), ir.IntType(32), ir.IntType(64)
_F32 = ir.FloatType()


def _ptr(context, builder, aryty, ary, index, elemty=None):
    """Pointer to element `index` (an int64 IR value) of a flat array, optionally cast."""
    base = context.make_array(aryty)(context, builder, ary).data
    p = builder.gep(base, [index])
    return p if elemty is None else builder.bitcast(p, elemty.as_pointer())


def _splat(builder, value, vt):
    v = builder.insert_element(ir.Constant(vt, None), value, ir.Constant(_I32, 0))
    return builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, vt.count), [0] * vt.count))


_ARGS = ("out", "oo", "ostride", "count", "data", "wbase", "wstride", "wsum", "wsbase", "scales", "sbase", "xt",
         "xtbase", "xst", "xsbase", "ngroups", "gs")


def _qtile(R: int, bits: int):
    """An intrinsic tile(out, oo, ostride, count, data, wbase, wstride, wsum, wsbase, scales, sbase,
    xt, xtbase, xst, xsbase, ngroups, gs): R consecutive rows of one quantized matrix (row r's
    values at data[wbase + r * wstride], its scales at scales[sbase + r * ngroups], int8 only: its
    group sums at wsum[wsbase + r * ngroups]) times one block of 16 transposed tokens (xt[xtbase:],
    xst[xsbase:]), into out[oo + c * ostride + r] for the block's first `count` tokens c."""

    @intrinsic
    def tile(typingctx, out, oo, ostride, count, data, wbase, wstride, wsum, wsbase, scales, sbase, xt, xtbase,
             xst, xsbase, ngroups, gs):
        def codegen(context, builder, sig, args):
            vnni = all(f in context.codegen().magic_tuple()[2] for f in ("+avx512vnni", "+avx512bw"))
            a, t = dict(zip(_ARGS, args)), dict(zip(_ARGS, sig.args))

            def i64(name):
                return context.cast(builder, a[name], t[name], types.int64)

            def at(name, index, vt=None):
                return _ptr(context, builder, t[name], a[name], index, vt)

            def c64(v):
                return ir.Constant(_I64, v)

            v16i, v64b, v16f = ir.VectorType(_I32, 16), ir.VectorType(_I8, 64), ir.VectorType(_F32, 16)
            oo, ostride, count, wbase, wstride, wsbase, sbase, xtbase, xsbase, ngroups, gs = (
                i64(n) for n in ("oo", "ostride", "count", "wbase", "wstride", "wsbase", "sbase", "xtbase", "xsbase",
                                 "ngroups", "gs"))
            steps = builder.sdiv(gs, c64(4))  # 4 values per vpdpbusd lane
            half = builder.sdiv(gs, c64(2))
            zero_i = ir.Constant(v16i, None)
            vals = [cgutils.alloca_once_value(builder, ir.Constant(v16f, [0.0] * 16)) for _ in range(R)]
            accs = [cgutils.alloca_once(builder, v16i) for _ in range(R)]
            offset = cgutils.alloca_once(builder, v16i)  # int4: 8 * sum(x), the same for every row

            with cgutils.for_range(builder, ngroups) as group:
                g = group.index
                for acc in accs:
                    builder.store(zero_i, acc)
                builder.store(zero_i, offset)
                with cgutils.for_range(builder, steps) as step:
                    k = step.index
                    xv = builder.load(at("xt", builder.add(xtbase, builder.mul(builder.add(builder.mul(g, steps), k),
                                                                                c64(64))), v64b), align=1)
                    j = builder.mul(k, c64(4))  # values j..j+3 of the group
                    if bits == 4:
                        builder.store(_dpbusd(builder, builder.load(offset), ir.Constant(v64b, [8] * 64), xv, vnni),
                                      offset)
                        # the v3 layout: low nibbles of bytes j.. hold values j.. of the first half,
                        # high nibbles of bytes j - gs/2.. those of the second
                        high = builder.icmp_signed(">=", j, half)
                        byte = builder.add(builder.mul(g, half), builder.select(high, builder.sub(j, half), j))
                        shift = builder.select(high, ir.Constant(_I32, 4), ir.Constant(_I32, 0))
                    else:
                        byte = builder.add(builder.mul(g, gs), j)
                    for r in range(R):
                        row = builder.add(wbase, builder.add(builder.mul(c64(r), wstride), byte))
                        w4 = builder.load(at("data", row, _I32), align=1)
                        if bits == 4:  # four nibbles (unsigned) against the signed activations
                            w4 = builder.and_(builder.lshr(w4, shift), ir.Constant(_I32, 0x0F0F0F0F))
                            acc = _dpbusd(builder, builder.load(accs[r]), builder.bitcast(_splat(builder, w4, v16i), v64b),
                                          xv, vnni)
                        else:  # the unsigned activations (x + 128) against four signed weights
                            acc = _dpbusd(builder, builder.load(accs[r]), xv, builder.bitcast(_splat(builder, w4, v16i), v64b),
                                          vnni)
                        builder.store(acc, accs[r])
                x_scale = builder.load(at("xst", builder.add(xsbase, builder.mul(g, c64(16))), v16f), align=4)
                for r in range(R):
                    if bits == 4:
                        isum = builder.sub(builder.load(accs[r]), builder.load(offset))
                    else:  # minus 128 * sum(w) over this row's group
                        wsum = builder.load(at("wsum", builder.add(wsbase, builder.add(builder.mul(c64(r), ngroups), g))))
                        isum = builder.sub(builder.load(accs[r]), _splat(builder, builder.mul(wsum, ir.Constant(_I32, 128)),
                                                                         v16i))
                    w_scale = _splat(builder, builder.load(at("scales", builder.add(sbase, builder.add(
                        builder.mul(c64(r), ngroups), g)))), v16f)
                    f = builder.sitofp(isum, v16f)
                    if bits == 4:
                        prod = builder.fmul(builder.fmul(f, w_scale), x_scale)  # (sum * w_scale) * x_scale
                    else:
                        prod = builder.fmul(f, builder.fmul(w_scale, x_scale))  # sum * (w_scale * x_scale)
                    builder.store(builder.fadd(builder.load(vals[r]), prod), vals[r])
            po = at("out", oo)
            with cgutils.for_range(builder, count) as lane:
                c = lane.index
                for r in range(R):
                    value = builder.extract_element(builder.load(vals[r]), builder.trunc(c, _I32))
                    builder.store(value, builder.gep(po, [builder.add(builder.mul(c, ostride), c64(r))]))
            return context.get_dummy_value()

        return types.void(out, oo, ostride, count, data, wbase, wstride, wsum, wsbase, scales, sbase, xt, xtbase, xst,
                          xsbase, ngroups, gs), codegen

    return tile


ROWS = 8  # weight rows per tile: 8 accumulators + 8 float sums in registers, each activation vector used 8 times
_tile8 = _qtile(ROWS, 8)
_tile8_one = _qtile(1, 8)
_tile4 = _qtile(ROWS, 4)
_tile4_one = _qtile(1, 4)


def weight_sums(data: np.ndarray, offsets: np.ndarray, rows: int, cols: int, gs: int) -> np.ndarray:
    """(n_matrices * rows * groups,) int32: every int8 group's sum of weights (the correction the
    unsigned activations need), computed once when an int8 model is loaded."""
    out = np.empty((len(offsets), rows, cols // gs), np.int32)
    for m, o in enumerate(offsets):
        w = data[int(o) : int(o) + rows * cols].reshape(rows, cols // gs, gs)
        out[m] = w.sum(axis=2, dtype=np.int32)
    return out.reshape(-1)


@njit(**JIT)
def transpose_block(xt, xst, xq, xq_row, xs, xs_row, T, n, gs, bits):
    """Lay the quantized activations of rows t < T (values at xq[t * xq_row:], scales at
    xs[t * xs_row:], n values) out for the tiles: block b = t // 16, lane t % 16; each 64-byte
    vector holds 4 consecutive values of 16 tokens (int8: stored + 128, unsigned), then per group
    16 scales. Lanes past T are zero tokens (their results are never stored)."""
    ngroups, steps = n // gs, gs // 4
    blocks = (T + LANES - 1) // LANES
    zero = np.int8(-128) if bits == 8 else np.int8(0)  # the stored form of 0
    for b in range(blocks):
        for g in range(ngroups):
            base = (b * ngroups + g) * steps * 64
            for lane in range(LANES):
                t = b * LANES + lane
                xst[(b * ngroups + g) * LANES + lane] = xs[t * xs_row + g] if t < T else np.float32(0.0)
                for k in range(steps):
                    for j in range(4):
                        if t < T:
                            v = xq[t * xq_row + g * gs + 4 * k + j]
                            xt[base + k * 64 + lane * 4 + j] = np.int8(v ^ np.int8(-128)) if bits == 8 else v
                        else:
                            xt[base + k * 64 + lane * 4 + j] = zero


@njit(parallel=True, **JIT)
def qgemm(out, T, data, offsets, scales, wsum, l, xt, xst, n, gs, bits, parallel):
    """out[:T] (T, rows) = the rows' activations (transposed: xt, xst) times quantized matrix l of one
    kind (data, offsets, scales flat; int8: wsum from weight_sums), each element runq's result."""
    rows = out.shape[1]
    ngroups = n // gs
    wstride = n if bits == 8 else n // 2
    base, sbase = offsets[l], l * rows * ngroups
    blocks = (T + LANES - 1) // LANES
    tiles = rows // ROWS
    steps64 = ngroups * (gs // 4) * 64
    if parallel:
        for u in prange(tiles * blocks):
            _qgemm_unit(out, T, data, base, wstride, scales, sbase, wsum, xt, xst, ngroups, gs, bits, u // blocks,
                        u % blocks, steps64)
    else:
        for u in range(tiles * blocks):
            _qgemm_unit(out, T, data, base, wstride, scales, sbase, wsum, xt, xst, ngroups, gs, bits, u // blocks,
                        u % blocks, steps64)
    for r in range(tiles * ROWS, rows):  # the rows after the last whole tile, one by one
        for b in range(blocks):
            count = min(LANES, T - b * LANES)
            args = (out, b * LANES * rows + r, rows, count, data, base + r * wstride, wstride, wsum,
                    (l * rows + r) * ngroups, scales, sbase + r * ngroups, xt, b * steps64, xst, b * ngroups * LANES,
                    ngroups, gs)
            if bits == 8:
                _tile8_one(*args)
            else:
                _tile4_one(*args)


@njit(inline="always", **JIT)
def _qgemm_unit(out, T, data, base, wstride, scales, sbase, wsum, xt, xst, ngroups, gs, bits, tile, b, steps64):
    rows = out.shape[1]
    r0 = tile * ROWS
    count = min(LANES, T - b * LANES)
    wsbase = (sbase // ngroups + r0) * ngroups  # wsum is laid out like the scales
    if bits == 8:
        _tile8(out, b * LANES * rows + r0, rows, count, data, base + r0 * wstride, wstride, wsum, wsbase, scales,
               sbase + r0 * ngroups, xt, b * steps64, xst, b * ngroups * LANES, ngroups, gs)
    else:
        _tile4(out, b * LANES * rows + r0, rows, count, data, base + r0 * wstride, wstride, wsum, wsbase, scales,
               sbase + r0 * ngroups, xt, b * steps64, xst, b * ngroups * LANES, ngroups, gs)
