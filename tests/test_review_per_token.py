"""Review of per-token decays (leetdecoding.gates): inputs where a method was wrong, each against the fp64
recurrence (leetdecoding.methods.naive.reference, or autograd of an fp64 recurrence for gradients)."""

from __future__ import annotations

import pytest
import torch

import leetdecoding as ld
from leetdecoding.methods.naive import reference

from .reference import assert_close


def _large_shallow_problem(magnitude: float):
    """fp32 q and k of `magnitude` (|q_t . k_s| ~ magnitude^2, far inside fp32's range), v ~ 1, and log decays that
    sum to -39 over 64 tokens: one shallow block (gates.SHALLOW) where exp(-G_s) reaches exp(39) ~ 9e16."""
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(2, 2, 64, 4, generator=g, dtype=torch.float64) * magnitude for _ in range(2))
    v = torch.randn(2, 2, 64, 3, generator=g, dtype=torch.float64)
    log_decay = torch.full((2, 2, 64), -39.0 / 64, dtype=torch.float64)
    log_decay[1, 1] *= torch.rand(64, generator=g, dtype=torch.float64)  # another decay for one row and head
    return q, k, v, log_decay


@pytest.mark.parametrize("requires_grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("method", ["chunked", "vanilla"])
def test_shallow_block_with_large_queries_and_keys_stays_finite(method, requires_grad):
    """q, k ~ 1e11 in fp32 (outputs ~ 1e23): the shallow block's fused scores (q_t e^{G_t}) . (k_s e^{-G_s})
    overflow above the diagonal (s > t, a factor e^{G_t - G_s} up to e^39), and inf times the causal mask's 0
    was NaN in every output of the block (the per-head decay has no such limit)."""
    q, k, v, log_decay = _large_shallow_problem(1e11)
    ref = reference(q, k, v, torch.exp(log_decay))
    leaves = [t.float().requires_grad_(requires_grad) for t in (q, k, v, log_decay)]
    o = ld.attention(*leaves[:3], log_decay=leaves[3], method=method)
    assert_close(f"{method} output", o, ref.o, ref.o_abs, torch.float32)


def test_shallow_block_with_huge_keys_and_small_queries():
    """A shallow block raises each key by exp(-G_s) (up to exp(40) in fp32, gates.SHALLOW) before the product with q:
    keys of 1e22 overflowed to inf, though the result (~1e17) is finite. The non-finite state sends the call to the
    blocks' exp(G_t - G_s) tables (gated.blocks_in_place)."""
    q, k, v, log_decay = _large_shallow_problem(1.0)
    q, k = q * 1e-6, k * 1e22
    ref = reference(q, k, v, torch.exp(log_decay))
    o = ld.attention(q.float(), k.float(), v.float(), log_decay=log_decay.float(), method="chunked")
    assert_close("chunked output", o, ref.o, ref.o_abs, torch.float32)


def test_a_decode_decay_with_a_trailing_axis_gets_a_squeeze_hint():
    """One token's decays sliced as g[:, :, t : t + 1] are (B, H, 1); decode_step takes (B, H): the message says
    which argument, the shapes, and to squeeze the last axis (a new user met the MiniMax / fla hint there)."""
    q = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match=r"log_decay .* \(2, 3\) .* got shape \(2, 3, 1\).*log_decay\.squeeze\(-1\)"):
        ld.decode_step(q, q, q, torch.zeros(2, 3, 4, 4), log_decay=-torch.rand(2, 3, 1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_decode_step_gradient_of_a_decay_given_as_lambda_at_a_reset(dtype):
    """decode_step with a (B, H) decay= (lambda) that requires grad, 0 and 1e-20 among it: d lambda is the one-sided
    <dL/dS_new, S_old> (the step multiplies by lambda itself), as the fp64 step's autograd gives; exp(log lambda)
    gave 0 at lambda = 0."""
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 3, 4, generator=g, dtype=torch.float64) for _ in range(3))
    state = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    lam = torch.rand(2, 3, generator=g, dtype=torch.float64)
    lam[0, 1], lam[1, 2] = 0.0, 1e-20
    leaf = lam.to(dtype).requires_grad_()
    o, new = ld.decode_step(q.to(dtype), k.to(dtype), v.to(dtype), state.to(dtype), decay=leaf)
    (got,) = torch.autograd.grad(o.double().sum() + new.double().pow(2).sum(), leaf)
    ref = lam.clone().requires_grad_()
    new = ref[..., None, None] * state + k[..., :, None] * v[..., None, :]
    (want,) = torch.autograd.grad((q[..., None, :] @ new).sum() + new.pow(2).sum(), ref)
    assert want[0, 1] != 0
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    assert torch.allclose(got.double(), want, rtol=tol, atol=tol * want.abs().max().item())
