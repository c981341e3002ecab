"""Per-token decays (data-dependent gates): every method that takes them against the fp64 recurrence, at the
edges (no decay, resets, -1e4 and -inf mixed in, at chunk edges and token 0), with gradients, packed sequences,
checkpoints and decode steps; the methods that do not take them refuse with a reason."""

from __future__ import annotations

import pytest
import torch

import leetdecoding as ld
from leetdecoding.methods.naive import reference, reference_closed_form

from .reference import assert_close

METHODS = ["vanilla", "chunked", "recurrent"]
H, DK, DV = 3, 8, 5


def problem(b=2, n=70, dtype=torch.float32, seed=0, low=-0.5):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(b, H, n, DK, generator=g, dtype=torch.float64).to(dtype) for _ in range(2))
    v = torch.randn(b, H, n, DV, generator=g, dtype=torch.float64).to(dtype)
    log_decay = torch.rand(b, H, n, generator=g, dtype=torch.float64) * low
    state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    s0 = torch.randn(b, H, DK, DV, generator=g, dtype=torch.float64).to(state_dtype)
    return q, k, v, log_decay.to(state_dtype), s0


def edges(log_decay: torch.Tensor) -> torch.Tensor:
    """No decay, tiny, strong, resets (-1e4, -inf) at token 0, at chunk edges (63, 64, 127, 128) and inside."""
    g = log_decay.clone()
    values = [0.0, -1e-7, -30.0, -1e4, float("-inf")]
    for i, t in enumerate([0, 1, 15, 16, 63, 64, 65, 127, 128, 129]):
        if t < g.shape[-1]:
            g[i % g.shape[0], i % H, t] = values[i % len(values)]
    return g


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_every_method_matches_the_fp64_recurrence_at_the_edges(method, dtype):
    q, k, v, log_decay, s0 = problem(n=140, dtype=dtype)
    log_decay = edges(log_decay)
    o, state = ld.attention(q, k, v, log_decay=log_decay, scale=0.7, initial_state=s0, output_final_state=True,
                            method=method)  # fmt: skip
    ref = reference(q, k, v, torch.exp(log_decay.double()), s0, 0.7)
    assert o.dtype == dtype and state.dtype == s0.dtype
    assert_close(f"{method} o", o, ref.o, ref.o_abs, dtype)
    assert_close(f"{method} state", state, ref.state, ref.state_abs, s0.dtype)


def test_the_decay_form_takes_zero_as_a_reset():
    q, k, v, log_decay, _ = problem(n=40, dtype=torch.float64)
    lam = torch.exp(log_decay)
    lam[:, :, 20] = 0.0  # the state before token 20 is forgotten
    ref = reference(q, k, v, lam)  # the fp64 recurrence multiplies the state by exactly 0 at token 20
    for method in METHODS:
        o = ld.attention(q, k, v, decay=lam, method=method)
        assert_close(f"{method} with a reset", o, ref.o, ref.o_abs, torch.float64)


def test_long_fp32_sums_do_not_cancel():
    # the log decays sum to about -1e6 over the sequence: no global cumulative sum whose differences cancel
    n = 8192
    q, k, v, _, _ = problem(b=1, n=n, dtype=torch.float32)
    log_decay = torch.full((1, H, n), -1e6 / n)
    log_decay[..., ::7] = -1e-3
    ref = reference(q, k, v, torch.exp(log_decay.double()))
    for method in ("chunked", "recurrent"):
        o = ld.attention(q, k, v, log_decay=log_decay, method=method)
        assert_close(f"{method} at N={n}", o, ref.o, ref.o_abs, torch.float32)


@pytest.mark.parametrize("method", METHODS)
def test_gradients_match_autograd_of_the_fp64_closed_form(method):
    q, k, v, log_decay, s0 = problem(n=37, dtype=torch.float64)
    got_leaves = [t.clone().requires_grad_() for t in (q, k, v, log_decay, s0)]
    o, state = ld.attention(*got_leaves[:3], log_decay=got_leaves[3], initial_state=got_leaves[4], scale=0.5,
                            output_final_state=True, method=method)  # fmt: skip
    w = torch.randn_like(o)
    got = torch.autograd.grad((o * w).sum() + state.pow(2).sum(), got_leaves)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, log_decay, s0)]
    o, state = reference_closed_form(*leaves, scale=0.5)
    want = torch.autograd.grad((o * w).sum() + state.pow(2).sum(), leaves)
    for name, a, b in zip(("q", "k", "v", "log_decay", "initial_state"), got, want):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-10), f"{method} d{name}"


