"""llama2.c's float code as `gcc -Ofast -march=native` compiles it, reproduced bit for bit.

llama2.c is built with -Ofast (its Makefile's `runfast`/`runomp`, and the reference fixtures), and
that changes the arithmetic, not just the speed. On x86-64 with AVX-512 (gcc 12, znver4 here):
- Sums and dot products are vectorized: 16 partial sums (one per zmm lane, fused multiply-adds),
  folded to 8 (high half + low half), then one 8-wide step for a remainder of >= 8, then a fixed
  tree (lanes i + 4 onto i, then 2 + 0 and 3 + 1, then 1 + 0), then the last < 8 elements one
  by one.
- expf in a vectorized loop is glibc's libmvec (`_ZGVeN16v_expf` for 16-lane blocks,
  `_ZGVdN8v_expf` for an 8-lane block), the scalar libm expf for the tail: three implementations
  that round differently, so which one an element gets depends on its index.
- 1/sqrtf(x) is rsqrtss plus one Newton-Raphson step; a vectorized division 1/x is rcp14ps (16
  lanes) or rcpps (8 lanes) plus a Newton step; x / y with y loop-invariant is x * (1/y).
- powf(10000, e) is expf(e * ln 10000); a*b+c may be fused into one rounding.

Quantized inference magnifies all of this: an activation one ulp off can round to a different int8
and shift the logits, so matching runq's tokens takes runq's exact float operations. This module
holds the primitives (the same hardware instructions and libmvec, called through LLVM) and the
loop shapes; qkernels.py builds runq's forward from them. Where the CPU lacks AVX-512 or glibc's
libmvec is missing, the primitives fall back to exact math (correctly rounded division and square
root, libm's expf): the same algorithm, close to but not bit-identical with an -Ofast build
(which on such a CPU would compile to different code anyway).
"""

import ctypes.util

import llvmlite.binding as llvm
import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

# not cached on their own: compiled into the forward that calls them (kernels.JIT says why)
from .jit import JIT as OJIT  # never cached on their own: compiled into the forward that calls them
f32 = np.float32


def _host_has_ofast_primitives() -> bool:
    """AVX-512F for rcp14ps/zmm calls, and libmvec loadable so the JIT can resolve its symbols."""
    features = llvm.get_host_cpu_features()
    if not (features.get("avx512f") and features.get("avx2") and features.get("fma")):
        return False
    path = ctypes.util.find_library("mvec")
    if path is None:
        return False
    try:
        llvm.load_library_permanently(path)
    except RuntimeError:
        return False
    return True


EXACT_OFAST = _host_has_ofast_primitives()

# ------------------------------------------------------------------------------------------------
# Primitives. Vector ones work in place on x[i : i + width] (a float32 array).


_F32 = ir.FloatType()
_I32 = ir.IntType(32)
_I64 = ir.IntType(64)


def _fma_fn(module, ty):
    suffix = f"v{ty.count}f32" if isinstance(ty, ir.VectorType) else "f32"
    return cgutils.get_or_insert_function(module, ir.FunctionType(ty, [ty, ty, ty]), f"llvm.fma.{suffix}")


def _vector_intrinsic(width, name, extra=lambda vt: ()):
    """x[i : i + width] = name(x[i : i + width]) for a function taking (and returning) one float
    vector, plus the constant arguments `extra` gives (an LLVM intrinsic or libmvec's symbol)."""

    @intrinsic
    def vector_op(typingctx, x, i):
        def codegen(context, builder, signature, args):
            vt = ir.VectorType(_F32, width)
            arr = context.make_array(signature.args[0])(context, builder, args[0])
            ptr = builder.bitcast(builder.gep(arr.data, [args[1]]), vt.as_pointer())
            call_args = [builder.load(ptr, align=4), *extra(vt)]
            fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vt, [a.type for a in call_args]), name)
            builder.store(builder.call(fn, call_args), ptr, align=4)
            return context.get_dummy_value()

        return types.void(x, i), codegen

    return vector_op


def _rcp14_args(vt):  # passthrough and an all-ones lane mask
    return (ir.Constant(vt, None), ir.Constant(ir.IntType(16), 0xFFFF))


