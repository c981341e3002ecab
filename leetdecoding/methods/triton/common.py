"""Host-side pieces shared by the Triton kernels: tile sizes, dtypes, strides and the launch wrapper.

Imported only when a Triton method runs (never by `import leetdecoding`). Kernel habits used throughout:
explicit offsets and masks on every load and store, 64-bit batch/head offsets, the sequence length and
every stride that can depend on it marked `do_not_specialize`, constexpr feature flags instead of copied
kernels, every decay factor exp(non-positive).

Under `TRITON_INTERPRET=1` the kernels run on CPU tensors in Triton's interpreter. There, every call of a
`@triton.jit` helper costs about a millisecond (the interpreter re-patches the language on each call), so the
kernels inline their arithmetic and sum with `tl.reduce(x, axis, SUM)` (the interpreter's numpy fast path)
instead of `tl.sum`; on the GPU both compile to the same reduction.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ...decay import finite_log

INTERPRET = os.environ.get("TRITON_INTERPRET", "") == "1"

# The combine function of tl.sum. `tl.reduce(x, axis, SUM)` is tl.sum without the nested jit call.
SUM = tl.standard._sum_combine

# Accuracy of the tl.dot calls that meet an fp32 operand (decayed scores, a state) and an input tile:
#   "accurate": about fp32 accuracy (default). fp32 inputs: three TF32 tensor-core products (tf32x3); 16-bit
#               inputs: the fp32 operand split as hi + lo (`split_hi_lo`), two products with the input tile
#               exact (about 2^-17 relative for bf16, 2^-21 for fp16);
#   "ieee":     true fp32 products (CUDA cores, slowest);
#   "fast":     the fp32 operand rounded to the input dtype (TF32 for fp32 inputs), one product, as fla does:
#               fastest, about one rounding of the input dtype more error than the contract's tolerance allows.
PRECISIONS = ("accurate", "ieee", "fast")

# how `mixed_dot` multiplies (the MODE flag of the kernels)
WIDE, SPLIT_BF16, SPLIT_TF32, LOW = 0, 1, 2, 3


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


def round_bf16(dtype: torch.dtype) -> bool:
    return INTERPRET and dtype == torch.bfloat16


def decay_power(log_decay: torch.Tensor, power: int) -> torch.Tensor:
    """lambda^power per head as an unevaluated sum hi + lo, shaped (H, 2), in the kernels' accumulation dtype.

    The state decays by this factor every chunk (every token in the recurrence), so a rounding error in it would
    compound over the sequence (a 2-ulp exp compounds to ~1e-5 relative error at lambda = 1 - 2^-12). As
    hi + lo it is exact to about 2^-48 whatever the accuracy of the device's exp; computed here in fp64.
    """
    p = torch.exp(log_decay.detach().double() * power)
    if log_decay.dtype == torch.float64:
        return torch.stack([p, torch.zeros_like(p)], -1)
    hi = p.float()
    return torch.stack([hi, (p - hi.double()).float()], -1)


def split_log_decay(log_decay: torch.Tensor) -> torch.Tensor:
    """log lambda per head as g_hi + g_lo, shaped (H, 2), in the kernels' accumulation dtype, for the in-kernel
    decay factors lambda^e = exp(g_hi e) * exp(g_lo e), e an integer in [0, 256) (a position in a chunk).

    exp(g e) would round the exponent g e first: an absolute error of |g e| ulp, which exp turns into a relative
    one (2.6e-6 at lambda = 0.5, e = 63: more than the fp32 tolerance, in a factor that can be a whole output
    element). g_hi keeps all but the last 8 significant bits of g, so g_hi e is exact; g_lo e is tiny and nearly
    exact. Clamped first (`decay.finite_log`): with g = -inf, e = 0 would give -inf * 0 = NaN where lambda^0 = 1.
    """
    g = finite_log(log_decay.detach()).contiguous()
    bits = g.view(torch.int64 if g.dtype == torch.float64 else torch.int32)
    hi = (bits & -256).view(g.dtype)
    return torch.stack([hi, g - hi], -1)


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def dim_block(d: int) -> int:
    """A head dim padded to a power of two, at least 16 (tl.dot's smallest operand side)."""
    return max(16, next_pow2(d))


def acc_dtype(dtype: torch.dtype):
    """The accumulation dtype in the kernel: fp64 for fp64 inputs (interpreter only), fp32 otherwise."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def torch_acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def dot_flags(dtype: torch.dtype, precision: str) -> tuple[str, bool, int]:
    """(input_precision of the fp32 dots, NATIVE_QK, MODE of `mixed_dot`) for the kernels.

    NATIVE_QK: q k^T (and the like) multiply the 16-bit inputs directly (exact products, fp32 accumulation).
    The interpreter's bf16 tl.dot is broken, so there every bf16 operand is widened first.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}; got {precision!r}.")
    if dtype == torch.float64:
        return "ieee", False, WIDE
    sixteen = dtype in (torch.float16, torch.bfloat16)
    native = sixteen and not INTERPRET
    if precision == "ieee" or not sixteen:
        return {"accurate": "tf32x3", "ieee": "ieee", "fast": "tf32"}[precision], native, WIDE
    if precision == "fast":
        return "tf32", native, LOW if native else WIDE
    return "tf32x3", native, SPLIT_BF16 if native and dtype == torch.bfloat16 else SPLIT_TF32


def strides(t: torch.Tensor | None, ndim: int = 4) -> tuple[int, ...]:
    """The strides of a (B, H, N, D) tensor; a (B, H, D) decode input gets a zero stride for N."""
    if t is None:
        return (0,) * ndim
    if t.ndim == 3 and ndim == 4:
        sb, sh, sd = t.stride()
        return sb, sh, 0, sd
    return tuple(t.stride())


# Set by `leetdecoding.methods.triton.compile_check` to compile for a GPU that is not here instead of launching.
COMPILE_ONLY = None


def launcher(kernel):
    """The kernel to launch: `torch.library.wrap_triton(kernel)` where the ops are triton_ops (so that
    torch.compile sees the kernel), the kernel itself otherwise."""
    if COMPILE_ONLY is not None:
        return COMPILE_ONLY(kernel)
    from . import ops

    return ops.wrap(kernel)


# key -> index of the first launch variant that compiled on this device (see `launch`)
_WORKING_VARIANT: dict = {}


def launch(key, variants, run) -> None:
    """Run `run(variant)` with the first of `variants` (fastest first, leanest last) that fits the device.

    On a GPU a variant that needs more shared memory or registers than the device has fails when it is first
    compiled, with OutOfResources: the next one is tried, and the first that works is remembered for `key`.
    The interpreter has no such limits (and gets one variant).
    """
    from triton.runtime.errors import OutOfResources

    first = _WORKING_VARIANT.get(key, 0)
    for i in range(first, len(variants)):
        try:
            run(variants[i])
        except OutOfResources:
            if i == len(variants) - 1:
                raise
            continue
        _WORKING_VARIANT[key] = i
        return


def chunk_variants(bt: int, stages: int) -> list[tuple[int, int]]:
    """(BT, num_stages) to try: as given, then without software pipelining, then smaller chunks (down to 16)."""
    if INTERPRET:
        return [(bt, 1)]
    out = [(bt, stages), (bt, 1)]
    while bt > 16:
        bt //= 2
        out.append((bt, 1))
    return out


def warps(elements: int) -> int:
    """num_warps for a program whose largest register tile has this many elements."""
    if INTERPRET:
        return 1
    return 4 if elements <= 64 * 64 else 8


def empty_output(shape, dtype, device) -> torch.Tensor:
    """An output buffer: NaN-filled when the tests ask (so that an unwritten row cannot hide)."""
    from .. import base

    if base.FILL_UNWRITTEN_WITH_NAN:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


__all__ = [
    "INTERPRET",
    "PRECISIONS",
    "SUM",
    "acc_dtype",
    "chunk_variants",
    "decay_power",
    "round_bf16",
    "round_to_bf16",
    "split_hi_lo",
    "split_log_decay",
    "dim_block",
    "dot_flags",
    "empty_output",
    "launch",
    "launcher",
    "mixed_dot",
    "next_pow2",
    "strides",
    "torch_acc_dtype",
    "triton",
    "warps",
]
