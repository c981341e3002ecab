"""Gradients of every method that declares them: gradcheck in fp64, and fp32 / fp64 against autograd through the
closed-form fp64 reference, decay and initial state included; refusals where a method declares none."""

from __future__ import annotations

import pytest
import torch

import leetdecoding as ld
from leetdecoding.methods import REGISTRY
from leetdecoding.methods.naive import reference_closed_form

GRAD_METHODS = [n for n, m in REGISTRY.items() if m.supports_grad and m.backend == "torch"]
LOG_DECAYS = torch.log(torch.tensor([1.0, 1 - 2**-12, 0.5, 1e-6], dtype=torch.float64))


def leaves(b, n, dk, dv, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, 4, n, d, generator=g, dtype=torch.float64) for d in (dk, dk, dv))
    s0 = torch.randn(b, 4, dk, dv, generator=g, dtype=torch.float64)
    state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    return [q.to(dtype), k.to(dtype), v.to(dtype), LOG_DECAYS.clone().to(state_dtype), s0.to(state_dtype)]


@pytest.mark.parametrize("name", GRAD_METHODS)
@pytest.mark.parametrize("n", [1, 5, 9])
def test_gradcheck_fp64(name, n):
    inputs = leaves(1, n, 3, 2, torch.float64)
    inputs[3] = inputs[3].clamp(max=-1e-4)  # finite differences need room below lambda = 1
    inputs = [t.requires_grad_() for t in inputs]

    def f(q, k, v, log_decay, s0):
        opts = {"method": name, "scale": 0.7, "initial_state": s0, "output_final_state": True}
        return ld.attention(q, k, v, log_decay=log_decay, **opts)

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("n,dk,dv", [(1, 4, 4), (63, 16, 24), (130, 60, 33), (257, 32, 32)])
@pytest.mark.parametrize("name", GRAD_METHODS)
def test_gradients_match_reference(name, n, dk, dv, dtype):
    if name == "recurrent" and n > 130:
        pytest.skip("a per-token Python loop: shorter lengths cover it")
    q, k, v, g, s0 = leaves(2, n, dk, dv, dtype, seed=n)
    gen = torch.Generator().manual_seed(1)
    do = torch.randn(2, 4, n, dv, generator=gen, dtype=torch.float64)
    ds = torch.randn(2, 4, dk, dv, generator=gen, dtype=torch.float64)

    def grads(fn, tensors):
        tensors = [t.detach().clone().requires_grad_() for t in tensors]
        o, state = fn(*tensors)
        torch.autograd.backward([o, state], [do.to(o.dtype), ds.to(state.dtype)])
        return [t.grad.double() for t in tensors]

    ours = grads(
        lambda *t: ld.attention(
            *t[:3], log_decay=t[3], initial_state=t[4], scale=0.5, method=name, output_final_state=True
        ),
        [q, k, v, g, s0],
    )
    ref = grads(
        lambda *t: reference_closed_form(*t[:3], t[3], t[4], scale=0.5), [x.double() for x in (q, k, v, g, s0)]
    )
    tol = 1e-10 if dtype == torch.float64 else 2e-4
    for label, a, b in zip(("dq", "dk", "dv", "dlog_decay", "dinitial_state"), ours, ref):
        err = ((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()
        assert err < tol, f"{name} {label}: relative error {err:.2e} > {tol}"


def test_decay_gradient_through_decay_argument():
    """decay= (lambda) as a leaf: the gradient arrives through the conversion to log lambda."""
    q, k, v, _, _ = leaves(1, 40, 8, 8, torch.float64)
    lam = torch.tensor([0.9, 0.5, 0.99, 1.0], dtype=torch.float64, requires_grad=True)
    ld.attention(q, k, v, decay=lam).sum().backward()
    lam_ref = lam.detach().clone().requires_grad_()
    reference_closed_form(q, k, v, torch.log(lam_ref))[0].sum().backward()
    assert torch.allclose(lam.grad, lam_ref.grad, rtol=1e-10)


def test_methods_without_gradients_refuse_with_reason():
    q, k, v = (torch.randn(1, 2, 8, 4, requires_grad=True) for _ in range(3))
    for name, m in REGISTRY.items():
        if not m.supports_grad:
            with pytest.raises(ld.MethodRefusedError, match="no gradient support"):
                ld.attention(q, k, v, method=name)
    assert ld.explain(q, k, v).method in GRAD_METHODS
    rows = {r["name"]: r["grad"] for r in ld.list_methods()}
    assert rows["chunked"] and rows["recurrent"] and not rows["fleet"]
