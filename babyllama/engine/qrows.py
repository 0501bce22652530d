"""One output of an int8 or int4 matmul: exact int32 group sums, four groups at a time, with VNNI.

runq computes each output as val += float32(exact int32 group dot product) * scales, group after
group (qkernels.py has the float order). The integer part is exact in any order, and here it is
one AVX-512 VNNI instruction per group: vpdpbusd sums 4 unsigned x signed byte products into each
32-bit lane (64 products per 512-bit instruction, 32 per 256-bit one, for groups of 64 and 32).
The activations stay signed (runq's int8 values); the weights are made unsigned on the way in:
- int8: w + 128 (an XOR of the sign bit), so the lanes sum (w + 128) * x, and 128 * sum(x) over
  the group (xsum, computed once per activation vector by qkernels.quantize_activations) is taken
  off again;
- int4: the stored nibbles are already q + 8 (0..15), so the lanes sum (q + 8) * x and 8 * sum(x)
  comes off (the v3 layout makes a group's low nibbles then its high nibbles its values in order:
  a load, a mask, a shift and a concatenation give the operand).
Every partial sum is exact (|255 * 127 * 64| < 2**31), so the result is the plain loop's int32.
Groups of 32 and 64 go four at a time, their lanes reduced together (shuffles inside 128-bit
quarters, then halvings: ~13 instructions for four horizontal sums); groups of 4, 8 and 16 go 64
values at a time (a lane is a quarter, half or all of a group: 0-2 pairwise additions). Their scale
products are vector multiplies, and the products are added to the row's sum in group order, as
runq does. Other group sizes, and the groups left over, take a plain loop (`_group`) with the same
arithmetic.

Without AVX-512 VNNI (the features Numba compiles for decide), the same IR computes vpdpbusd's
lanes with plain vector multiplies and adds, which LLVM lowers for any CPU.
"""

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from ..simd.jit import JIT
from ..simd.ofast import _shuffle

_I8, _I32, _I64 = ir.IntType(8), ir.IntType(32), ir.IntType(64)


def _add_shuffles(builder, a, b, first, second):
    return builder.add(_shuffle(builder, a, b, first), _shuffle(builder, a, b, second))


def dpbusd(builder, acc, u, s, vnni):
    """acc (N x i32) + vpdpbusd(u, s): lane i adds u[4i+j] * s[4i+j], j < 4 (u unsigned, s signed)."""
    lanes = acc.type.count
    if vnni:
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(acc.type, [acc.type, u.type, s.type]),
                                            f"llvm.x86.avx512.vpdpbusd.{32 * lanes}")
        return builder.call(fn, [acc, u, s])
    wide = ir.VectorType(_I32, 4 * lanes)
    p = builder.mul(builder.zext(u, wide), builder.sext(s, wide))
    for j in range(4):
        acc = builder.add(acc, _shuffle(builder, p, p, [4 * i + j for i in range(lanes)]))
    return acc


def sum4(builder, sums):
    """The totals of four int32 vectors of 8 or 16 lanes as one 4-lane vector: unpack-and-add
    inside each 128-bit quarter (cheap shuffles), then add the quarters."""
    lanes = sums[0].type.count
    quarters = lanes // 4

    def q(offsets):  # the same positions in each quarter; a's lanes < `lanes` <= b's lanes
        return [4 * c + (o if o < 16 else o - 16 + lanes) for c in range(quarters) for o in offsets]

    ab = _add_shuffles(builder, sums[0], sums[1], q([0, 16, 1, 17]), q([2, 18, 3, 19]))
    cd = _add_shuffles(builder, sums[2], sums[3], q([0, 16, 1, 17]), q([2, 18, 3, 19]))
    r = _add_shuffles(builder, ab, cd, q([0, 1, 16, 17]), q([2, 3, 18, 19]))  # each quarter: a b c d
    while r.type.count > 4:
        half = r.type.count // 2
        r = _add_shuffles(builder, r, r, range(half), range(half, 2 * half))
    return r


def splat(builder, value, vt):
    v = builder.insert_element(ir.Constant(vt, None), value, ir.Constant(_I32, 0))
    return builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, vt.count), [0] * vt.count))


def has_vnni(context) -> bool:
    return all(f in context.codegen().magic_tuple()[2] for f in ("+avx512vnni", "+avx512bw", "+avx512vl"))