@intrinsic
def fma(typingctx, a, b, c):
    """a * b + c with one rounding (llvm.fma: the instruction where there is one, else exact
    software)."""
    if not (a == b == c == types.float32):
        return None

    def codegen(context, builder, signature, args):
        return builder.call(_fma_fn(builder.module, _F32), args)

    return types.float32(types.float32, types.float32, types.float32), codegen


@intrinsic
def _rsqrtss_hw(typingctx, x):
    if x != types.float32:
        return None

    def codegen(context, builder, signature, args):
        vt = ir.VectorType(_F32, 4)
        v = builder.insert_element(ir.Constant(vt, None), args[0], ir.Constant(_I32, 0))
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vt, [vt]), "llvm.x86.sse.rsqrt.ss")
        return builder.extract_element(builder.call(fn, [v]), ir.Constant(_I32, 0))

    return types.float32(types.float32), codegen


if EXACT_OFAST:  # the instructions and libmvec functions themselves, called from Numba code
    exp16 = _vector_intrinsic(16, "_ZGVeN16v_expf")
    exp8 = _vector_intrinsic(8, "_ZGVdN8v_expf")
    rcp16 = _vector_intrinsic(16, "llvm.x86.avx512.rcp14.ps.512", _rcp14_args)
    rcp8 = _vector_intrinsic(8, "llvm.x86.avx.rcp.ps.256")
    rsqrtss = _rsqrtss_hw
else:  # exact stand-ins with the same signatures

    @njit(inline="always", **OJIT)
    def _vexp_exact(x, i, width):
        for j in range(i, i + width):
            x[j] = np.exp(x[j])

    @njit(inline="always", **OJIT)
    def _vrcp_exact(x, i, width):
        for j in range(i, i + width):
            x[j] = f32(1.0) / x[j]

    @njit(inline="always", **OJIT)
    def exp16(x, i):
        _vexp_exact(x, i, 16)

    @njit(inline="always", **OJIT)
    def exp8(x, i):
        _vexp_exact(x, i, 8)

    @njit(inline="always", **OJIT)
    def rcp16(x, i):
        _vrcp_exact(x, i, 16)

    @njit(inline="always", **OJIT)
    def rcp8(x, i):
        _vrcp_exact(x, i, 8)

    @njit(inline="always", **OJIT)
    def rsqrtss(x):
        return f32(1.0) / np.sqrt(x)


def _gate_ir(width, exp_name, rcp, product):
    """hb[i : i + width] = silu(hb) * hb2 for one vectorized block of llama2.c's SwiGLU loop, in
    registers: e = expf(-x), d = e + 1, r = rcp(d), inv = newton_recip(r, d), then `product`."""

    @intrinsic
    def gate(typingctx, hb, hb2, i):
        def codegen(context, builder, signature, args):
            vt = ir.VectorType(_F32, width)
            ptrs = [_data_at(context, builder, signature.args[k], args[k], args[2], signature.args[2]) for k in (0, 1)]
            x, x3 = (_load_vec(builder, p, ir.Constant(_I64, 0), vt) for p in ptrs)
            e = builder.call(cgutils.get_or_insert_function(builder.module, ir.FunctionType(vt, [vt]), exp_name),
                             [builder.fneg(x)])
            d = builder.fadd(e, ir.Constant(vt, [1.0] * width))
            r = rcp(builder, d)
            inv = builder.fsub(builder.fadd(r, r), builder.fmul(r, builder.fmul(r, d)))
            out = product(builder, inv, x, x3)
            builder.store(out, builder.bitcast(ptrs[0], vt.as_pointer()), align=4)
            return context.get_dummy_value()

        return types.void(hb, hb2, i), codegen

    return gate


def _rcp_call(name, extra=lambda vt: ()):
    def rcp(builder, d):
        args = [d, *extra(d.type)]
        return builder.call(cgutils.get_or_insert_function(builder.module, ir.FunctionType(d.type, [a.type for a in args]), name), args)

    return rcp


