"""Every method against the fp64 reference on this machine: the engine behind `leetdecoding check`."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

import leetdecoding as ld

from ..inputs import compute_dtype_for, dtype_name, validate
from ..methods import REGISTRY, Method
from ..methods.naive import TOLERANCE, Reference, reference, relative_error

# One head per decay of interest: none, a long memory, a short one, almost none.
DECAYS = (1.0, 1.0 - 2.0**-12, 0.5, 1e-6)
LENGTHS = (1, 65, 300)
QUICK_LENGTHS = (1, 65)
BATCH, DK, DV = 2, 60, 96
SCALE = 0.125


def decays() -> torch.Tensor:
    """The per-head decays in fp64, so that fp64 runs see exactly the reference's values."""
    return torch.tensor(DECAYS, dtype=torch.float64)


def token_decays(n: int) -> torch.Tensor:
    """Per-token decays (BATCH, H, n) in fp64: each head's decay times a seeded factor in [0.5, 1] per token, and a
    reset (0) at token n // 2 of the first sequence."""
    g = torch.Generator().manual_seed(2000 + n)
    lam = decays().view(1, -1, 1) * (0.5 + 0.5 * torch.rand(BATCH, len(DECAYS), n, generator=g, dtype=torch.float64))
    if n > 1:
        lam[0, :, n // 2] = 0.0
    return lam


@dataclass
class CheckResult:
    method: str
    dtype: str
    status: str  # "PASS", "FAIL" or "SKIP"
    worst: float | None  # worst error as a multiple of the tolerance
    detail: str  # where the worst error is, or why the method was skipped or failed


@dataclass
class Case:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    initial_state: torch.Tensor
    decay: torch.Tensor
    ref: Reference


@functools.cache
def _case(n: int, dtype: torch.dtype, device: str, per_token: bool = False) -> Case:
    """Seeded inputs in `dtype` on `device` (a decay per head, or per token), and the fp64 reference computed from
    exactly those values."""
    g = torch.Generator().manual_seed(1000 + n)
    h = len(DECAYS)
    q, k = (torch.randn(BATCH, h, n, DK, generator=g, dtype=torch.float64).to(dtype) for _ in range(2))
    v = torch.randn(BATCH, h, n, DV, generator=g, dtype=torch.float64).to(dtype)
    s0 = torch.randn(BATCH, h, DK, DV, generator=g, dtype=torch.float64).to(compute_dtype_for(dtype))
    decay = token_decays(n) if per_token else decays()
    ref = reference(q, k, v, decay, s0, SCALE)
    q, k, v, s0 = (t.to(device) for t in (q, k, v, s0))
    return Case(q, k, v, s0, decay, ref)


def _refusal(method: Method, dtype: torch.dtype, device: str, per_token: bool) -> list[str]:
    c = _case(1, dtype, device, per_token)
    x = validate(c.q, c.k, c.v, c.decay, None, SCALE, c.initial_state, True)
    return method.not_supported_reasons(x)


def tolerances(dtype: torch.dtype) -> tuple[float, float]:
    """The contract's tolerance for the output (the input dtype) and for the final state (the compute dtype)."""
    return TOLERANCE[dtype], TOLERANCE[compute_dtype_for(dtype)]


def check_method(method: Method, dtype: torch.dtype, device: str, lengths=LENGTHS, per_token=False) -> CheckResult:
    """Run `method` in `dtype` on every length (with a decay per token: `per_token`); the worst output or state
    error decides PASS or FAIL."""
    name = dtype_name(dtype) + (" per-token" if per_token else "")
    reasons = _refusal(method, dtype, device, per_token)
    if reasons:
        return CheckResult(method.name, name, "SKIP", None, "; ".join(reasons))
    tol_o, tol_s = tolerances(dtype)
    worst, where = 0.0, ""
    for n in lengths:
        c = _case(n, dtype, device, per_token)
        try:
            o, state = ld.attention(
                c.q, c.k, c.v, c.decay, method=method.name, scale=SCALE,
                initial_state=c.initial_state, output_final_state=True,
            )
        except ld.MethodRefusedError as e:
            return CheckResult(method.name, name, "SKIP", None, str(e))
        except Exception as e:  # a crash is a failure to report, not a reason to stop checking the others
            return CheckResult(method.name, name, "FAIL", None, f"N={n}: {type(e).__name__}: {e}")
        if state is None:
            return CheckResult(method.name, name, "FAIL", None, f"N={n}: no final state returned")
        for what, ratio in (
            ("output", relative_error(o, c.ref.o, c.ref.o_abs) / tol_o),
            ("state", relative_error(state, c.ref.state, c.ref.state_abs) / tol_s),
        ):
            if ratio > worst or not where:
                worst, where = ratio, f"N={n} {what}"
    return CheckResult(method.name, name, "PASS" if worst <= 1.0 else "FAIL", worst, where)


def run_check(
    device: str = "cpu",
    quick: bool = False,
    methods: list[str] | None = None,
) -> list[CheckResult]:
    """Check each method (default: all registered) in every dtype it declares."""
    lengths = QUICK_LENGTHS if quick else LENGTHS
    names = methods if methods is not None else list(REGISTRY)
    per_token = [(n, d, True) for n in names if REGISTRY[n].per_token_decay for d in REGISTRY[n].dtypes]
    cases = [(n, d, False) for n in names for d in REGISTRY[n].dtypes] + per_token
    return [check_method(REGISTRY[n], d, device, lengths, p) for n, d, p in cases]
