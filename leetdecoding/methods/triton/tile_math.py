"""In-kernel arithmetic on tiles shared by the Triton kernels: sums, the products that meet an fp32 operand,
bf16 rounding.

Sums are `tl.reduce(x, axis, _sum_combine)` (the interpreter's numpy fast path: under `TRITON_INTERPRET=1` every nested
`@triton.jit` call costs about a millisecond) instead of `tl.sum`; on the GPU both compile to the same reduction.
"""

from __future__ import annotations

import triton
import triton.language as tl

# The combine function of tl.sum. `tl.reduce(x, axis, _sum_combine)` is tl.sum without the nested jit call.
# Under its own name: torch.compile's inductor writes a user kernel out with the jit functions it calls, by their
# names, so an alias (SUM = ...) is undefined there ("NameError: SUM is not defined" on an H200, 2026-11-30).
_sum_combine = tl.standard._sum_combine

# how `mixed_dot` multiplies (the MODE flag of the kernels; `common.dot_flags` chooses it)
WIDE, SPLIT_BF16, SPLIT_TF32, LOW = 0, 1, 2, 3


@triton.jit
def input_dot(a, b, NATIVE_QK: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr):
    """a @ b for two tiles of the inputs (q k^T and the like): with NATIVE_QK the 16-bit tiles multiplied
    directly (exact products, fp32 accumulation), otherwise widened to ACC first."""
    if NATIVE_QK:
        out = tl.dot(a, b)
    else:
        out = tl.dot(a.to(ACC), b.to(ACC), input_precision=PREC)
    return out


@triton.jit
def split_hi_lo(w, MODE: tl.constexpr):
    """w (fp32) as hi + lo for `mixed_dot`'s split modes. SPLIT_BF16 (1): hi and lo in bf16, w - hi - lo about
    2^-17 |w|. SPLIT_TF32 (2): hi = w with its 13 low mantissa bits cleared (exact in TF32) and lo = w - hi exactly
    in fp32; the TF32 product rounds lo once more (about 2^-21 |w| in all)."""
    if MODE == 1:
        hi = w.to(tl.bfloat16)
        lo = (w - hi.to(tl.float32)).to(tl.bfloat16)
    else:
        hi = (w.to(tl.int32, bitcast=True) & -8192).to(tl.float32, bitcast=True)
        lo = w - hi
    return hi, lo


@triton.jit
def mixed_dot(w, x, W_FIRST: tl.constexpr, MODE: tl.constexpr, PREC: tl.constexpr):
    """w @ x (W_FIRST) or x @ w, for w in the accumulation dtype and x a tile of the inputs (any dtype).

    WIDE (0): x widened to w's dtype, one dot at PREC. LOW (3): w rounded to x's dtype, one native dot.
    SPLIT_BF16 (1) / SPLIT_TF32 (2): w split by `split_hi_lo` and two dots in which x is exact (16-bit inputs are
    exact in TF32): about 2^-17 (bf16) or 2^-21 (TF32) relative error per product.
    """
    # (one return at the end: the compiler does not stop at a return inside a branch)
    if MODE == 1 or MODE == 2:
        hi, lo = split_hi_lo(w, MODE)
        if MODE == 2:
            x = x.to(tl.float32)
        if W_FIRST:
            out = tl.dot(hi, x, input_precision="tf32") + tl.dot(lo, x, input_precision="tf32")
        else:
            out = tl.dot(x, hi, input_precision="tf32") + tl.dot(x, lo, input_precision="tf32")
    elif MODE == 3:
        w = w.to(x.dtype)
        if W_FIRST:
            out = tl.dot(w, x)
        else:
            out = tl.dot(x, w)
    else:
        x = x.to(w.dtype)
        if W_FIRST:
            out = tl.dot(w, x, input_precision=PREC)
        else:
            out = tl.dot(x, w, input_precision=PREC)
    return out


@triton.jit
def round_to_bf16(x):
    """fp32 -> bf16 rounding to nearest even, in integer arithmetic. The interpreter's own fp32 -> bf16 cast
    truncates (up to twice the rounding error); kernels use this there only (flag ROUND_BF16)."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True).to(tl.bfloat16)