if EXACT_OFAST:  # gcc's 16-lane blocks compute (inv * x) * x3, its 8-lane block inv * (x * x3)
    gate16 = _gate_ir(16, "_ZGVeN16v_expf", _rcp_call("llvm.x86.avx512.rcp14.ps.512", _rcp14_args),
                      lambda b, inv, x, x3: b.fmul(b.fmul(inv, x), x3))
    gate8 = _gate_ir(8, "_ZGVdN8v_expf", _rcp_call("llvm.x86.avx.rcp.ps.256"),
                     lambda b, inv, x, x3: b.fmul(inv, b.fmul(x, x3)))
else:

    @njit(inline="always", **OJIT)
    def gate16(hb, hb2, i):
        for j in range(i, i + 16):
            d = np.exp(-hb[j]) + f32(1.0)
            hb[j] = (newton_recip(f32(1.0) / d, d) * hb[j]) * hb2[j]

    @njit(inline="always", **OJIT)
    def gate8(hb, hb2, i):
        for j in range(i, i + 8):
            d = np.exp(-hb[j]) + f32(1.0)
            hb[j] = newton_recip(f32(1.0) / d, d) * (hb[j] * hb2[j])


@njit(inline="always", **OJIT)
def inv_sqrt(x):
    """gcc's 1.0f / sqrtf(x): y = rsqrtss(x), then (y * (x * y) - 3) * (y * -0.5)."""
    y = rsqrtss(x)
    return fma(y, x * y, f32(-3.0)) * (y * f32(-0.5))


@njit(inline="always", **OJIT)
def newton_recip(r, d):
    """One Newton step on an approximate reciprocal r of d, as gcc emits it: (r + r) - r * (r * d)."""
    return (r + r) - r * (r * d)


# ------------------------------------------------------------------------------------------------
# Reductions in the vectorizer's order. Lane l of the 16-lane accumulator sums elements 16c + l;
# the high half is then added onto the low half, one 8-lane step takes a remainder of >= 8, the
# 8 lanes are folded (_fold), and the last < 8 elements are added one by one. One generator,
# _tile_codegen, emits this for any R x C tile of dot products (R rows of a weight matrix times C
# activation vectors): dot is 1 x 1, dot8 is 8 x 1, and the batched kernels use 8 x C. Every
# element of a tile is the same operations on the same operands as `dot`, so batching never
# changes a bit of the result.


def _load_vec(builder, base, offset, vt):
    return builder.load(builder.bitcast(builder.gep(base, [offset]), vt.as_pointer()), align=4)


def _shuffle(builder, a, b, mask):
    """LLVM shufflevector of a and b: lane i of the result is lane mask[i] of a ++ b."""
    mask = list(mask)
    return builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(_I32, len(mask)), mask))


def _splat(builder, value, width):
    vt = ir.VectorType(value.type, width)
    return _shuffle(builder, builder.insert_element(ir.Constant(vt, None), value, ir.Constant(_I32, 0)),
                    ir.Constant(vt, None), [0] * width)


def _fold(items, add):
    """gcc's fold of 8 lanes: lanes i + 4 onto i, then (3 + 1) + (2 + 0). `items` are the 8 lanes
    as scalars, or as vectors whose lane j holds that lane of the j-th of several sums."""
    u = [add(items[i + 4], items[i]) for i in range(4)]
    return add(add(u[3], u[1]), add(u[2], u[0]))


def _fold_eight(builder, a):
    """_fold of eight 8-lane accumulators at once: lane r of the result is _fold(lanes of a[r]).

    The same additions of the same operands, but transposed: pairs of accumulators share vectors,
    so each step of the tree is one vector add for several sums (addition commutes exactly).
    """
    # lanes i + 4 onto i: sums 2k and 2k + 1 share p[k] = [u_2k (4 lanes), u_2k+1 (4 lanes)]
    p = [builder.fadd(_shuffle(builder, a[2 * k], a[2 * k + 1], [4, 5, 6, 7, 12, 13, 14, 15]),
                      _shuffle(builder, a[2 * k], a[2 * k + 1], [0, 1, 2, 3, 8, 9, 10, 11])) for k in range(4)]
    # u3 + u1 and u2 + u0: q[0] = sums [0 0 2 2 1 1 3 3], q[1] = sums [4 4 6 6 5 5 7 7]
    q = [builder.fadd(_shuffle(builder, p[2 * k], p[2 * k + 1], [2, 3, 10, 11, 6, 7, 14, 15]),
                      _shuffle(builder, p[2 * k], p[2 * k + 1], [0, 1, 8, 9, 4, 5, 12, 13])) for k in range(2)]
    # (u3 + u1) + (u2 + u0): sums [0 2 4 6 1 3 5 7], then put in order
    sums = builder.fadd(_shuffle(builder, q[0], q[1], [1, 3, 9, 11, 5, 7, 13, 15]),
                        _shuffle(builder, q[0], q[1], [0, 2, 8, 10, 4, 6, 12, 14]))
    return _shuffle(builder, sums, sums, [0, 4, 1, 5, 2, 6, 3, 7])


