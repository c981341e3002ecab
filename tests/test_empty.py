"""N = 0: a rank of a sequence-parallel run may hold no tokens. Every method (forced), auto and explain run it,
gradients included (zero-sized grads for q, k, v; d initial_state = d final_state; d log_decay = 0), with and
without cu_seqlens, initial_state, output_final_state and state_checkpoints. Every formula a plan evaluates
(flops, extra memory) is finite at N = 0."""

from __future__ import annotations

import math

import pytest
import torch

import leetdecoding as ld
from leetdecoding import dispatch
from leetdecoding.bench import sweep
from leetdecoding.inputs import validate
from leetdecoding.methods import REGISTRY
from leetdecoding.methods.naive import relative_error

from .runnable import RUNNABLE_ON_CPU

H, DK, DV = 2, 3, 4
GRAD_METHODS = [n for n in RUNNABLE_ON_CPU if REGISTRY[n].supports_grad]


def leaves(batch, n, sequences, dtype=torch.float64):
    """q, k, v (batch, H, n, D), log_decay (H,) and initial_state (sequences, H, Dk, Dv), all requiring grad."""
    g = torch.Generator().manual_seed(n + 10 * sequences)
    cd = torch.float64 if dtype == torch.float64 else torch.float32
    q, k, v = (torch.randn(batch, H, n, d, generator=g).to(dtype).requires_grad_() for d in (DK, DK, DV))
    log_decay = torch.tensor([-0.1, -0.7], dtype=cd, requires_grad=True)
    s0 = torch.randn(sequences, H, DK, DV, generator=g).to(cd).requires_grad_()
    return q, k, v, log_decay, s0


def run_and_backward(method, q, k, v, log_decay, s0, cu_seqlens=None, checkpoints=None):
    """attention with every optional result, then backward through o and the final state."""
    o, state, *rest = ld.attention(
        q, k, v, log_decay=log_decay, method=method, initial_state=s0, output_final_state=True,
        cu_seqlens=cu_seqlens, state_checkpoints=checkpoints,
    )  # fmt: skip
    d_state = torch.randn(state.shape, generator=torch.Generator().manual_seed(3), dtype=state.dtype)
    assert o.requires_grad and state.requires_grad
    torch.autograd.backward([o, state], [torch.ones_like(o), d_state])
    return o, state, rest, d_state


@pytest.mark.parametrize("method", ["auto", *GRAD_METHODS])
@pytest.mark.parametrize("packed", [False, True], ids=["batch", "cu_seqlens=[0,0,0]"])
def test_empty_sequence_gradients(method, packed):
    batch, sequences = (1, 2) if packed else (2, 2)
    q, k, v, log_decay, s0 = leaves(batch, 0, sequences)
    cu = torch.tensor([0, 0, 0], dtype=torch.int32) if packed else None
    o, state, rest, d_state = run_and_backward(method, q, k, v, log_decay, s0, cu, checkpoints=[])
    assert o.shape == (batch, H, 0, DV) and o.dtype == q.dtype
    assert torch.equal(state, s0) and state.data_ptr() != s0.data_ptr()  # lambda^0 S_init, a new tensor
    assert rest[0].shape == (0, *state.shape[1 if packed else 0 :])
    for t in (q, k, v):
        assert t.grad is not None and t.grad.shape == t.shape
    assert torch.equal(s0.grad, d_state)
    assert torch.equal(log_decay.grad, torch.zeros_like(log_decay))


def test_empty_sequence_output_alone_backward():
    """o.sum().backward() on a rank with no tokens, nothing else asked for."""
    q, k, v, log_decay, _ = leaves(1, 0, 1)
    ld.attention(q, k, v, log_decay=log_decay).sum().backward()
    assert q.grad.shape == q.shape and torch.equal(log_decay.grad, torch.zeros_like(log_decay))


@pytest.mark.parametrize("packed", [False, True])
def test_explain_empty_sequence_with_grad(packed):
    q, k, v, log_decay, s0 = leaves(1, 0, 2 if packed else 1)
    cu = torch.tensor([0, 0, 0]) if packed else None
    e = ld.explain(q, k, v, log_decay=log_decay, initial_state=s0, cu_seqlens=cu, output_final_state=True)
    assert e.method is not None
    for name in GRAD_METHODS:
        assert ld.explain(q, k, v, log_decay=log_decay, method=name, initial_state=s0, cu_seqlens=cu).method == name


def test_plan_formulas_at_zero_tokens():
    """extra memory and the dispatcher's estimate of every method: finite at N = 0, with and without grad."""
    for requires_grad in (False, True):
        q, k, v = (torch.randn(1, H, 0, d, requires_grad=requires_grad) for d in (DK, DK, DV))
        x = validate(q, k, v, 0.9)
        for name, m in REGISTRY.items():
            options = dispatch.options_for(m, x)
            values = (m.extra_memory_bytes(x, **options), dispatch.estimate_bytes(m, x, options))
            assert all(math.isfinite(value) and value >= 0 for value in values), (name, requires_grad, values)


def test_method_forward_at_zero_tokens():
    """Each method called directly (as the benchmark does) with no tokens: an empty output and S_init back."""
    q, k, v = (torch.randn(2, H, 0, d) for d in (DK, DK, DV))
    s0 = torch.randn(2, H, DK, DV)
    x = validate(q, k, v, 0.9, None, 1.0, s0, True)
    for name in RUNNABLE_ON_CPU:
        o, state = REGISTRY[name].forward(x, **dispatch.options_for(REGISTRY[name], x))
        assert o.shape == (2, H, 0, DV) and torch.equal(state, s0), name


def test_bench_formulas_at_zero_tokens():
    empty = torch.zeros(1, H, 0, DV)
    q = torch.zeros(1, H, 0, DK)
    o64, o_abs = sweep.fp64_sums(q, q, empty, torch.full((H,), -0.1))
    assert o64.shape == empty.shape and relative_error(empty, o64, o_abs) == 0.0
    assert sweep.predicted_seconds(REGISTRY["chunked"], 256, (0, 1e-4), 3) is None  # nothing to scale from
