"""Inputs at the edge of the number line, for every method that runs here (the Triton ones in the interpreter, on
short sequences).

Non-finite inputs: o_t depends only on tokens <= t of its own sequence, batch row and head, whatever later tokens
hold. Where the fp64 recurrence is finite a method matches it within its tolerance; where it is NaN or inf the
method is NaN or inf at the same places (for a bad q_t, only o_t is non-finite).
Extreme decays: lambda -> 0 (log lambda down to -1e300) is a valid limit, o_t = scale (q_t . k_t) v_t; tiny
factors lambda^t are exact down to the dtype's smallest normal number, not flushed early.
"""

from __future__ import annotations

import pytest
import torch

import leetdecoding as ld
from leetdecoding.methods import REGISTRY
from leetdecoding.methods.naive import TOLERANCE, reference, reference_closed_form

from .reference import assert_close
from .runnable import RUNNABLE_ON_CPU

METHODS = RUNNABLE_ON_CPU
GRAD_METHODS = [n for n in METHODS if REGISTRY[n].supports_grad]
DECAYS = torch.tensor([0.9, 0.5], dtype=torch.float64)
BAD = {"nan": float("nan"), "-inf": float("-inf"), "inf": float("inf")}
COMPUTE = {torch.float64: torch.float64, torch.float32: torch.float32, torch.bfloat16: torch.float32}


def inputs(b=2, h=2, n=24, dk=4, dv=3, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, n, d, generator=g, dtype=torch.float64).to(dtype) for d in (dk, dk, dv))
    return q, k, v


def check_pattern(label, got, ref, ref_abs, dtype, only_finiteness=False):
    """Close to the fp64 recurrence where it is finite; NaN / inf exactly where it is (or, with
    `only_finiteness`, non-finite where it is)."""
    got = got.detach().double()
    finite = torch.isfinite(ref)
    if only_finiteness:
        assert torch.equal(torch.isfinite(got), finite), f"{label}: non-finite elsewhere than the reference"
    else:
        assert torch.equal(torch.isnan(got), torch.isnan(ref)), f"{label}: NaN pattern differs from the reference"
        assert torch.equal(torch.isinf(got), torch.isinf(ref)), f"{label}: inf pattern differs from the reference"
        assert torch.equal(got[torch.isinf(ref)], ref[torch.isinf(ref)]), f"{label}: inf of the wrong sign"
    assert_close(label, got[finite], ref[finite], ref_abs[finite], dtype)


# ----- non-finite inputs -----


@pytest.mark.parametrize("where", ["k=nan", "k=-inf", "v=inf", "v=nan"])
@pytest.mark.parametrize("name", METHODS)
def test_non_finite_k_or_v_stays_causal(name, where):
    """One bad entry in batch row 1, head 0, at the first, a middle and the last token: every other row and head,
    and every earlier token of that one, stay exact; later tokens follow the recurrence's NaN / inf pattern."""
    tensor, value = where.split("=")
    for t in {"k=nan": (0, 15, 23), "v=inf": (15,), "k=-inf": (23,), "v=nan": (0,)}[where]:
        q, k, v = inputs()
        (k if tensor == "k" else v)[1, 0, t, 1] = BAD[value]
        o, state = ld.attention(q, k, v, DECAYS, method=name, output_final_state=True, scale=0.5)
        ref = reference(q, k, v, DECAYS, scale=0.5)
        assert torch.isfinite(o[1, 0, :t]).all() and torch.isfinite(o[0]).all() and torch.isfinite(o[:, 1]).all()
        check_pattern(f"{name} {where} at {t} output", o, ref.o, ref.o_abs, torch.float32)
        check_pattern(f"{name} {where} at {t} state", state, ref.state, ref.state_abs, torch.float32)


@pytest.mark.parametrize("value", ["nan", "inf"])
@pytest.mark.parametrize("name", METHODS)
def test_non_finite_q_affects_only_its_own_output(name, value):
    for t in (0, 23) if value == "nan" else (15,):
        q, k, v = inputs()
        q[1, 0, t, 2] = BAD[value]
        o, state = ld.attention(q, k, v, DECAYS, method=name, output_final_state=True)
        ref = reference(q, k, v, DECAYS)
        assert not torch.isfinite(o[1, 0, t]).any()
        check_pattern(f"{name} q={value} at {t}", o, ref.o, ref.o_abs, torch.float32, only_finiteness=True)
        assert_close(f"{name} q={value} at {t} state", state, ref.state, ref.state_abs, torch.float32)