def _tile_codegen(builder, rows, cols, n, init=None):
    """The sums s[r][c] = init + sum_k rows[r][k] * cols[c][k] (cols None: s = init + sum_k rows[r][k])
    in gcc -Ofast's order, for float pointers rows (R) and cols (C) and an int64 length n.

    Returns (items, results): items lists the (r, c) pairs in r-fastest order, results holds one
    value per group of up to 8 items: a float32 for a lone item, else an 8-lane vector whose lane
    j is item 8g + j (lanes past the last item repeat it). init, a float32, joins after the fold.
    """
    v16, v8 = ir.VectorType(_F32, 16), ir.VectorType(_F32, 8)
    C = 1 if cols is None else len(cols)
    items = [(r, c) for c in range(C) for r in range(len(rows))]

    def step(acc, vt, off):
        wv = [_load_vec(builder, p, off, vt) for p in rows]
        if cols is None:
            for (r, c), a in zip(items, acc):
                builder.store(builder.fadd(builder.load(a), wv[r]), a)
            return
        xv = [_load_vec(builder, p, off, vt) for p in cols]
        fma = _fma_fn(builder.module, vt)
        for (r, c), a in zip(items, acc):
            builder.store(builder.call(fma, [wv[r], xv[c], builder.load(a)]), a)

    acc16 = [cgutils.alloca_once_value(builder, ir.Constant(v16, [0.0] * 16)) for _ in items]
    n16 = builder.sdiv(n, ir.Constant(_I64, 16))
    with cgutils.for_range(builder, n16) as loop:
        step(acc16, v16, builder.mul(loop.index, ir.Constant(_I64, 16)))
    acc8 = []
    for a in acc16:  # high half onto low half
        lanes = builder.load(a)
        acc8.append(cgutils.alloca_once_value(builder, builder.fadd(_shuffle(builder, lanes, lanes, range(8, 16)),
                                                                   _shuffle(builder, lanes, lanes, range(8)))))
    done = cgutils.alloca_once_value(builder, builder.mul(n16, ir.Constant(_I64, 16)))
    with builder.if_then(builder.icmp_signed(">=", builder.sub(n, builder.load(done)), ir.Constant(_I64, 8))):
        step(acc8, v8, builder.load(done))
        builder.store(builder.add(builder.load(done), ir.Constant(_I64, 8)), done)
    start = builder.load(done)
    tail = builder.sub(n, start)

    def element(ptr, m):
        return builder.load(builder.gep(ptr, [m]))

    results = []
    for g in range(0, len(items), 8):
        group = items[g : g + 8]
        if len(items) == 1:  # a lone sum: fold its lanes as scalars, then the tail one by one
            v = builder.load(acc8[0])
            folded = _fold([builder.extract_element(v, ir.Constant(_I32, i)) for i in range(8)], builder.fadd)
            s = cgutils.alloca_once_value(builder, folded if init is None else builder.fadd(init, folded))
            with cgutils.for_range(builder, tail) as loop:
                m = builder.add(start, loop.index)
                if cols is None:
                    builder.store(builder.fadd(builder.load(s), element(rows[0], m)), s)
                else:
                    builder.store(builder.call(_fma_fn(builder.module, _F32),
                                               [element(rows[0], m), element(cols[0], m), builder.load(s)]), s)
            results.append(builder.load(s))
            continue
        padded = group + [group[-1]] * (8 - len(group))
        vecs = [builder.load(acc8[items.index(it)]) for it in padded]
        folded = _fold_eight(builder, vecs)
        s = cgutils.alloca_once_value(builder, folded if init is None else builder.fadd(_splat(builder, init, 8), folded))
        with cgutils.for_range(builder, tail) as loop:  # the last < 8 elements, all lanes at once
            m = builder.add(start, loop.index)
            wv, xv = ir.Constant(v8, None), ir.Constant(v8, None)
            for j, (r, c) in enumerate(padded):
                wv = builder.insert_element(wv, element(rows[r], m), ir.Constant(_I32, j))
                if cols is not None:
                    xv = builder.insert_element(xv, element(cols[c], m), ir.Constant(_I32, j))
            if cols is None:
                builder.store(builder.fadd(builder.load(s), wv), s)
            else:
                builder.store(builder.call(_fma_fn(builder.module, v8), [wv, xv, builder.load(s)]), s)
        results.append(builder.load(s))
    return items, results


