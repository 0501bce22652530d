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

OJIT = dict(cache=True, nogil=True, error_model="numpy", fastmath=False)
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
# Reductions in the vectorizer's order. Lane l of the 16-lane accumulator sums elements 16c + l.


def _load_vec(builder, base, offset, vt):
    return builder.load(builder.bitcast(builder.gep(base, [offset]), vt.as_pointer()), align=4)


def _reduce_ir(context, builder, pa, pb, n, init):
    """gcc -Ofast's vectorized reduction of `s += a[i] * b[i]` (pb given: fused multiply-adds) or
    `s += a[i]` (pb None, s starting at init): a 16-lane accumulator, its high half added onto its
    low half, one 8-lane step for a remainder of >= 8, the fold (init joins after it), then
    the last < 8 elements one by one. pa, pb: float pointers; n: int64; returns a float32 value."""
    v16, v8 = ir.VectorType(_F32, 16), ir.VectorType(_F32, 8)

    def step(acc, vt, off):
        x = _load_vec(builder, pa, off, vt)
        if pb is None:
            return builder.fadd(builder.load(acc), x)
        return builder.call(_fma_fn(builder.module, vt), [x, _load_vec(builder, pb, off, vt), builder.load(acc)])

    acc = cgutils.alloca_once_value(builder, ir.Constant(v16, [0.0] * 16))
    n16 = builder.sdiv(n, ir.Constant(_I64, 16))
    with cgutils.for_range(builder, n16) as loop:
        builder.store(step(acc, v16, builder.mul(loop.index, ir.Constant(_I64, 16))), acc)
    lanes = builder.load(acc)
    lo = builder.shuffle_vector(lanes, lanes, ir.Constant(ir.VectorType(_I32, 8), list(range(8))))
    hi = builder.shuffle_vector(lanes, lanes, ir.Constant(ir.VectorType(_I32, 8), list(range(8, 16))))
    acc8 = cgutils.alloca_once_value(builder, builder.fadd(hi, lo))
    done = cgutils.alloca_once_value(builder, builder.mul(n16, ir.Constant(_I64, 16)))
    with builder.if_then(builder.icmp_signed(">=", builder.sub(n, builder.load(done)), ir.Constant(_I64, 8))):
        off = builder.load(done)
        builder.store(step(acc8, v8, off), acc8)
        builder.store(builder.add(off, ir.Constant(_I64, 8)), done)
    v = builder.load(acc8)
    e = [builder.extract_element(v, ir.Constant(_I32, i)) for i in range(8)]
    u = [builder.fadd(e[i + 4], e[i]) for i in range(4)]  # the fold: i + 4 onto i, 2+0 and 3+1, 1+0
    folded = builder.fadd(builder.fadd(u[3], u[1]), builder.fadd(u[2], u[0]))
    s = cgutils.alloca_once_value(builder, folded if init is None else builder.fadd(init, folded))
    start = builder.load(done)
    with cgutils.for_range(builder, builder.sub(n, start)) as loop:
        m = builder.add(start, loop.index)
        x = builder.load(builder.gep(pa, [m]))
        if pb is None:
            builder.store(builder.fadd(builder.load(s), x), s)
        else:
            term = [x, builder.load(builder.gep(pb, [m])), builder.load(s)]
            builder.store(builder.call(_fma_fn(builder.module, _F32), term), s)
    return builder.load(s)


def _is_f32_array(a):
    return isinstance(a, types.Array) and a.dtype == types.float32


def _data_at(context, builder, aryty, ary, offset, offty):
    data = context.make_array(aryty)(context, builder, ary).data
    return builder.gep(data, [context.cast(builder, offset, offty, types.int64)])


@intrinsic
def dot(typingctx, a, ao, b, bo, n):
    """sum(a.flat[ao:ao+n] * b.flat[bo:bo+n]) in float32, as gcc -Ofast vectorizes `s += a[i] * b[i]`
    (_reduce_ir). a, b: C-contiguous float32 arrays of any shape, addressed by flat offsets.

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
        return _reduce_ir(context, builder, pa, pb, context.cast(builder, args[4], ty[4], types.int64), None)

    return types.float32(a, ao, b, bo, n), codegen


@intrinsic
def vsum(typingctx, x, o, n, s):
    """s + sum(x.flat[o:o+n]) as gcc -Ofast vectorizes `s += x[i]` (s joins after the fold)."""
    if not (_is_f32_array(x) and s == types.float32):
        return None

    def codegen(context, builder, signature, args):
        ty = signature.args
        px = _data_at(context, builder, ty[0], args[0], args[1], ty[1])
        return _reduce_ir(context, builder, px, None, context.cast(builder, args[2], ty[2], types.int64), args[3])

    return types.float32(x, o, n, s), codegen


@njit(**OJIT)
def vexp_shifted(x, o, n, m):
    """x[o:o+n] = expf(x - m), each element through the implementation its position gets:
    libmvec's 16-lane expf for whole blocks of 16, the 8-lane one for a block of 8, libm's after."""
    for j in range(o, o + n):
        x[j] = x[j] - m
    n16 = n // 16
    for c in range(n16):
        exp16(x, o + 16 * c)
    j = o + 16 * n16
    if o + n - j >= 8:
        exp8(x, j)
        j += 8
    for k in range(j, o + n):
        x[k] = np.exp(x[k])


@njit(**OJIT)
def softmax(x, n, peel_first):
    """In-place softmax of x[:n] (run.c's: max, expf(x - max) and their sum, then x * (1 / sum)).

    peel_first: gcc peels element 0 off the exp loop in the attention softmax it inlines into
    forward() (scalar expf, the vector loop starts at 1), not in the sampler's.
    """
    m = x[0]
    for i in range(1, n):
        m = max(m, x[i])
    if peel_first:
        x[0] = np.exp(x[0] - m)
        vexp_shifted(x, 1, n - 1, m)
        total = vsum(x, 1, n - 1, x[0])
    else:
        vexp_shifted(x, 0, n, m)
        total = vsum(x, 0, n, f32(0.0))
    inv = f32(1.0) / total
    for i in range(n):
        x[i] *= inv
