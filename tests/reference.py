"""The tests' comparison with the fp64 reference. The reference itself (the recurrence token by token with the
magnitude of the summed terms, the closed form for gradients, the tolerance table) is the package's
leetdecoding.methods.naive, shared with `leetdecoding check`, `leetdecoding bench` and the GPU benchmark.
"""

from __future__ import annotations

import torch

from leetdecoding.methods.naive import TOLERANCE

__all__ = ["assert_close"]


def assert_close(name, got, ref, ref_abs, dtype, scale=1.0):
    """|got - scale * ref| <= tol * |scale| * ref_abs elementwise (plus a tiny floor), and no NaN."""
    got = got.detach().to(torch.float64)
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values in the output"
    tol = TOLERANCE[dtype]
    bound = tol * abs(scale) * ref_abs + 1e-30
    err = (got - scale * ref).abs()
    ratio = (err / bound).max().item() if err.numel() else 0.0
    assert ratio <= 1.0, f"{name}: error {ratio:.3g} x the {dtype} tolerance (max abs err {err.max().item():.3g})"