@pytest.mark.parametrize("method", ["chunked", "recurrent"])
def test_gradcheck(method):
    q, k, v, log_decay, s0 = problem(b=1, n=9, dtype=torch.float64)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, log_decay, s0)]

    def f(q, k, v, g, s0):
        return ld.attention(q, k, v, log_decay=g, initial_state=s0, output_final_state=True, method=method)

    assert torch.autograd.gradcheck(f, leaves)


def test_fp32_gradients_within_tolerance_of_fp64():
    q, k, v, log_decay, s0 = problem(n=70)
    for method in ("chunked", "recurrent"):
        leaves = [t.clone().requires_grad_() for t in (q, k, v, log_decay)]
        o = ld.attention(*leaves[:3], log_decay=leaves[3], method=method)
        got = torch.autograd.grad(o.sum(), leaves)
        ref_leaves = [t.double().requires_grad_() for t in (q, k, v, log_decay)]
        want = torch.autograd.grad(reference_closed_form(*ref_leaves)[0].sum(), ref_leaves)
        for name, a, b in zip("qkvg", got, want):
            assert torch.allclose(a.double(), b, rtol=1e-4, atol=1e-4 * b.abs().max().item()), f"{method} d{name}"


@pytest.mark.parametrize("method", METHODS)
def test_packed_sequences_and_checkpoints(method):
    q, k, v, log_decay, _ = problem(b=1, n=90, dtype=torch.float64)
    cu = torch.tensor([0, 30, 30, 90])
    s0 = torch.randn(3, H, DK, DV, dtype=torch.float64)
    o, states, saved = ld.attention(q, k, v, log_decay=log_decay, cu_seqlens=cu, initial_state=s0,
                                    output_final_state=True, state_checkpoints=[10, 60], method=method)  # fmt: skip
    for i, (a, b) in enumerate(((0, 30), (30, 30), (30, 90))):
        ref = reference(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], torch.exp(log_decay[:, :, a:b]), s0[i : i + 1])
        assert_close(f"sequence {i} o", o[:, :, a:b], ref.o, ref.o_abs, torch.float64)
        assert_close(f"sequence {i} state", states[i : i + 1], ref.state, ref.state_abs, torch.float64)
    ref = reference(q[:, :, 30:60], k[:, :, 30:60], v[:, :, 30:60], torch.exp(log_decay[:, :, 30:60]), s0[2:3])
    assert_close("checkpoint at 60", saved[1:2], ref.state, ref.state_abs, torch.float64)


def test_a_strided_decay_view_and_low_precision_inputs():
    q, k, v, log_decay, s0 = problem(n=50, dtype=torch.bfloat16)
    fla_layout = log_decay.transpose(1, 2).contiguous()  # (B, N, H) as fla keeps its gates
    o = ld.attention(q, k, v, log_decay=fla_layout.transpose(1, 2), initial_state=s0)
    ref = reference(q, k, v, torch.exp(log_decay.double()), s0)
    assert_close("bf16 with a strided fp32 decay", o, ref.o, ref.o_abs, torch.bfloat16)


def test_bad_per_token_decays_name_the_argument():
    q, k, v, log_decay, _ = problem(n=20)
    with pytest.raises(ValueError, match=r"per-token log_decay must be <= 0 .*got 0\.5"):
        ld.attention(q, k, v, log_decay=log_decay.index_fill(2, torch.tensor([3]), 0.5))
    with pytest.raises(ValueError, match=r"per-token log_decay must be <= 0 .*got nan"):
        ld.attention(q, k, v, log_decay=log_decay.index_fill(2, torch.tensor([3]), float("nan")))
    with pytest.raises(ValueError, match=r"per-token decay must be in \[0, 1\]"):
        ld.attention(q, k, v, decay=torch.full((2, H, 20), 1.5))
    shape = r"log_decay must be .*per-token one of shape \(2, 3, 20\) \(B, H, N\); got shape \(2, 20, 3\)"
    with pytest.raises(ValueError, match=shape):
        ld.attention(q, k, v, log_decay=log_decay.transpose(1, 2).contiguous())
    with pytest.raises(ld.MethodRefusedError, match=r"'fleet' cannot run .*per-token decay.*no per-token decay"):
        ld.attention(q, k, v, log_decay=log_decay, method="fleet")
    assert "no per-token decay" in "; ".join(ld.explain(q, k, v, log_decay=log_decay).refusals["recursion"])


