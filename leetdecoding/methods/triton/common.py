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

INTERPRET = os.environ.get("TRITON_INTERPRET", "") == "1"

# The combine function of tl.sum. `tl.reduce(x, axis, SUM)` is tl.sum without the nested jit call.
SUM = tl.standard._sum_combine

# Accuracy of the tl.dot calls whose operands are fp32 (the decayed scores, the fp32 state):
#   "tf32x3": three TF32 tensor-core products, close to fp32 accuracy (default);
#   "ieee":   true fp32 (CUDA cores, slowest);
#   "fast":   operands rounded to the input dtype (bf16 / fp16; TF32 for fp32 inputs), as fla does: fastest,
#             about one rounding of the input dtype more error than the contract's tolerance allows.
PRECISIONS = ("tf32x3", "ieee", "fast")


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


def dot_flags(dtype: torch.dtype, precision: str) -> tuple[str, bool, bool]:
    """(input_precision for fp32 dots, NATIVE_QK, LOW_PRECISION) for the kernels.

    NATIVE_QK: q k^T (and the like) multiply the 16-bit inputs directly (exact products, fp32 accumulation).
    The interpreter's bf16 tl.dot is broken, so there every operand is converted to fp32 first.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}; got {precision!r}.")
    sixteen = dtype in (torch.float16, torch.bfloat16)
    native = sixteen and not INTERPRET
    if dtype == torch.float64:
        return "ieee", False, False
    if precision == "fast":
        return "tf32", native, native
    return precision, native, False


def strides(t: torch.Tensor | None, ndim: int = 4) -> tuple[int, ...]:
    """The strides of a (B, H, N, D) tensor; a (B, H, D) decode input gets a zero stride for N."""
    if t is None:
        return (0,) * ndim
    if t.ndim == 3 and ndim == 4:
        sb, sh, sd = t.stride()
        return sb, sh, 0, sd
    return tuple(t.stride())


def launcher(kernel):
    """The kernel to launch: `torch.library.wrap_triton(kernel)` where the ops are triton_ops (so that
    torch.compile sees the kernel), the kernel itself otherwise."""
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
    "dim_block",
    "dot_flags",
    "empty_output",
    "launch",
    "launcher",
    "next_pow2",
    "strides",
    "torch_acc_dtype",
    "triton",
    "warps",
]