def _is_f32_array(a):
    return isinstance(a, types.Array) and a.dtype == types.float32


def _data_at(context, builder, aryty, ary, offset, offty):
    data = context.make_array(aryty)(context, builder, ary).data
    return builder.gep(data, [context.cast(builder, offset, offty, types.int64)])


def _i64(context, builder, value, ty):
    return context.cast(builder, value, ty, types.int64)


@intrinsic
def dot(typingctx, a, ao, b, bo, n):
    """sum(a.flat[ao:ao+n] * b.flat[bo:bo+n]) in float32, as gcc -Ofast vectorizes `s += a[i] * b[i]`
    (_tile_codegen). a, b: C-contiguous float32 arrays of any shape, addressed by flat offsets.

    Written in LLVM IR with vector types because the order has to be exact and fast at once:
    Numba leaves LLVM's SLP vectorizer off, so scalar code would stay scalar, and the loop
    vectorizer would only vectorize the sum by reordering it.
    """
    if not (_is_f32_array(a) and _is_f32_array(b)):
        return None

    def codegen(context, builder, signature, args):
        ty = signature.args
        pa = _data_at(context, builder, ty[0], args[0], args[1], ty[1])
        pb = _data_at(context, builder, ty[2], args[2], args[3], ty[3])
        _, (s,) = _tile_codegen(builder, [pa], [pb], _i64(context, builder, args[4], ty[4]))
        return s

    return types.float32(a, ao, b, bo, n), codegen


@intrinsic
def vsum(typingctx, x, o, n, s):
    """s + sum(x.flat[o:o+n]) as gcc -Ofast vectorizes `s += x[i]` (s joins after the fold)."""
    if not (_is_f32_array(x) and s == types.float32):
        return None

    def codegen(context, builder, signature, args):
        ty = signature.args
        px = _data_at(context, builder, ty[0], args[0], args[1], ty[1])
        _, (total,) = _tile_codegen(builder, [px], None, _i64(context, builder, args[2], ty[2]), init=args[3])
        return total

    return types.float32(x, o, n, s), codegen


def _store_tile(builder, out, ostride, items, results):
    """out[c * ostride + r] = the sum of item (r, c): a vector store where a group is 8 consecutive
    rows of one column, else lane by lane."""
    for g, res in enumerate(results):
        group = items[8 * g : 8 * g + 8]
        (r0, c0) = group[0]
        if len(group) == 8 and all(it == (r0 + j, c0) for j, it in enumerate(group)):
            ptr = builder.gep(out, [builder.add(builder.mul(ir.Constant(_I64, c0), ostride), ir.Constant(_I64, r0))])
            builder.store(res, builder.bitcast(ptr, res.type.as_pointer()), align=4)
            continue
        for j, (r, c) in enumerate(group):
            value = res if len(items) == 1 else builder.extract_element(res, ir.Constant(_I32, j))
            offset = builder.add(builder.mul(ir.Constant(_I64, c), ostride), ir.Constant(_I64, r))
            builder.store(value, builder.gep(out, [offset]))