def test_decode_steps_with_their_own_decay_continue_a_prefill():
    q, k, v, log_decay, s0 = problem(n=12)
    o, state = ld.attention(q[:, :, :8], k[:, :, :8], v[:, :, :8], log_decay=log_decay[:, :, :8], initial_state=s0,
                            output_final_state=True)  # fmt: skip
    outs = [o]
    for t in range(8, 12):
        o_t, state = ld.decode_step(q[:, :, t], k[:, :, t], v[:, :, t], state, log_decay=log_decay[:, :, t],
                                    out_state=state)  # fmt: skip
        outs.append(o_t.unsqueeze(2))
    ref = reference(q, k, v, torch.exp(log_decay.double()), s0)
    assert_close("prefill + decode", torch.cat(outs, 2), ref.o, ref.o_abs, torch.float32)
    assert_close("decode state", state, ref.state, ref.state_abs, torch.float32)
    e = ld.explain_decode(q[:, :, 0], k[:, :, 0], v[:, :, 0], state, log_decay=log_decay[:, :, 0])
    assert e.method == "recurrent_step"
    assert all("per-token" not in r for rs in e.refusals.values() for r in rs)  # the Triton step takes them too
    wrong = r"per-token one of shape \(2, 3\) \(B, H\) for a decode step; got shape \(1, 3\)"
    with pytest.raises(ValueError, match=wrong):
        ld.decode_step(q[:, :, 0], k[:, :, 0], v[:, :, 0], state, log_decay=log_decay[:1, :, 0])


def test_zero_tokens_with_a_per_token_decay():
    q, k, v, log_decay, s0 = problem(n=0, dtype=torch.float64)
    leaves = [t.clone().requires_grad_() for t in (q, log_decay, s0)]
    o, state = ld.attention(leaves[0], k, v, log_decay=leaves[1], initial_state=leaves[2], output_final_state=True)
    assert o.shape == (2, H, 0, DV) and torch.equal(state, s0)
    grads = torch.autograd.grad(state.sum(), leaves, allow_unused=True)
    assert grads[1].shape == (2, H, 0) and torch.equal(grads[2], torch.ones_like(s0))


def test_a_zero_decay_with_gradients_gives_finite_gradients():
    q, k, v, log_decay, _ = problem(n=30, dtype=torch.float64)
    lam = torch.exp(log_decay)
    lam[:, :, 10] = 0.0
    leaves = [t.clone().requires_grad_() for t in (q, lam)]
    o = ld.attention(leaves[0], k, v, decay=leaves[1], method="chunked")
    dq, dlam = torch.autograd.grad(o.sum(), leaves)
    assert torch.isfinite(dq).all() and torch.isfinite(dlam).all()
    # after the reset the outputs are those of the sequence that starts at token 10
    tail = q[:, :, 10:].clone().requires_grad_()
    want = torch.autograd.grad(reference_closed_form(tail, k[:, :, 10:], v[:, :, 10:], log_decay[:, :, 10:])[0].sum(),
                               tail)[0]  # fmt: skip
    got = torch.autograd.grad(ld.attention(leaves[0], k, v, decay=leaves[1])[:, :, 10:].sum(), leaves[0])[0]
    assert torch.allclose(got[:, :, 10:], want, atol=1e-10)
    assert torch.equal(got[:, :, :10], torch.zeros_like(q[:, :, :10]))


@pytest.mark.parametrize("low", [-0.01, -0.5, -0.9])  # block sums up to -0.6, -32 and -58 (gates.SHALLOW)
def test_fp32_factored_tables_stay_within_tolerance(low):
    q, k, v, log_decay, s0 = problem(b=1, n=600, dtype=torch.float32, low=low)
    ref = reference(q, k, v, torch.exp(log_decay.double()), s0)
    for method in ("chunked", "vanilla"):
        o, state = ld.attention(q, k, v, log_decay=log_decay, initial_state=s0, output_final_state=True,
                                method=method)  # fmt: skip
        assert_close(f"{method} o", o, ref.o, ref.o_abs, torch.float32)
        assert_close(f"{method} state", state, ref.state, ref.state_abs, torch.float32)


def test_second_derivatives_of_the_per_token_recurrence():
    q, k, v, log_decay, s0 = problem(b=1, n=6, dtype=torch.float64)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, log_decay, s0)]

    def f(q, k, v, g, s0):
        return ld.attention(q, k, v, log_decay=g, initial_state=s0, output_final_state=True, method="recurrent")

    assert torch.autograd.gradgradcheck(f, leaves)
