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

vpdpbusd multiplies unsigned by signed bytes, so the weights are made unsigned as they are
broadcast, as in qrows.py: int8 w + 128 (an XOR), int4 the nibbles q + 8 as stored, and 128 * sum(x)
or 8 * sum(x) over the group (qkernels.quantize_activations' group sums, transposed with the
activations) is taken off. Every partial sum fits int32, so the result is the plain loop's.
Without AVX-512 VNNI the same IR computes vpdpbusd's lanes with plain vector operations.
"""

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from ..simd.jit import JIT
from .qrows import dpbusd, has_vnni

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


_ARGS = ("out", "oo", "ostride", "count", "data", "wbase", "wstride", "scales", "sbase", "xt", "xtbase", "xst",
         "xsumt", "xsbase", "ngroups", "gs")


def _qtile(R: int, bits: int):
    """An intrinsic tile(out, oo, ostride, count, data, wbase, wstride, scales, sbase, xt, xtbase,
    xst, xsumt, xsbase, ngroups, gs): R consecutive rows of one quantized matrix (row r's values at
    data[wbase + r * wstride], its scales at scales[sbase + r * ngroups]) times one block of 16
    transposed tokens (values xt[xtbase:], scales xst[xsbase:], group sums xsumt[xsbase:]), into
    out[oo + c * ostride + r] for the block's first `count` tokens c."""

    @intrinsic
    def tile(typingctx, out, oo, ostride, count, data, wbase, wstride, scales, sbase, xt, xtbase, xst, xsumt,
             xsbase, ngroups, gs):
        def codegen(context, builder, sig, args):
            vnni = has_vnni(context)
            a, t = dict(zip(_ARGS, args)), dict(zip(_ARGS, sig.args))

            def i64(name):
                return context.cast(builder, a[name], t[name], types.int64)

            def at(name, index, vt=None):
                return _ptr(context, builder, t[name], a[name], index, vt)

            def c64(v):
                return ir.Constant(_I64, v)

            v16i, v64b, v16f = ir.VectorType(_I32, 16), ir.VectorType(_I8, 64), ir.VectorType(_F32, 16)
            oo, ostride, count, wbase, wstride, sbase, xtbase, xsbase, ngroups, gs = (
                i64(n) for n in ("oo", "ostride", "count", "wbase", "wstride", "sbase", "xtbase", "xsbase", "ngroups",
                                 "gs"))
            steps = builder.sdiv(gs, c64(4))  # 4 values per vpdpbusd lane
            half = builder.sdiv(gs, c64(2))
            zero_i = ir.Constant(v16i, None)
            vals = [cgutils.alloca_once_value(builder, ir.Constant(v16f, [0.0] * 16)) for _ in range(R)]
            accs = [cgutils.alloca_once(builder, v16i) for _ in range(R)]

            with cgutils.for_range(builder, ngroups) as group:
                g = group.index
                for acc in accs:
                    builder.store(zero_i, acc)
                with cgutils.for_range(builder, steps) as step:
                    k = step.index
                    xv = builder.load(at("xt", builder.add(xtbase, builder.mul(builder.add(builder.mul(g, steps), k),
                                                                                c64(64))), v64b), align=1)
                    j = builder.mul(k, c64(4))  # values j..j+3 of the group
                    if bits == 4:
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
                        if bits == 4:  # four nibbles q + 8, unsigned as stored
                            w4 = builder.and_(builder.lshr(w4, shift), ir.Constant(_I32, 0x0F0F0F0F))
                        else:  # four weights + 128
                            w4 = builder.xor(w4, ir.Constant(_I32, 0x80808080))
                        u = builder.bitcast(_splat(builder, w4, v16i), v64b)
                        builder.store(dpbusd(builder, builder.load(accs[r]), u, xv, vnni), accs[r])
                at_g = builder.add(xsbase, builder.mul(g, c64(16)))
                x_scale = builder.load(at("xst", at_g, v16f), align=4)
                shift_sum = builder.mul(builder.load(at("xsumt", at_g, v16i), align=4),  # what the shift added
                                        ir.Constant(v16i, [128 if bits == 8 else 8] * 16))
                for r in range(R):
                    isum = builder.sub(builder.load(accs[r]), shift_sum)
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

        return types.void(out, oo, ostride, count, data, wbase, wstride, scales, sbase, xt, xtbase, xst, xsumt, xsbase,
                          ngroups, gs), codegen

    return tile