def dot_tile(R: int, C: int):
    """An intrinsic tile(out, oo, ostride, w, wo, wstride, x, xo, xstride, n) computing
    out[oo + c * ostride + r] = dot(w, wo + r * wstride, x, xo + c * xstride, n) for r < R, c < C,
    each bit for bit `dot`'s result, with the R x C sums' chains side by side in registers: each
    loaded row vector serves C activation vectors, each activation vector R rows."""

    @intrinsic
    def tile(typingctx, out, oo, ostride, w, wo, wstride, x, xo, xstride, n):
        if not (_is_f32_array(out) and _is_f32_array(w) and _is_f32_array(x)):
            return None

        def codegen(context, builder, signature, args):
            ty = signature.args
            po = _data_at(context, builder, ty[0], args[0], args[1], ty[1])
            pw = _data_at(context, builder, ty[3], args[3], args[4], ty[4])
            px = _data_at(context, builder, ty[6], args[6], args[7], ty[7])
            ostride_, wstride_, xstride_, n_ = (_i64(context, builder, args[i], ty[i]) for i in (2, 5, 8, 9))
            rows = [builder.gep(pw, [builder.mul(wstride_, ir.Constant(_I64, r))]) for r in range(R)]
            cols = [builder.gep(px, [builder.mul(xstride_, ir.Constant(_I64, c))]) for c in range(C)]
            items, results = _tile_codegen(builder, rows, cols, n_)
            _store_tile(builder, po, ostride_, items, results)
            return context.get_dummy_value()

        return types.void(out, oo, ostride, w, wo, wstride, x, xo, xstride, n), codegen

    return tile


_dot8_tile = dot_tile(8, 1)


@njit(inline="always", **OJIT)
def dot8(out, oo, w, wo, x, xo, n):
    """out[oo + r] = dot(w, wo + r * n, x, xo, n) for the 8 rows r = 0..7 of a row-major matrix,
    bit for bit, but the rows' reductions run side by side (dot_tile(8, 1)).

    One row alone is a chain of dependent FMAs and then a fold of its 8 lanes, which is mostly
    latency (stories260K's rows are 64 floats: four FMAs). Here the 8 rows' chains interleave and
    the folds run transposed (_fold_eight)."""
    _dot8_tile(out, oo, 0, w, wo, n, x, xo, 0, n)


@intrinsic
def dot16_columns(typingctx, out, oo, q, qo, k, ko, d, stride, scale):
    """out[oo + j] = dot(q[qo : qo + d], column j of k) * scale for the 16 columns j = 0..15 of a
    (d, stride) row-major block at k[ko:], each dot bit for bit ofast.dot's. Attention's scores:
    the block is a tile of 16 positions' keys (head_size, 16), a column one position's key.

    Vectors run across the 16 positions, so each of the reduction's 16 lanes is a register holding
    that lane for all 16 positions: the same operations in the same order per position, and every
    step one vector instruction, where a loop over positions per lane kept its partial sums in memory.
    """
    if not (_is_f32_array(out) and _is_f32_array(q) and _is_f32_array(k) and scale == types.float32):
        return None

    def codegen(context, builder, signature, args):
        ty = signature.args
        po = _data_at(context, builder, ty[0], args[0], args[1], ty[1])
        pq = _data_at(context, builder, ty[2], args[2], args[3], ty[3])
        pk = _data_at(context, builder, ty[4], args[4], args[5], ty[5])
        d, stride = (_i64(context, builder, args[i], ty[i]) for i in (6, 7))
        v16 = ir.VectorType(_F32, 16)
        fma16 = _fma_fn(builder.module, v16)

        def step(acc, dim):  # acc = fma(q[dim], k[dim, 0:16], acc)
            row = _load_vec(builder, pk, builder.mul(dim, stride), v16)
            builder.store(builder.call(fma16, [_splat(builder, builder.load(builder.gep(pq, [dim])), 16), row,
                                               builder.load(acc)]), acc)

        lanes = [cgutils.alloca_once_value(builder, ir.Constant(v16, [0.0] * 16)) for _ in range(16)]
        n16 = builder.sdiv(d, ir.Constant(_I64, 16))
        with cgutils.for_range(builder, n16) as loop:
            base = builder.mul(loop.index, ir.Constant(_I64, 16))
            for lane in range(16):
                step(lanes[lane], builder.add(base, ir.Constant(_I64, lane)))
        e = [cgutils.alloca_once_value(builder, builder.fadd(builder.load(lanes[i + 8]), builder.load(lanes[i])))
             for i in range(8)]  # high half onto low half
        done = cgutils.alloca_once_value(builder, builder.mul(n16, ir.Constant(_I64, 16)))
        with builder.if_then(builder.icmp_signed(">=", builder.sub(d, builder.load(done)), ir.Constant(_I64, 8))):
            for lane in range(8):
                step(e[lane], builder.add(builder.load(done), ir.Constant(_I64, lane)))
            builder.store(builder.add(builder.load(done), ir.Constant(_I64, 8)), done)
        s = cgutils.alloca_once_value(builder, _fold([builder.load(x) for x in e], builder.fadd))
        start = builder.load(done)
        with cgutils.for_range(builder, builder.sub(d, start)) as loop:  # the last < 8 dims
            step(s, builder.add(start, loop.index))
        result = builder.fmul(builder.load(s), _splat(builder, args[8], 16))
        builder.store(result, builder.bitcast(po, v16.as_pointer()), align=4)
        return context.get_dummy_value()

    return types.void(out, oo, q, qo, k, ko, d, stride, scale), codegen