def unsigned_weights(builder, ptr, count, gs, bits):
    """`count` consecutive weights of a row (at byte pointer ptr), groups of gs, as unsigned bytes:
    int8 w + 128; int4 the nibbles (the v3 layout: group i's bytes hold its values j in the low
    nibbles and j + gs/2 in the high ones)."""
    if bits == 8:
        w = builder.load(builder.bitcast(ptr, ir.VectorType(_I8, count).as_pointer()), align=1)
        return builder.xor(w, ir.Constant(w.type, [0x80] * count))
    half = ir.VectorType(_I8, count // 2)
    b = builder.load(builder.bitcast(ptr, half.as_pointer()), align=1)
    lo = builder.and_(b, ir.Constant(half, [15] * (count // 2)))
    hi = builder.lshr(b, ir.Constant(half, [4] * (count // 2)))
    mask = []
    for p in range(count):  # value p: group p // gs, index j in it
        i, j = divmod(p, gs)
        mask.append(i * gs // 2 + j if j < gs // 2 else count // 2 + i * gs // 2 + j - gs // 2)
    return _shuffle(builder, lo, hi, mask)


def _accumulate(builder, val, total, ws, xsc, bits):
    """val + the groups' products in group order: float32(sum) * (w_scale * x_scale) for int8,
    (float32(sum) * w_scale) * x_scale for int4, lane by lane (runq's roundings)."""
    vf = ir.VectorType(ir.FloatType(), total.type.count)
    f = builder.sitofp(total, vf)
    prod = builder.fmul(builder.fmul(f, ws), xsc) if bits == 4 else builder.fmul(f, builder.fmul(ws, xsc))
    for i in range(total.type.count):
        val = builder.fadd(val, builder.extract_element(prod, ir.Constant(_I32, i)))
    return val


def _group_sums_within(builder, lanes, per_group):
    """Each group's total from an int32 vector whose consecutive `per_group` lanes are one group."""
    while per_group > 1:
        n = lanes.type.count
        lanes = _add_shuffles(builder, lanes, lanes, range(0, n, 2), range(1, n, 2))
        per_group //= 2
    return lanes


def _groups_step(gs: int, bits: int):
    """An intrinsic (val, data, wbase, xq, xbase, scales, sbase, xs, xsbase, xsum) -> float32: val
    plus the products of the next groups of one row, in order: four groups of gs (32, 64), or the
    64 // gs groups of 64 values (gs 4, 8, 16). The row's bytes come from data[wbase], its scales
    from scales[sbase]; the activations from xq[xbase], xs / xsum[xsbase]."""
    offset = 128 if bits == 8 else 8  # the unsigned shift of the weights
    big = gs >= 32
    count = gs if big else 64  # values per vpdpbusd
    groups = 4 if big else 64 // gs

    @intrinsic
    def step(typingctx, val, data, wbase, xq, xbase, scales, sbase, xs, xsbase, xsum):
        def codegen(context, builder, sig, args):
            vnni = has_vnni(context)

            def at(k, index):
                base = context.make_array(sig.args[k])(context, builder, args[k]).data
                return builder.gep(base, [index])

            def i64(k, plus=0):
                return builder.add(context.cast(builder, args[k], sig.args[k], types.int64), ir.Constant(_I64, plus))

            wbytes = count if bits == 8 else count // 2
            sums = []
            for k in range(4 if big else 1):
                u = unsigned_weights(builder, at(1, i64(2, wbytes * k)), count, gs, bits)
                x = builder.load(builder.bitcast(at(3, i64(4, count * k)), ir.VectorType(_I8, count).as_pointer()),
                                 align=1)
                sums.append(dpbusd(builder, ir.Constant(ir.VectorType(_I32, count // 4), None), u, x, vnni))
            total = sum4(builder, sums) if big else _group_sums_within(builder, sums[0], gs // 4)
            vi, vf = ir.VectorType(_I32, groups), ir.VectorType(ir.FloatType(), groups)
            xsum_g = builder.load(builder.bitcast(at(9, i64(8)), vi.as_pointer()), align=4)
            total = builder.sub(total, builder.mul(xsum_g, ir.Constant(vi, [offset] * groups)))
            ws = builder.load(builder.bitcast(at(5, i64(6)), vf.as_pointer()), align=4)
            xsc = builder.load(builder.bitcast(at(7, i64(8)), vf.as_pointer()), align=4)
            return _accumulate(builder, args[0], total, ws, xsc, bits)

        return types.float32(types.float32, data, wbase, xq, xbase, scales, sbase, xs, xsbase, xsum), codegen

    return step


_STEPS = {(gs, bits): _groups_step(gs, bits) for gs in (4, 8, 16, 32, 64) for bits in (8, 4)}


def _one_group_step(gs: int, bits: int):
    """The same intrinsic for one group of 32 or 64 (the groups a row has left over after its
    steps of four: a 288-wide row of groups of 32 has one). One vpdpbusd and a horizontal sum,
    against ~gs scalar multiply-adds for the plain loop."""
    offset = 128 if bits == 8 else 8

    @intrinsic
    def step(typingctx, val, data, wbase, xq, xbase, scales, sbase, xs, xsbase, xsum):
        def codegen(context, builder, sig, args):
            def at(k, index):
                base = context.make_array(sig.args[k])(context, builder, args[k]).data
                return builder.gep(base, [index])

            def i64(k):
                return context.cast(builder, args[k], sig.args[k], types.int64)

            u = unsigned_weights(builder, at(1, i64(2)), gs, gs, bits)
            x = builder.load(builder.bitcast(at(3, i64(4)), ir.VectorType(_I8, gs).as_pointer()), align=1)
            lanes = dpbusd(builder, ir.Constant(ir.VectorType(_I32, gs // 4), None), u, x, has_vnni(context))
            total = builder.extract_element(_group_sums_within(builder, lanes, gs // 4), ir.Constant(_I32, 0))
            total = builder.sub(total, builder.mul(builder.load(at(9, i64(8))), ir.Constant(_I32, offset)))
            f = builder.sitofp(total, ir.FloatType())
            ws, xsc = builder.load(at(5, i64(6))), builder.load(at(7, i64(8)))
            prod = builder.fmul(builder.fmul(f, ws), xsc) if bits == 4 else builder.fmul(f, builder.fmul(ws, xsc))
            return builder.fadd(args[0], prod)

        return types.float32(types.float32, data, wbase, xq, xbase, scales, sbase, xs, xsbase, xsum), codegen

    return step


_ONE = {(gs, bits): _one_group_step(gs, bits) for gs in (32, 64) for bits in (8, 4)}


@njit(inline="always", **JIT)
def _group(data, wo, xq, xo, gs, bits):
    """Exact int32 dot product of one group: weights from byte data[wo] (int8 values, or int4
    nibbles: byte j = value j | value j + gs/2 << 4, each q + 8), activations xq[xo:xo+gs]."""
    acc = np.int32(0)
    if bits == 8:
        for k in range(gs):
            acc = np.int32(acc + np.int32(data[np.uint64(wo + k)]) * np.int32(xq[np.uint64(xo + k)]))
    else:
        half = gs // 2
        for j in range(half):
            b = np.int32(data[np.uint64(wo + j)])
            lo = np.int32((b & 15) - 8)
            hi = np.int32(((b >> 4) & 15) - 8)
            acc = np.int32(acc + lo * np.int32(xq[np.uint64(xo + j)]) + hi * np.int32(xq[np.uint64(xo + half + j)]))
    return acc


@njit(inline="always", **JIT)
def qrow_plain(data, base, xq, xo, xs, xso, scales, so, n, gs, bits):
    """One output for any other group size: every group by the plain loop, the same arithmetic.
    The row's bytes start at data[base] (n values), its scales at scales[so]; the activations'
    values at xq[xo], scales at xs[xso]."""
    wbytes = gs if bits == 8 else gs // 2
    val = np.float32(0.0)
    for g in range(n // gs):
        val = _add_group(val, data, base + g * wbytes, xq, xo + g * gs, scales, so + g, xs, xso + g, gs, bits)
    return val


@njit(inline="always", **JIT)
def _add_group(val, data, wo, xq, xo, scales, s, xs, xsi, gs, bits):
    """val + one group's product by the plain loop, in runq's roundings: float32(int32 sum) *
    (w_scale * x_scale) for int8, (float32(sum) * w_scale) * x_scale for int4."""
    isum = _group(data, wo, xq, xo, gs, bits)
    if bits == 8:
        return val + np.float32(isum) * (scales[s] * xs[xsi])
    return val + np.float32(isum) * scales[s] * xs[xsi]


def _rows_kernel(gs: int, bits: int):
    """out[t, i] for rows i0 <= i < i1 of matrix l of kind w = (data, offsets, scales): each row's
    groups in order, `per` at a time by the VNNI step, the rest by the plain loop, adding each
    group's float32(exact int32 sum) * scales in group order, as runq does. For one group size
    and width fixed here: gs, bits and every stride derived from them are constants of
    the compiled code, and the loop holds only this pair's intrinsic. (The same rows with gs and
    bits as runtime values, as the forward passes them, ran 15-20x slower on small rows: measured
    29 vs 1.8 us for one stories260K-sized w1/w3 pair.)"""
    step, one = _STEPS[gs, bits], _ONE.get((gs, bits))
    per = 4 if gs >= 32 else 64 // gs  # groups per step
    wbytes_group = gs if bits == 8 else gs // 2

    @njit(inline="always", **JIT)
    def rows_kernel(out, t, w, l, i0, i1, xq, xo, xs, xso, xsum, n):
        data, base, scales = w[0], w[1][l], w[2]
        ng = n // gs
        done = ng // per * per
        rows = out.shape[1]
        so = l * rows * ng
        wbytes = ng * wbytes_group
        for i in range(i0, i1):
            rb, rs = base + i * wbytes, so + i * ng
            val = np.float32(0.0)
            for g in range(0, done, per):
                val = step(val, data, rb + g * wbytes_group, xq, xo + g * gs, scales, rs + g, xs, xso + g, xsum)
            for g in range(done, ng):  # the groups left over
                if one is not None:
                    val = one(val, data, rb + g * wbytes_group, xq, xo + g * gs, scales, rs + g, xs, xso + g, xsum)
                else:
                    val = _add_group(val, data, rb + g * wbytes_group, xq, xo + g * gs, scales, rs + g, xs, xso + g,
                                     gs, bits)
            out[t, i] = val

    return rows_kernel


ROWS = {key: _rows_kernel(*key) for key in _STEPS}
(rows_q8_4, rows_q8_8, rows_q8_16, rows_q8_32, rows_q8_64, rows_q4_4, rows_q4_8, rows_q4_16, rows_q4_32, rows_q4_64) = (
    ROWS[gs, bits] for bits in (8, 4) for gs in (4, 8, 16, 32, 64))