@pytest.mark.parametrize("name", METHODS)
def test_non_finite_with_state_and_checkpoints(name):
    q, k, v = inputs(dtype=torch.float64)
    s0 = torch.randn(2, 2, 4, 3, dtype=torch.float64)
    k[0, 1, 16, 0] = float("nan")
    v[1, 0, 19, 2] = float("inf")
    o, state, cps = ld.attention(
        q, k, v, DECAYS, method=name, initial_state=s0, output_final_state=True, state_checkpoints=[10, 16, 18, 20]
    )
    ref = reference(q, k, v, DECAYS, s0)
    check_pattern(f"{name} output", o, ref.o, ref.o_abs, torch.float64)
    check_pattern(f"{name} final state", state, ref.state, ref.state_abs, torch.float64)
    for i, p in enumerate([10, 16, 18, 20]):
        part = reference(q[:, :, :p], k[:, :, :p], v[:, :, :p], DECAYS, s0)
        check_pattern(f"{name} checkpoint {p}", cps[i], part.state, part.state_abs, torch.float64)


@pytest.mark.parametrize("name", METHODS)
def test_non_finite_in_one_packed_sequence(name):
    """Garbage in the middle sequence of three packed ones (and in its padding tail): the others stay exact."""
    q, k, v = inputs(b=1, n=24)
    cu = torch.tensor([0, 9, 18, 24], dtype=torch.int32)
    v[0, 1, 12, 0] = float("nan")
    k[0, 0, 16:18] = float("inf")
    s0 = torch.randn(3, 2, 4, 3)
    o, state = ld.attention(q, k, v, DECAYS, method=name, cu_seqlens=cu, initial_state=s0, output_final_state=True)
    for i, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        ref = reference(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], DECAYS, s0[i : i + 1])
        check_pattern(f"{name} sequence {i}", o[:, :, a:b], ref.o, ref.o_abs, torch.float32)
        check_pattern(f"{name} sequence {i} state", state[i : i + 1], ref.state, ref.state_abs, torch.float32)


@pytest.mark.parametrize("name", GRAD_METHODS)
def test_gradients_before_a_non_finite_token(name):
    """The loss reads o_t for t < 18 only; v_18 is NaN: the gradients of tokens before 18 are those of the first
    18 tokens alone."""
    q, k, v = inputs(dtype=torch.float64)
    v[0, 1, 18, 1] = float("nan")
    s0 = torch.randn(2, 2, 4, 3, dtype=torch.float64)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, s0)]
    o = ld.attention(*leaves[:3], DECAYS, method=name, initial_state=leaves[3])
    o[:, :, :18].sum().backward()
    clean = [t.detach().clone().requires_grad_() for t in (q[:, :, :18], k[:, :, :18], v[:, :, :18], s0)]
    reference_closed_form(*clean[:3], torch.log(DECAYS), clean[3])[0].sum().backward()
    for label, ours, ref in zip(("dq", "dk", "dv"), leaves[:3], clean[:3]):
        assert torch.allclose(ours.grad[:, :, :18], ref.grad, rtol=1e-10, atol=1e-10), f"{name} {label}"
    assert torch.allclose(leaves[3].grad, clean[3].grad, rtol=1e-10, atol=1e-10), f"{name} dinitial_state"


# ----- extreme decays -----

