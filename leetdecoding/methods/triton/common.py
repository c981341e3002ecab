"""Host-side numerics shared by the Triton kernels: decay tables, head-dim blocks, dtypes and constexpr flags,
output buffers and the checks of packed inputs that size them. How kernels are launched is in `launching`; the
in-kernel pieces are in `prologue` and `tile_math`.

Imported only when a Triton method runs (never by `import leetdecoding`). Like every helper module of this
package it imports none of the kernel modules or `ops`, so the imports point one way (no cycle).
"""

from __future__ import annotations

import os

import torch
import triton.language as tl

from ...decay import finite_log
from ...gates import negligible
from ...inputs import compute_dtype_for
from ..base import empty_output
from .tile_math import LOW, SPLIT_BF16, SPLIT_TF32, WIDE

INTERPRET = os.environ.get("TRITON_INTERPRET", "") == "1"

# Accuracy of the tl.dot calls that meet an fp32 operand (decayed scores, a state) and an input tile:
#   "accurate": about fp32 accuracy (default). fp32 inputs: three TF32 tensor-core products (tf32x3); 16-bit
#               inputs: the fp32 operand split as hi + lo (`split_hi_lo`), two products with the input tile
#               exact (about 2^-17 relative for bf16, 2^-21 for fp16);
#   "ieee":     true fp32 products (CUDA cores, slowest);
#   "fast":     the fp32 operand rounded to the input dtype (TF32 for fp32 inputs), one product, as fla does:
#               fastest, about one rounding of the input dtype more error than the contract's tolerance allows.
PRECISIONS = ("accurate", "ieee", "fast")


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


def token_log_decays(log_decay: torch.Tensor) -> tuple:
    """The chunked kernels' per-token arguments (g, sgb, sgh, sgn, neg): a (B, H, N) log decay (any strides) and
    the threshold below which a log decay is a reset (`leetdecoding.gates.negligible`, as the torch methods
    count them); placeholders for a per-head (H,) one."""
    if log_decay.ndim != 3:
        return log_decay, 0, 0, 0, 0.0
    return log_decay, *log_decay.stride(), negligible(log_decay.dtype)


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def dim_block(d: int) -> int:
    """A head dim padded to a power of two, at least 16 (tl.dot's smallest operand side)."""
    return max(16, next_pow2(d))


def acc_dtype(dtype: torch.dtype):
    """The accumulation dtype in the kernel: fp64 for fp64 inputs (interpreter only), fp32 otherwise."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def dtype_flags(dtype: torch.dtype) -> dict:
    """The constexpr flags every kernel takes for its input dtype: ACC, the accumulation dtype, and ROUND_BF16,
    round bf16 outputs with `tile_math.round_to_bf16` (the interpreter only: its own cast truncates)."""
    return {"ACC": acc_dtype(dtype), "ROUND_BF16": INTERPRET and dtype == torch.bfloat16}


def dot_flags(dtype: torch.dtype, precision: str) -> dict:
    """`dtype_flags` and the flags of the kernels' products: PREC (input_precision of the fp32 dots), NATIVE_QK
    and MODE (of `tile_math.mixed_dot`).

    NATIVE_QK: q k^T (and the like) multiply the 16-bit inputs directly (exact products, fp32 accumulation).
    The interpreter's bf16 tl.dot is broken, so there every bf16 operand is widened first.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}; got {precision!r}.")
    sixteen = dtype in (torch.float16, torch.bfloat16)
    native = sixteen and not INTERPRET
    if dtype == torch.float64:
        prec, mode = "ieee", WIDE
    elif precision == "ieee" or not sixteen:
        prec, mode = {"accurate": "tf32x3", "ieee": "ieee", "fast": "tf32"}[precision], WIDE
    elif precision == "fast":
        prec, mode = "tf32", LOW if native else WIDE
    else:
        prec, mode = "tf32x3", SPLIT_BF16 if native and dtype == torch.bfloat16 else SPLIT_TF32
    return {"PREC": prec, "NATIVE_QK": native, "MODE": mode, **dtype_flags(dtype)}


def forward_buffers(q: torch.Tensor, v: torch.Tensor, rows: int, output_final_state: bool):
    """A forward's outputs: o (B, H, N, Dv) in q's dtype (`empty_output`) and the final state (rows, H, Dk, Dv) in
    the accumulation dtype, or an empty tensor when it is not asked for."""
    B, H, N, Dk = q.shape
    o = empty_output((B, H, N, v.shape[-1]), q.dtype, q.device)
    shape = (rows, H, Dk, v.shape[-1]) if output_final_state else (0,)
    return o, torch.empty(shape, dtype=compute_dtype_for(q.dtype), device=q.device)


def packed_rows(q: torch.Tensor, cu_seqlens: torch.Tensor | None, **states: torch.Tensor | None) -> int:
    """Rows of the per-sequence states: B, or with `cu_seqlens` the number of packed sequences S. These are the
    operators' own checks (leetdecoding.attention validates more before it gets here); no device sync."""
    if cu_seqlens is None:
        return q.shape[0]
    if cu_seqlens.ndim != 1 or cu_seqlens.numel() < 2 or cu_seqlens.device != q.device:
        raise ValueError(
            f"cu_seqlens must be 1-D with S + 1 >= 2 offsets on {q.device}; got shape {tuple(cu_seqlens.shape)} "
            f"on {cu_seqlens.device}."
        )
    if q.shape[0] != 1:
        raise ValueError(f"with cu_seqlens, q, k, v must be packed as batch 1; got batch {q.shape[0]}.")
    rows = cu_seqlens.numel() - 1
    for name, state in states.items():
        if state is not None and state.shape[0] != rows:
            raise ValueError(f"{name} must have one row per sequence ({rows}); got shape {tuple(state.shape)}.")
    return rows