def _vmax(builder, a, b):
    return builder.select(builder.fcmp_ordered(">", b, a), b, a)


@intrinsic
def vmax(typingctx, x, o, n):
    """max(x.flat[o:o+n]), n >= 1, 16 lanes at a time. A maximum is exact, so unlike a sum its
    order cannot change the result (up to the sign of a zero, which x - max then erases)."""
    if not _is_f32_array(x):
        return None

    def codegen(context, builder, signature, args):
        ty = signature.args
        px = _data_at(context, builder, ty[0], args[0], args[1], ty[1])
        n = context.cast(builder, args[2], ty[2], types.int64)
        v16 = ir.VectorType(_F32, 16)
        first = builder.load(px)
        acc = cgutils.alloca_once_value(builder, builder.insert_element(ir.Constant(v16, None), first, ir.Constant(_I32, 0)))
        builder.store(builder.shuffle_vector(builder.load(acc), builder.load(acc), ir.Constant(ir.VectorType(_I32, 16), [0] * 16)), acc)
        n16 = builder.sdiv(n, ir.Constant(_I64, 16))
        with cgutils.for_range(builder, n16) as loop:
            v = _load_vec(builder, px, builder.mul(loop.index, ir.Constant(_I64, 16)), v16)
            builder.store(_vmax(builder, builder.load(acc), v), acc)
        lanes = builder.load(acc)
        m = cgutils.alloca_once_value(builder, builder.extract_element(lanes, ir.Constant(_I32, 0)))
        for i in range(1, 16):
            builder.store(_vmax(builder, builder.load(m), builder.extract_element(lanes, ir.Constant(_I32, i))), m)
        start = builder.mul(n16, ir.Constant(_I64, 16))
        with cgutils.for_range(builder, builder.sub(n, start)) as loop:
            v = builder.load(builder.gep(px, [builder.add(start, loop.index)]))
            builder.store(_vmax(builder, builder.load(m), v), m)
        return builder.load(m)

    return types.float32(x, o, n), codegen


