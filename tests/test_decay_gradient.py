"""d loss / d decay of every method with gradients, against autograd through the fp64 closed form.

d o_t / d log lambda sums (t - s) lambda^(t-s) (q_t . k_s) v_s: for a small lambda it is O(lambda) while
q_t . dq_t and k_t . dk_t are O(1), so a backward that subtracts those (as chunked's and recurrent's custom
backwards did) loses every digit. Errors are measured per head (one decay per head), never against the largest
head's value, so a tiny decay's gradient cannot hide behind another head's.
"""

from __future__ import annotations

import pytest
import torch

import leetdecoding as ld
from leetdecoding.methods.chunked import ChunkedFunction
from leetdecoding.methods.naive import reference_closed_form

GRAD_METHODS = ["chunked", "recurrent", "vanilla", "recursion"]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# ----- the named cases: a tiny decay, and small but ordinary decays in fp32 -----


TINY = [(torch.float64, 1e-20), (torch.float32, 1e-45)]


@pytest.mark.parametrize("dtype,lam", TINY, ids=["fp64-1e-20", "fp32-1e-45"])
@pytest.mark.parametrize("name", GRAD_METHODS)
def test_decay_gradient_at_tiny_decay(name, dtype, lam):
    """o_t = (q_t.k_t) v_t + lambda (q_t.k_{t-1}) v_{t-1} + ...: d o / d lambda is O(1) as lambda -> 0.
    Measured on c162cc9 (this seed, reference -20.33): fp64 at 1e-20: chunked -1.6e5, recurrent -1.5e6 (vanilla and
    recursion right); fp32 at 1e-45 (a subnormal decay): chunked -inf, recurrent -inf, vanilla and recursion 0.

    At a subnormal fp32 decay, d loss / d log lambda = lambda * d loss / d lambda (about 3e-44 here) is itself
    subnormal: the fp32 log lambda every method is given (the canonical form) cannot carry it, and every method
    returns the contribution of the flushed factors as 0. What is asserted there is that d log lambda is right to
    within fp32's smallest normal number (no -inf, no NaN)."""
    g = _gen(0)
    q, k, v, do = (torch.randn(1, 1, 20, 4, generator=g, dtype=torch.float64).to(dtype) for _ in range(4))
    lam64 = torch.tensor([lam], dtype=torch.float64, requires_grad=True)
    o_ref, _ = reference_closed_form(q, k, v, torch.log(lam64))
    (ref,) = torch.autograd.grad((o_ref * do.double()).sum(), lam64)
    decay = torch.tensor([lam], dtype=dtype, requires_grad=True)
    o = ld.attention(q, k, v, decay=decay, method=name)
    (got,) = torch.autograd.grad((o * do).sum(), decay)
    assert torch.isfinite(got).all(), f"{name}: d/d decay = {got.item()}"
    if decay.item() < torch.finfo(dtype).tiny:
        log_err = abs(got.double().item() - ref.item()) * decay.double().item()
        assert log_err <= torch.finfo(dtype).tiny, f"{name}: d/d log decay off by {log_err:.3g}"
        return
    err = abs(got.double().item() - ref.item()) / abs(ref.item())
    assert err < 1e-4, f"{name}: d/d decay = {got.item():.6g}, reference {ref.item():.6g}"


@pytest.mark.parametrize("lam,d", [(1e-3, 64), (0.05, 16)])
@pytest.mark.parametrize("name", GRAD_METHODS)
def test_log_decay_gradient_fp32_small_decay(name, lam, d):
    """sum_t (t+1)(q_t.dq_t - k_t.dk_t) cancels to a value far below its terms. Measured on c162cc9 (N = 256):
    lambda 1e-3, D 64: chunked 1.0e-1, recurrent 3.6e-2 relative error; lambda 0.05, D 16: chunked 2.1e-4, recurrent
    7.8e-4; vanilla and recursion < 1e-6 (autograd through the decay factors). With this seed: chunked 3.2e-2 and
    recurrent 1.0e-2 at (1e-3, 64), chunked 2.7e-4 at (0.05, 16) (recurrent passes there)."""
    g = _gen(1)
    q, k, v, do = (torch.randn(1, 1, 256, d, generator=g) for _ in range(4))
    log64 = torch.log(torch.tensor([lam], dtype=torch.float64)).requires_grad_()
    o_ref, _ = reference_closed_form(q, k, v, log64)
    (ref,) = torch.autograd.grad((o_ref * do.double()).sum(), log64)
    log32 = log64.detach().float().requires_grad_()
    (got,) = torch.autograd.grad((ld.attention(q, k, v, log_decay=log32, method=name) * do).sum(), log32)
    err = abs(got.double().item() - ref.item()) / abs(ref.item())
    assert err < 2e-5, f"{name}: d log_decay relative error {err:.2e} ({got.item():.6g} vs {ref.item():.6g})"