# one head per log decay: lambda = 0 to every dtype (-1e300 is -inf in fp32), at the edge of fp32, past it
EXTREME = (-1e300, -3e38, -1e35, -104.0, -88.0, 0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", METHODS)
def test_extreme_decays(name, dtype):
    if dtype not in REGISTRY[name].dtypes:
        pytest.skip(f"{name} does not declare {dtype}")
    cd = COMPUTE[dtype]
    h = len(EXTREME)
    q, k, v = inputs(b=1, h=h, n=20, dtype=dtype, seed=1)
    s0 = torch.randn(1, h, 4, 3, dtype=torch.float64).to(cd)
    log_decay = torch.tensor(EXTREME, dtype=torch.float64)
    o, state = ld.attention(
        q, k, v, log_decay=log_decay, method=name, initial_state=s0, output_final_state=True, scale=0.5
    )
    ref = reference(q, k, v, torch.exp(log_decay), s0, scale=0.5)
    assert_close(f"{name} {dtype}", o, ref.o, ref.o_abs, dtype)
    assert_close(f"{name} {dtype} state", state, ref.state, ref.state_abs, cd)
    # a Python float -1e300 for every head: lambda = 0, o_t = scale (q_t . k_t) v_t, final state k_N-1^T v_N-1
    o, state = ld.attention(q, k, v, log_decay=-1e300, method=name, initial_state=s0, output_final_state=True)
    qd, kd, vd = (t.double() for t in (q, k, v))
    expected = (qd * kd).sum(-1, keepdim=True) * vd
    last = kd[:, :, -1, :, None] * vd[:, :, -1, None, :]
    ref_abs = (qd * kd).abs().sum(-1, keepdim=True) * vd.abs()
    assert_close(f"{name} {dtype} lambda=0", o, expected, ref_abs, dtype)
    assert_close(f"{name} {dtype} lambda=0 state", state, last, last.abs(), cd)
    # decoding on from there: one more token, lambda = 0 forgets the state
    q1, k1, v1 = (t[:, :, 0].to(cd).to(dtype) for t in inputs(b=1, h=h, n=1, dtype=dtype, seed=2))
    o1, s1 = ld.decode_step(q1, k1, v1, state, log_decay=-1e300)
    kv1 = k1.double()[..., :, None] * v1.double()[..., None, :]
    assert_close(f"{name} {dtype} decode", s1, kv1, kv1.abs(), cd)
    o1_ref = (q1.double() * k1.double()).sum(-1, keepdim=True) * v1.double()
    assert_close(f"{name} {dtype} decode output", o1, o1_ref, o1_ref.abs(), dtype)


@pytest.mark.parametrize("name", [n for n in METHODS if REGISTRY[n].backend == "torch"])
def test_tiny_decay_long_sequence(name):
    """The scan's coarser levels use lambda^16, lambda^256, ...: at log lambda = -1e35 their logs overflow."""
    q, k, v = inputs(b=1, h=2, n=5000 if name != "vanilla" else 600, dk=2, dv=2, seed=3)
    o = ld.attention(q, k, v, log_decay=torch.tensor([-1e35, -3e38]), method=name)
    expected = (q.double() * k.double()).sum(-1, keepdim=True) * v.double()
    ref_abs = (q.double() * k.double()).abs().sum(-1, keepdim=True) * v.double().abs()
    assert_close(name, o, expected, ref_abs, torch.float32)


@pytest.mark.parametrize("name", GRAD_METHODS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_gradients_at_extreme_decays(name, dtype):
    h = len(EXTREME)
    q, k, v = inputs(b=1, h=h, n=20, dtype=dtype, seed=4)
    log_decay = torch.tensor(EXTREME, dtype=torch.float64)
    do = torch.randn(1, h, 20, 3, dtype=torch.float64)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    g = log_decay.clone().requires_grad_()
    o = ld.attention(*leaves, log_decay=g, method=name, scale=0.5)
    o.backward(do.to(dtype))
    assert torch.isfinite(g.grad).all(), f"{name} dlog_decay not finite: {g.grad}"
    ref = [t.detach().double().requires_grad_() for t in (q, k, v)]
    reference_closed_form(*ref, log_decay, scale=0.5)[0].backward(do)
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    for label, a, b in zip(("dq", "dk", "dv"), leaves, ref):
        assert torch.isfinite(a.grad).all(), f"{name} {label} not finite"
        err = ((a.grad.double() - b.grad).abs().max() / b.grad.abs().max()).item()
        assert err < tol, f"{name} {label}: relative error {err:.2e}"


def geometric_case(n, dtype):
    """q_t = e1, k_0 = e1, k_t = e2 after, v = 1: o_t = lambda^t exactly."""
    q = torch.zeros(1, 1, n, 2, dtype=dtype)
    q[..., 0] = 1
    k = torch.zeros(1, 1, n, 2, dtype=dtype)
    k[..., 1] = 1
    k[0, 0, 0] = torch.tensor([1.0, 0.0])
    return q, k, torch.ones(1, 1, n, 1, dtype=dtype)


# (dtype, lambda, N): 0.5^t reaches fp32's smallest normal number at t = 126, fp64's at 1022; 2^-2 and 2^-16
# reach them within 70 tokens (the interpreter's Triton methods)
GEOMETRIC = [
    (torch.float32, 0.5, 130, "torch"),
    (torch.float64, 0.5, 1030, "torch"),
    (torch.float32, 0.25, 70, "any"),
    (torch.float64, 2.0**-16, 70, "any"),
]


@pytest.mark.parametrize("dtype,lam,n,backends", GEOMETRIC, ids=[f"{d}-{lam}-{n}" for d, lam, n, _ in GEOMETRIC])
@pytest.mark.parametrize("name", METHODS)
def test_tiny_terms_are_not_flushed_early(name, dtype, lam, n, backends):
    if backends == "torch" and REGISTRY[name].backend != "torch":
        pytest.skip("long: the Triton methods run the short cases in the interpreter")
    if dtype not in REGISTRY[name].dtypes:
        pytest.skip(f"{name} does not declare {dtype}")
    o = ld.attention(*geometric_case(n, dtype), lam, method=name)[0, 0, :, 0].double()
    true = lam ** torch.arange(n, dtype=torch.float64)
    tiny = torch.finfo(dtype).tiny
    # the canonical log lambda is rounded to the dtype: lambda^t from it may fall just under `tiny` where the true
    # value is `tiny` itself, and be flushed; above 2 * tiny every value is a normal number to be kept
    normal = true >= 2 * tiny
    rel = (o[normal] - true[normal]).abs() / true[normal]
    worst = rel.max().item()
    assert worst <= TOLERANCE[dtype], f"{name}: relative error {worst:.3g} at t = {int(rel.argmax())}"
    assert (o[~normal] >= 0).all() and (o[~normal] <= 2 * tiny).all()