ROWS = 8  # weight rows per tile: 8 accumulators + 8 float sums in registers, each activation vector used 8 times
_tile8 = _qtile(ROWS, 8)
_tile8_one = _qtile(1, 8)
_tile4 = _qtile(ROWS, 4)
_tile4_one = _qtile(1, 4)


@njit(**JIT)
def transpose_block(xt, xst, xsumt, xq, xq_row, xs, xsum, xs_row, T, n, gs):
    """Lay the quantized activations of rows t < T (values at xq[t * xq_row:], scales and group sums
    at xs / xsum[t * xs_row:], n values) out for the tiles: block b = t // 16, lane t % 16; each
    64-byte vector holds 4 consecutive values of 16 tokens, then per group 16 scales and 16 sums.
    Lanes past T are zero tokens (their results are never stored)."""
    ngroups, steps = n // gs, gs // 4
    blocks = (T + LANES - 1) // LANES
    for b in range(blocks):
        for g in range(ngroups):
            base = (b * ngroups + g) * steps * 64
            for lane in range(LANES):
                t = b * LANES + lane
                at = (b * ngroups + g) * LANES + lane
                xst[at] = xs[t * xs_row + g] if t < T else np.float32(0.0)
                xsumt[at] = xsum[t * xs_row + g] if t < T else np.int32(0)
                for k in range(steps):
                    for j in range(4):
                        xt[base + k * 64 + lane * 4 + j] = xq[t * xq_row + g * gs + 4 * k + j] if t < T else np.int8(0)


@njit(parallel=True, **JIT)
def qgemm(out, T, data, offsets, scales, l, xt, xst, xsumt, n, gs, bits, parallel):
    """out[:T] (T, rows) = the rows' activations (transposed: xt, xst, xsumt) times quantized matrix l
    of one kind (data, offsets, scales flat), each element runq's result."""
    rows = out.shape[1]
    ngroups = n // gs
    wstride = n if bits == 8 else n // 2
    base, sbase = offsets[l], l * rows * ngroups
    blocks = (T + LANES - 1) // LANES
    tiles = rows // ROWS
    block_bytes = ngroups * (gs // 4) * 64
    if parallel:
        for u in prange(tiles * blocks):
            _qgemm_unit(out, T, data, base, wstride, scales, sbase, xt, xst, xsumt, ngroups, gs, bits, u // blocks,
                        u % blocks, block_bytes)
    else:
        for u in range(tiles * blocks):
            _qgemm_unit(out, T, data, base, wstride, scales, sbase, xt, xst, xsumt, ngroups, gs, bits, u // blocks,
                        u % blocks, block_bytes)
    for r in range(tiles * ROWS, rows):  # the rows after the last whole tile, one by one
        for b in range(blocks):
            _qgemm_row(out, T, data, base, wstride, scales, sbase, xt, xst, xsumt, ngroups, gs, bits, r, b, block_bytes)


@njit(**JIT)
def _qgemm_row(out, T, data, base, wstride, scales, sbase, xt, xst, xsumt, ngroups, gs, bits, r, b, block_bytes):
    rows = out.shape[1]
    count = min(LANES, T - b * LANES)
    args = (out, b * LANES * rows + r, rows, count, data, base + r * wstride, wstride, scales, sbase + r * ngroups, xt,
            b * block_bytes, xst, xsumt, b * ngroups * LANES, ngroups, gs)
    if bits == 8:
        _tile8_one(*args)
    else:
        _tile4_one(*args)


@njit(**JIT)
def _qgemm_unit(out, T, data, base, wstride, scales, sbase, xt, xst, xsumt, ngroups, gs, bits, tile, b, block_bytes):
    rows = out.shape[1]
    r0 = tile * ROWS
    count = min(LANES, T - b * LANES)
    args = (out, b * LANES * rows + r0, rows, count, data, base + r0 * wstride, wstride, scales, sbase + r0 * ngroups,
            xt, b * block_bytes, xst, xsumt, b * ngroups * LANES, ngroups, gs)
    if bits == 8:
        _tile8(*args)
    else:
        _tile4(*args)