# ----- a sweep: every decay from 1 to a subnormal, lengths across chunk and span boundaries -----


DECAYS = [1.0, 0.999, 0.5, 0.05, 1e-3, 1e-20, 1e-30, 1e-45]  # one head each
LENGTHS = [1, 20, 63, 64, 65, 130, 300]
RELATIVE = {torch.float64: 1e-12, torch.float32: 1e-6}  # of the magnitude of the terms
SCALE = 0.5


def _chunked_in_one_chunk_spans(q, k, v, log_decay, s0):
    """chunked with chunks of 16 tokens, each its own span (span_bytes=1): the state gradient and its
    distance-weighted twin cross a span boundary at every chunk."""
    return ChunkedFunction.apply(q, k, v, log_decay, s0, SCALE, 16, 1)


def _through_api(name):
    def run(q, k, v, log_decay, s0):
        return ld.attention(
            q, k, v, log_decay=log_decay, scale=SCALE, method=name, initial_state=s0, output_final_state=True
        )

    return run


RUNS = {name: _through_api(name) for name in GRAD_METHODS}
RUNS["chunked-spans"] = _chunked_in_one_chunk_spans


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("n", LENGTHS)
@pytest.mark.parametrize("name", list(RUNS))
def test_log_decay_gradient_per_head(name, n, dtype):
    """d log lambda with an initial state and a loss on the outputs and on the final state, per head, within
    RELATIVE of the fp64 closed form (plus the dtype's smallest normal number: the gradient of a subnormal fp32
    decay, 1e-45, is itself subnormal, and the methods flush the factors it comes from)."""
    if name in ("vanilla", "recursion") and n not in (20, 65):
        pytest.skip("plain autograd, a control: two lengths are enough")
    if name == "chunked-spans" and n > 130:
        pytest.skip("a Python loop over 16-token spans: 130 tokens cross nine of them")
    if name == "recurrent" and n > 130 and dtype == torch.float64:
        pytest.skip("a per-token Python loop: fp32 covers this length")
    q, k, v, do, s0, ds, log_decay = _inputs(DECAYS, n, 1, dtype, seed=n)
    ref, magnitude = _reference_and_magnitude(q, k, v, log_decay, s0, do, ds)
    log_decay.requires_grad_()
    o, state = RUNS[name](q, k, v, log_decay, s0)
    (got,) = torch.autograd.grad((o * do).sum() + (state * ds).sum(), log_decay)
    _assert_per_head(f"{name} N={n}", DECAYS, got, ref, magnitude, dtype)


def _inputs(decays, n, states, dtype, seed):
    """q, k, v, do (1, H, n, D) in `dtype`, an initial state and a final-state gradient (states rows), log lambda."""
    h, dk, dv = len(decays), 5, 3
    g = _gen(seed)
    q, k, do = (torch.randn(1, h, n, d, generator=g, dtype=torch.float64).to(dtype) for d in (dk, dk, dv))
    v = torch.randn(1, h, n, dv, generator=g, dtype=torch.float64).to(dtype)
    state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    s0 = torch.randn(states, h, dk, dv, generator=g, dtype=torch.float64).to(state_dtype)
    ds = torch.randn(states, h, dk, dv, generator=g, dtype=torch.float64).to(state_dtype)
    log_decay = torch.log(torch.tensor(decays, dtype=torch.float64)).to(state_dtype)
    return q, k, v, do, s0, ds, log_decay


