"""Subnormal inputs and partial products whose answers are normal numbers stay exact: nothing flushes subnormal
operands or partial products (a CPU flush-to-zero mode would give 0 for every case below)."""

from __future__ import annotations

import pytest
import torch

import leetdecoding as ld
from leetdecoding.methods.naive import reference_closed_form

N = 20


def _log(lam):
    return torch.log(torch.tensor([lam], dtype=torch.float64))


def _rel(got, ref):
    return ((got.double() - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("dtype,small,big", [(torch.float32, 1e-39, 1e30), (torch.float64, 1e-310, 1e300)])
@pytest.mark.parametrize("name", ["vanilla", "chunked", "recurrent", "recursion", "fleet"])
def test_subnormal_input_normal_output(name, dtype, small, big):
    """q subnormal, k huge: o_t ~ 3.5e-8 (fp32) / 3.5e-9 (fp64), normal; every method returns 0 (rel err 1.0)."""
    q = torch.full((1, 1, N, 4), small, dtype=dtype)
    k = torch.full((1, 1, N, 4), big, dtype=dtype)
    v = torch.ones(1, 1, N, 4, dtype=dtype)
    ref, _ = reference_closed_form(q, k, v, _log(0.9))
    o = ld.attention(q, k, v, decay=0.9, method=name)
    assert _rel(o, ref) < 1e-5, f"{name}: {o[0, 0, -1, 0].item()} vs {ref[0, 0, -1, 0].item()}"


@pytest.mark.parametrize("name", ["vanilla", "chunked", "recursion"])
def test_subnormal_products_summing_to_normal(name):
    """q = k = 3e-20 (normal fp32), Dk = 128: each q_i k_i = 9e-40 is subnormal, q.k = 1.15e-37 is normal, and
    o ~ 1.0e-26. vanilla, chunked, recursion (and auto) give exactly 0; recurrent and fleet are right."""
    q = torch.full((1, 1, N, 128), 3e-20)
    v = torch.full((1, 1, N, 4), 1e10)
    ref, _ = reference_closed_form(q, q, v, _log(0.9))
    o = ld.attention(q, q.clone(), v, decay=0.9, method=name)
    assert _rel(o, ref) < 1e-5, f"{name}: {o[0, 0, -1, 0].item()} vs {ref[0, 0, -1, 0].item()}"


@pytest.mark.parametrize("name", ["chunked", "recurrent"])
def test_custom_backward_keeps_normal_gradients(name):
    """A loss weight of 1e-39 (subnormal) on outputs of size ~1e6: dv ~ 9.6e-33, normal, from the custom
    backwards as from plain autograd."""
    g = torch.Generator().manual_seed(0)
    q = (torch.randn(1, 1, N, 4, generator=g) * 1e3).requires_grad_()
    k = (torch.randn(1, 1, N, 4, generator=g) * 1e3).requires_grad_()
    v = torch.randn(1, 1, N, 4, generator=g, requires_grad=True)
    w = torch.full((1, 1, N, 4), 1e-39)
    got = torch.autograd.grad((ld.attention(q, k, v, decay=0.9, method=name) * w).sum(), (q, k, v))
    o64, _ = reference_closed_form(q, k, v, _log(0.9))
    ref = torch.autograd.grad((o64 * w.double()).sum(), (q, k, v))
    errs = [_rel(a, b) for a, b in zip(got, ref)]
    assert max(errs) < 1e-5, f"{name}: relative errors of dq, dk, dv {errs}"
