"""How the Triton kernels are launched: strides, the scale argument, the launch wrapper (plain, through
`torch.library.wrap_triton`, or compile-only for `leetdecoding.bench.compile_check`), and the OutOfResources
fallback over launch variants.

Imports `common` only (never `ops` or a kernel module), so the package's imports point one way.
"""

from __future__ import annotations

import torch

from .common import INTERPRET

# torch >= 2.6 on a GPU: the ops are torch.library.triton_ops and launch through wrap_triton, so that
# torch.compile sees the kernels themselves (see `ops`); opaque custom_ops otherwise.
USE_TRITON_OP = hasattr(torch.library, "triton_op") and hasattr(torch.library, "wrap_triton") and not INTERPRET


def strides(t: torch.Tensor | None, ndim: int = 4) -> tuple[int, ...]:
    """The strides of a (B, H, N, D) tensor; a (B, H, D) decode input gets a zero stride for N."""
    if t is None:
        return (0,) * ndim
    if t.ndim == 3 and ndim == 4:
        sb, sh, sd = t.stride()
        return sb, sh, 0, sd
    return tuple(t.stride())


def kernel_scale(scale: float, dtype: torch.dtype) -> float:
    """The scale a kernel applies: a Python float reaches a kernel as fp32, so with fp64 inputs the kernel applies
    1.0 and `scale_fp64` the true scale afterwards."""
    return 1.0 if dtype == torch.float64 else scale


def scale_fp64(out: torch.Tensor, scale: float) -> None:
    if out.dtype == torch.float64 and scale != 1.0:
        out.mul_(scale)


# Set by the developer tool `leetdecoding.bench.compile_check` to compile for a GPU that is not here instead of
# launching (nothing in the runtime sets it).
COMPILE_ONLY = None


def launcher(kernel):
    """The kernel to launch: `torch.library.wrap_triton(kernel)` where the ops are triton_ops (so that
    torch.compile sees the kernel), the kernel itself otherwise."""
    if COMPILE_ONLY is not None:
        return COMPILE_ONLY(kernel)
    return torch.library.wrap_triton(kernel) if USE_TRITON_OP else kernel


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


def pipeline_stages(dtype: torch.dtype) -> int:
    return 2 if dtype == torch.float32 else 3


def warps(elements: int) -> int:
    """num_warps for a program whose largest register tile has this many elements."""
    if INTERPRET:
        return 1
    return 4 if elements <= 64 * 64 else 8