def _reference_and_magnitude(q, k, v, log_decay, s0, do, ds):
    """The fp64 d log lambda per head, and the same sum over the absolute values of every term (the scale of its
    rounding errors)."""
    ref = _reference_log_decay_grad(q, k, v, log_decay, s0, do, ds)
    magnitude = _reference_log_decay_grad(*(t.abs() for t in (q, k, v)), log_decay, *(t.abs() for t in (s0, do, ds)))
    return ref, magnitude


def _assert_per_head(what, decays, got, ref, magnitude, dtype):
    got = got.double()
    assert torch.isfinite(got).all(), f"{what}: d log_decay {got.tolist()}"
    err = (got - ref).abs()
    bound = RELATIVE[dtype] * magnitude + torch.finfo(dtype).tiny
    worst = int((err / bound).argmax())
    assert (err <= bound).all(), (
        f"{what}: decay {decays[worst]}: d log_decay {got[worst].item():.8g}, reference {ref[worst].item():.8g}"
        f" (error {err[worst].item() / magnitude[worst].item():.2e} of the terms' magnitude)"
    )


def _reference_log_decay_grad(q, k, v, log_decay, s0, do, ds):
    """d (o . do + final_state . ds) / d log lambda (H,) in fp64 by autograd through the closed form."""
    log64 = log_decay.detach().double().requires_grad_()
    o, state = reference_closed_form(q, k, v, log64, s0, scale=SCALE)
    (grad,) = torch.autograd.grad((o * do.double()).sum() + (state * ds.double()).sum(), log64)
    return grad


# ----- triton_chunked (Triton's interpreter on CPU): the same decomposition in its dq and dk kernels -----


TRITON_DECAYS = [1.0, 0.5, 0.05, 1e-3, 1e-20]  # one head each
PACKED = [0, 20, 85, 215]  # sequences of 20, 65 and 130 tokens: within one chunk of 64, across one, across two


def _triton_chunked(q, k, v, log_decay, s0, cu_seqlens=None):
    return ld.attention(
        q, k, v, log_decay=log_decay, scale=SCALE, method="triton_chunked", initial_state=s0,
        output_final_state=True, cu_seqlens=cu_seqlens,
    )  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("n", [20, 65, 130])
def test_triton_chunked_log_decay_gradient_per_head(n, dtype):
    """The dq and dk kernels' distance-weighted sums. Measured on f4e4e0a (sum_t (t+1)(q_t.dq_t - k_t.dk_t)
    + N <S_N, dS_N>): in fp32 every decay below 1 fails, by up to the whole value at 1e-20."""
    q, k, v, do, s0, ds, log_decay = _inputs(TRITON_DECAYS, n, 1, dtype, seed=n)
    ref, magnitude = _reference_and_magnitude(q, k, v, log_decay, s0, do, ds)
    log_decay.requires_grad_()
    o, state = _triton_chunked(q, k, v, log_decay, s0)
    (got,) = torch.autograd.grad((o * do).sum() + (state * ds).sum(), log_decay)
    _assert_per_head(f"triton_chunked N={n}", TRITON_DECAYS, got, ref, magnitude, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_triton_chunked_log_decay_gradient_packed(dtype):
    """Packed sequences (cu_seqlens): each sequence's distances count from its own start, its final state's from
    its own length; the reference is the sum over the sequences computed one by one."""
    q, k, v, do, s0, ds, log_decay = _inputs(TRITON_DECAYS, PACKED[-1], len(PACKED) - 1, dtype, seed=7)
    ref = magnitude = 0
    for i, (start, stop) in enumerate(zip(PACKED[:-1], PACKED[1:])):
        qi, ki, vi, doi = (t[:, :, start:stop] for t in (q, k, v, do))
        r, m = _reference_and_magnitude(qi, ki, vi, log_decay, s0[i : i + 1], doi, ds[i : i + 1])
        ref, magnitude = ref + r, magnitude + m
    log_decay.requires_grad_()
    o, state = _triton_chunked(q, k, v, log_decay, s0, torch.tensor(PACKED))
    (got,) = torch.autograd.grad((o * do).sum() + (state * ds).sum(), log_decay)
    _assert_per_head("triton_chunked packed", TRITON_DECAYS, got, ref, magnitude, dtype)
