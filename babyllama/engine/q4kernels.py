"""The int4 (v3) matmul row: exact int32 group sums of packed nibbles against int8 activations.

Why it is written the way it is (measured on AVX-512 VNNI, see `babyllama bench`): int4 streams
half of int8's bytes, but a plain loop over the nibbles (`_group_q4` below, kept for the group
sizes the fast path does not take) spends ~26 instructions per 64 weights on unpacking, sign
fixing, 16-bit products and one horizontal sum per group, and runs no faster than int8. The
fast path, for group size 64, is LLVM IR (a Numba intrinsic), because LLVM's vectorizer does
not find these steps from a loop:

- Nibbles are used as stored, unsigned 0..15, against the signed int8 activations: the u8 x s8
  product that VNNI's vpdpbusd sums four at a time into int32 lanes, 64 products an instruction.
  sum((n - 8) * x) = sum(n * x) - 8 * sum(x), and 8 * sum(x) is one more vpdpbusd (8s against
  x), so no nibble is widened or offset. Every sum is exact (|n * x| <= 15 * 127), so the result
  is the plain loop's int32, and the logits do not change by a bit.
- The v3 layout (byte j = value j | value j + G/2 << 4) makes a group's 32 low nibbles followed
  by its 32 high nibbles exactly its 64 activations in order: a load, a mask, a shift and a
  concatenation give the 64-byte operand.
- Four groups are reduced together, with shuffles inside 128-bit quarters and then two halvings
  (~13 instructions for four horizontal sums instead of ~9 each), and their scale products are
  one vector multiply; the four products are then added in group order, as runq does.
- The row is inlined into the matmul loops: as a call, its prologue cost more than a 768-wide
  row's four group blocks.

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

_I8, _I32 = ir.IntType(8), ir.IntType(32)



def _add_shuffles(builder, a, b, first, second):
    return builder.add(_shuffle(builder, a, b, first), _shuffle(builder, a, b, second))


def _dpbusd(builder, acc, u, s, vnni):
    """acc (16 x i32) + vpdpbusd(u, s): lane i adds u[4i+j] * s[4i+j], j < 4 (u unsigned, s signed)."""
    if vnni:
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(acc.type, [acc.type, u.type, s.type]),
                                            "llvm.x86.avx512.vpdpbusd.512")
        return builder.call(fn, [acc, u, s])
    wide = ir.VectorType(_I32, 64)
    p = builder.mul(builder.zext(u, wide), builder.sext(s, wide))
    for j in range(4):
        acc = builder.add(acc, _shuffle(builder, p, p, [4 * i + j for i in range(16)]))
    return acc


def _sum4(builder, sums):
    """The totals of four 16-lane int32 vectors as one 4-lane vector: unpack-and-add inside each
    128-bit quarter (cheap shuffles), then add the quarters."""

    def quarters(offsets):  # the same positions in each quarter; a's lanes < 16 <= b's lanes
        return [4 * c + o for c in range(4) for o in offsets]

    ab = _add_shuffles(builder, sums[0], sums[1], quarters([0, 16, 1, 17]), quarters([2, 18, 3, 19]))
    cd = _add_shuffles(builder, sums[2], sums[3], quarters([0, 16, 1, 17]), quarters([2, 18, 3, 19]))
    r = _add_shuffles(builder, ab, cd, quarters([0, 1, 16, 17]), quarters([2, 3, 18, 19]))  # quarter: a b c d
    r = _add_shuffles(builder, r, r, range(8), range(8, 16))
    return _add_shuffles(builder, r, r, range(4), range(4, 8))


@intrinsic
def _scaled4_g64(typingctx, data, wbase, xq, xbase, scales, sbase, xs, xsbase):
    """Four groups of 64 of one row: float32(exact int32 sum) * scales[sbase + k] * xs[xsbase + k]
    for k < 4, as a 4-tuple. The row's bytes of the first group start at data[wbase], its
    activations at xq[xbase] (all flat offsets)."""
    ret = types.UniTuple(types.float32, 4)

    def codegen(context, builder, sig, args):
        vnni = all(f in context.codegen().magic_tuple()[2] for f in ("+avx512vnni", "+avx512bw"))
        data_, wbase_, xq_, xbase_, scales_, sbase_, xs_, xsbase_ = args

        def plus(k, value):
            return builder.add(context.cast(builder, args[k], sig.args[k], types.int64), ir.Constant(ir.IntType(64), value))

        v32, v64, v16 = ir.VectorType(_I8, 32), ir.VectorType(_I8, 64), ir.VectorType(_I32, 16)
        zero, eights = ir.Constant(v16, None), ir.Constant(v64, [8] * 64)
        sums = []
        for k in range(4):
            b = builder.load(_ptr_at(context, builder, sig.args[0], data_, plus(1, 32 * k), v32), align=1)
            x = builder.load(_ptr_at(context, builder, sig.args[2], xq_, plus(3, 64 * k), v64), align=1)
            nib = _shuffle(builder, builder.and_(b, ir.Constant(v32, [15] * 32)),
                           builder.lshr(b, ir.Constant(v32, [4] * 32)), range(64))  # values 0..31, 32..63
            sums.append(builder.sub(_dpbusd(builder, zero, nib, x, vnni), _dpbusd(builder, zero, eights, x, vnni)))
        # (float32(sum) * w_scale) * x_scale lane by lane: the same roundings as the scalar code
        vf = ir.VectorType(ir.FloatType(), 4)
        prod = builder.fmul(builder.sitofp(_sum4(builder, sums), vf),
                            builder.load(_ptr_at(context, builder, sig.args[4], scales_, plus(5, 0), vf), align=4))
        prod = builder.fmul(prod, builder.load(_ptr_at(context, builder, sig.args[6], xs_, plus(7, 0), vf), align=4))
        return context.make_tuple(builder, ret, [builder.extract_element(prod, ir.Constant(_I32, i)) for i in range(4)])

    return ret(data, wbase, xq, xbase, scales, sbase, xs, xsbase), codegen


def _ptr_at(context, builder, aryty, ary, index, vecty):
    """A vector pointer at element `index` (int64) of a flat array."""
    base = context.make_array(aryty)(context, builder, ary).data
    return builder.bitcast(builder.gep(base, [index]), vecty.as_pointer())


@njit(inline="always", **JIT)
def _group_q4(w, ob, x, ox, half):
    """Exact int32 sum over one int4 group: bytes w[ob:ob+half] against x[ox:ox+2*half].

    Byte j holds value j (low nibble) and value j + half (high nibble), each stored as q + 8.
    """
    acc = np.int32(0)
    for j in range(half):
        b = np.int32(w[np.uint64(ob + j)])
        lo = np.int32((b & 15) - 8)
        hi = np.int32(((b >> 4) & 15) - 8)
        acc = np.int32(acc + lo * np.int32(x[np.uint64(ox + j)]) + hi * np.int32(x[np.uint64(ox + half + j)]))
    return acc


@njit(inline="always", **JIT)
def row_q4(data, base, xq, xo, xs, xso, scales, so, n, gs):
    """One output of an int4 matmul: the row's packed bytes start at data[base], its scales at
    scales[so], the activations at xq[xo] (values) and xs[xso] (scales); n columns. Adds (exact
    int32 group sum) * w_scale * x_scale group after group."""
    ng = n // gs
    val = np.float32(0.0)
    done = 0
    if gs == 64:
        for g in range(0, ng - 3, 4):
            p = _scaled4_g64(data, base + g * 32, xq, xo + g * 64, scales, so + g, xs, xso + g)
            val += p[0]
            val += p[1]
            val += p[2]
            val += p[3]
        done = ng // 4 * 4
    half = gs // 2
    for g in range(done, ng):  # other group sizes, and the last ng % 4 groups of 64
        val += np.float32(_group_q4(data, base + g * half, xq, xo + g * gs, half)) * scales[so + g] * xs[xso + g]
    return val
