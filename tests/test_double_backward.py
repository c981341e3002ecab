"""Second derivatives (create_graph=True): exact for every torch method with gradients, across the 64-token
boundaries where chunked keeps piece-start states and recurrent its checkpoints; a clear error for the Triton
kernels, whose backward has no graph. Checked by gradgradcheck in fp64 and by Hessian-vector products against
autograd through the closed-form fp64 reference."""

from __future__ import annotations

import pytest
import torch

import leetdecoding as ld
from leetdecoding.methods import REGISTRY
from leetdecoding.methods.naive import reference_closed_form

from .runnable import RUNNABLE_ON_CPU

TORCH_GRAD_METHODS = [n for n, m in REGISTRY.items() if m.supports_grad and m.backend == "torch"]
TRITON_GRAD_METHODS = [n for n in RUNNABLE_ON_CPU if REGISTRY[n].supports_grad and REGISTRY[n].backend == "triton"]
LENGTHS = [1, 5, 65, 130]


def leaves(n, seed=0):
    """q, k (1, 2, n, 3), v (1, 2, n, 2), log_decay (2,), initial_state (1, 2, 3, 2): fp64 leaves requiring grad."""
    g = torch.Generator().manual_seed(seed + n)
    q, k, v = (torch.randn(1, 2, n, d, generator=g, dtype=torch.float64) for d in (3, 3, 2))
    s0 = torch.randn(1, 2, 3, 2, generator=g, dtype=torch.float64)
    log_decay = torch.tensor([-0.05, -0.4], dtype=torch.float64)
    return [t.requires_grad_() for t in (q, k, v, log_decay, s0)]


def call(method, **options):
    def f(q, k, v, log_decay, s0):
        return ld.attention(
            q, k, v, log_decay=log_decay, initial_state=s0, scale=0.7, method=method, output_final_state=True,
            **options,
        )  # fmt: skip

    return f


def hessian_vector_product(f, inputs, seed=1):
    """d/dx <grad_x L, u> for L = sum(w_o * o^2) + <w_s, S>, u and w random: every second derivative of f."""
    g = torch.Generator().manual_seed(seed)
    o, state = f(*inputs)
    w_o = torch.randn(o.shape, generator=g, dtype=o.dtype)
    w_s = torch.randn(state.shape, generator=g, dtype=state.dtype)
    grads = torch.autograd.grad((w_o * o * o).sum() + (w_s * state).sum(), inputs, create_graph=True)
    us = [torch.randn(t.shape, generator=g, dtype=t.dtype) for t in inputs]
    return torch.autograd.grad(sum((a * u).sum() for a, u in zip(grads, us)), inputs)


def closed_form(q, k, v, log_decay, s0):
    return reference_closed_form(q, k, v, log_decay, s0, scale=0.7)


def assert_same_products(label, f, ref, inputs):
    ours, expected = hessian_vector_product(f, inputs), hessian_vector_product(ref, inputs)
    for name, a, b in zip(("q", "k", "v", "log_decay", "initial_state"), ours, expected):
        err = ((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()
        assert err < 1e-10, f"{label}: second derivative towards {name}: relative error {err:.2e}"


def test_hessian_vector_products_match_closed_form():
    for method in TORCH_GRAD_METHODS:
        for n in LENGTHS:
            if method == "recurrent" and n > 65:
                continue  # a per-token Python loop: 65 crosses its checkpoint boundary
            assert_same_products(f"{method} N={n}", call(method), closed_form, leaves(n))


@pytest.mark.parametrize("method", ["chunked", "recurrent"])
def test_double_backward_with_q_is_k(method):
    """One tensor passed as q and k (each use gets its own gradient, summed by autograd)."""
    q, _, v, log_decay, s0 = leaves(70)
    f, inputs = call(method), [q, v, log_decay, s0]
    ours = hessian_vector_product(lambda q, v, g, s0: f(q, q, v, g, s0), inputs)
    ref = hessian_vector_product(lambda q, v, g, s0: closed_form(q, q, v, g, s0), inputs)
    for a, b in zip(ours, ref):
        assert ((a - b).abs().max() / b.abs().max()).item() < 1e-10


# the methods with a custom autograd.Function (vanilla and recursion are plain autograd: the products above cover them)
@pytest.mark.parametrize("method,n", [("chunked", 70), ("recurrent", 65)])
def test_gradgradcheck(method, n):
    assert torch.autograd.gradgradcheck(call(method), leaves(n), eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)


@pytest.mark.parametrize("method", ["chunked", "recurrent"])
def test_double_backward_across_pieces(method):
    """Packed sequences and checkpoints chain the state from call to call, each piece crossing 64 tokens."""
    q, k, v, log_decay, _ = leaves(150)
    s0 = torch.randn(2, 2, 3, 2, dtype=torch.float64, requires_grad=True)
    bounds = ((0, 140), (140, 150))
    options = {"cu_seqlens": torch.tensor([0, 140, 150]), "state_checkpoints": [70]}

    def ref(q, k, v, g, s0):
        pieces = [closed_form(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], g, s0[i : i + 1])
                  for i, (a, b) in enumerate(bounds)]  # fmt: skip
        return torch.cat([p[0] for p in pieces], dim=2), torch.cat([p[1] for p in pieces])

    def ours(*t):
        return call(method, **options)(*t)[:2]

    assert_same_products(method, ours, ref, [q, k, v, log_decay, s0])


@pytest.mark.parametrize("method", TRITON_GRAD_METHODS)
def test_triton_double_backward_is_refused(method):
    inputs = leaves(5)
    o, state = call(method)(*inputs)
    grads = torch.autograd.grad(o.sum() + state.sum(), inputs, create_graph=True)  # first derivatives: fine
    plain = torch.autograd.grad(sum(t.sum() for t in call(method)(*inputs)), inputs)
    for a, b in zip(grads, plain):
        assert torch.equal(a, b)
    with pytest.raises(RuntimeError, match=rf"double backward .*not supported by method '{method}'.*'chunked'"):
        torch.autograd.grad(grads[1].sum(), inputs[2])