@intrinsic
def fma_chains(typingctx, out, oo, w, wo, v, vo, vstride, n, pages, po, page_stride):
    """For k = 0..3: out[oo[k] : oo[k] + 8] = sum over t < n of w[wo[k] + t] * (8 floats of v at
    vo[k] + pages.flat[po + t // 16] * page_stride + (t % 16) * vstride), each element one chain of
    fused multiply-adds in t order, starting from zero (run.c's `xb[i] += a * v[i]` over positions,
    as -Ofast compiles it). v is a paged cache: position t lives in page pages[po + t // 16], row
    t % 16. Flat offsets into C-contiguous arrays.

    Four 8-lane chains advance together: one chain alone waits on its FMA's latency every step,
    and a small head (stories260K: 8 dims) has just one.
    """
    if not (_is_f32_array(out) and _is_f32_array(w) and _is_f32_array(v)):
        return None
    if not all(isinstance(t, types.UniTuple) and t.count == 4 for t in (oo, wo, vo)):
        return None
    if not (isinstance(pages, types.Array) and pages.dtype == types.int32):
        return None

    def codegen(context, builder, signature, args):
        ty = signature.args
        v8 = ir.VectorType(_F32, 8)
        offsets = [[context.cast(builder, builder.extract_value(args[a], k), ty[a].dtype, types.int64) for k in range(4)]
                   for a in (1, 3, 5)]
        data = [context.make_array(ty[a])(context, builder, args[a]).data for a in (0, 2, 4)]
        stride = _i64(context, builder, args[6], ty[6])
        n = _i64(context, builder, args[7], ty[7])
        page_data = _data_at(context, builder, ty[8], args[8], args[9], ty[9])
        page_stride = _i64(context, builder, args[10], ty[10])
        accs = [cgutils.alloca_once_value(builder, ir.Constant(v8, [0.0] * 8)) for _ in range(4)]
        fma8 = _fma_fn(builder.module, v8)
        sixteen = ir.Constant(_I64, 16)
        blocks = builder.sdiv(builder.add(n, ir.Constant(_I64, 15)), sixteen)
        with cgutils.for_range(builder, blocks) as block:  # page by page, then position by position
            b = block.index
            page = builder.sext(builder.load(builder.gep(page_data, [b])), _I64)
            base = builder.mul(page, page_stride)
            t0 = builder.mul(b, sixteen)
            count = builder.select(builder.icmp_signed("<", builder.sub(n, t0), sixteen), builder.sub(n, t0), sixteen)
            vbase = [builder.add(offsets[2][k], base) for k in range(4)]
            wbase = [builder.add(offsets[1][k], t0) for k in range(4)]
            with cgutils.for_range(builder, count) as loop:
                j = loop.index
                row = builder.mul(j, stride)
                for k in range(4):
                    a8 = _splat(builder, builder.load(builder.gep(data[1], [builder.add(wbase[k], j)])), 8)
                    vk = _load_vec(builder, data[2], builder.add(vbase[k], row), v8)
                    builder.store(builder.call(fma8, [a8, vk, builder.load(accs[k])]), accs[k])
        for k in range(4):
            ptr = builder.bitcast(builder.gep(data[0], [offsets[0][k]]), v8.as_pointer())
            builder.store(builder.load(accs[k]), ptr, align=4)
        return context.get_dummy_value()

    return types.void(out, oo, w, wo, v, vo, vstride, n, pages, po, page_stride), codegen


@njit(inline="always", **OJIT)
def vexp_shifted(x, n, m):
    """x[:n] = expf(x - m), each element through the implementation its position gets:
    libmvec's 16-lane expf for whole blocks of 16, the 8-lane one for a block of 8, libm's after."""
    for j in range(n):
        x[j] = x[j] - m
    n16 = n // 16
    for c in range(n16):
        exp16(x, 16 * c)
    j = 16 * n16
    if n - j >= 8:
        exp8(x, j)
        j += 8
    for k in range(j, n):
        x[k] = np.exp(x[k])


@njit(inline="always", **OJIT)
def softmax(x, o, n, peel_first):
    """In-place softmax of x[o:o+n], x 1-D (run.c's: max, expf(x - max) and their sum, then x * (1 / sum)).

    peel_first: gcc peels element 0 off the exp loop in the attention softmax it inlines into
    forward() (scalar expf, the vector loop starts at 1), not in the sampler's.
    """
    # Views whose indices start at 0: with a runtime offset in the index, Numba's check for
    # negative indices stays in the loops and keeps them from vectorizing (2x slower here).
    v = x[o : o + n]
    m = vmax(v, 0, n)
    if peel_first:
        v[0] = np.exp(v[0] - m)
        vexp_shifted(v[1:], n - 1, m)
        total = vsum(v, 1, n - 1, v[0])
    else:
        vexp_shifted(v, n, m)
        total = vsum(v, 0, n, f32(0.0))
    inv = f32(1.0) / total
    for i in range(n):
        v[i] *= inv
