"""decode_step's CPU paths: the whole state at once (small states) and blocks of the state kept in the cache
(large states, 1 torch thread); each against the fp64 step, and the decay read once per call.

The paths are chosen by the state's size in bytes: the thresholds are lowered here so that small shapes take each
path (the real ones would need states of megabytes)."""

from __future__ import annotations

import pytest
import torch

import leetdecoding as ld
from leetdecoding import memo
from leetdecoding.methods import recurrent
from leetdecoding.methods.naive import reference

from .reference import assert_close

B, H, DK, DV = 3, 5, 12, 20
LOG_DECAY = torch.tensor([0.0, -(2**-12), -0.7, -13.8, -1e300], dtype=torch.float64)  # the last: lambda = 0
POSITIVE = torch.tensor([0.0, -(2**-12), -0.7, -13.8, -30.0], dtype=torch.float64)  # every lambda > 0
PATHS = ("whole", "blocks")


@pytest.fixture
def path(request, monkeypatch):
    """Force one path: the state size in bytes up to which the state is one block."""
    whole = {"whole": 1 << 40, "blocks": 2 * DK * DV * 4}[request.param]  # blocks of two heads' fp32 states
    monkeypatch.setattr(recurrent, "CACHE_BLOCK_BYTES", whole)
    monkeypatch.setattr(recurrent, "WHOLE_STATE_BYTES", 0 if request.param == "blocks" else whole)
    monkeypatch.setattr(recurrent, "MAX_THREADS", 1 << 10)  # the paths at any thread count
    return request.param


def make(dtype, seed=0, log_decay=LOG_DECAY):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, d, generator=g, dtype=torch.float64) for d in (DK, DK, DV))
    state = torch.randn(B, H, DK, DV, generator=g, dtype=torch.float64)
    cd = torch.float64 if dtype == torch.float64 else torch.float32
    return (*(t.to(dtype) for t in (q, k, v)), state.to(cd), log_decay.clone())  # the decay in fp64


def expected(q, k, v, state, log_decay, scale):
    """The step in fp64 from the inputs as given: (o, o_abs, new state, state_abs)."""
    q, k, v, s = (t.double() for t in (q, k, v, state))
    lam = torch.exp(log_decay.double()).view(1, -1, 1, 1)
    kv = k[..., :, None] * v[..., None, :]
    new, new_abs = lam * s + kv, lam * s.abs() + kv.abs()
    o = scale * (q[..., None, :] @ new).squeeze(-2)
    o_abs = abs(scale) * (q.abs()[..., None, :] @ new_abs).squeeze(-2)
    return o, o_abs, new, new_abs


@pytest.mark.parametrize("path", PATHS, indirect=True)
@pytest.mark.parametrize("target", ["new", "in_place", "buffer"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("decays", ["with_zero", "positive"])
def test_step_against_fp64(path, target, dtype, decays):
    q, k, v, state, log_decay = make(dtype, log_decay=LOG_DECAY if decays == "with_zero" else POSITIVE)
    before = state.clone()
    out = {"new": None, "in_place": state, "buffer": torch.full_like(state, float("nan"))}[target]
    o_ref, o_abs, s_ref, s_abs = expected(q, k, v, state, log_decay, 0.5)
    for _ in range(2):  # the second call finds the decay's tables remembered
        state.copy_(before)
        o, new = ld.decode_step(q, k, v, state, log_decay=log_decay, scale=0.5, out_state=out)
        assert o.dtype == dtype and o.shape == (B, H, DV) and o.is_contiguous()
        assert_close(f"{path} {target} output", o, o_ref, o_abs, dtype)
        assert_close(f"{path} {target} state", new, s_ref, s_abs, state.dtype)
        if target == "new":
            assert torch.equal(state, before), "the input state was modified"
        else:
            assert new.data_ptr() == out.data_ptr()


@pytest.mark.parametrize("path", PATHS, indirect=True)
def test_paths_agree_on_non_finite_states(path):
    """lambda = 0 times an inf of the state is NaN on every path, as in the fp64 step; a finite state is forgotten
    exactly."""
    q, k, v, state, log_decay = make(torch.float32)
    state[0, 4, 0, 0] = float("inf")  # head 4 has lambda = 0
    state[1, 2, 3, 4] = float("inf")  # head 2 has lambda = 0.5
    _, new = ld.decode_step(q, k, v, state.clone(), log_decay=log_decay, out_state=None)
    s = state.clone()
    _, in_place = ld.decode_step(q, k, v, s, log_decay=log_decay, out_state=s)
    ref = expected(q, k, v, state, log_decay, 1.0)[2]
    for got in (new, in_place):
        assert torch.equal(got.isnan(), ref.isnan()) and torch.equal(got.isinf(), ref.isinf())
        assert got[0, 4, 0, 0].isnan() and got[1, 2, 3, 4].isinf()
        kv = k[..., :, None] * v[..., None, :]
        assert torch.equal(got[1:, 4], kv[1:, 4])  # lambda = 0 on a finite state: exactly k^T v


@pytest.mark.parametrize("path", PATHS, indirect=True)
def test_a_decay_written_in_place_is_used(path):
    """The step's factors come from the values memo: a write through .data changes them."""
    q, k, v, state, log_decay = make(torch.float32)
    decay = log_decay.clone()
    ld.decode_step(q, k, v, state.clone(), log_decay=decay)
    decay.data[2] = -0.1
    o, new = ld.decode_step(q, k, v, state.clone(), log_decay=decay)
    o_ref, o_abs, s_ref, s_abs = expected(q, k, v, state, decay, 1.0)
    assert_close("output after the write", o, o_ref, o_abs, torch.float32)
    assert_close("state after the write", new, s_ref, s_abs, torch.float32)


@pytest.mark.parametrize("decay_kind", ["log_decay", "decay", "float"])
def test_decay_values_read_once_per_call(decay_kind, monkeypatch):
    q, k, v, state, log_decay = make(torch.float32, log_decay=LOG_DECAY[:4].clone().fill_(-0.25))
    kwargs = {
        "log_decay": {"log_decay": log_decay},
        "decay": {"decay": log_decay.exp()},
        "float": {"decay": 0.75},
    }[decay_kind]
    calls = []
    real = memo.snapshot
    monkeypatch.setattr(memo, "snapshot", lambda t: calls.append(t) or real(t))
    ld.decode_step(q[:, :4], k[:, :4], v[:, :4], state[:, :4], **kwargs)  # fills the memo
    calls.clear()
    ld.decode_step(q[:, :4], k[:, :4], v[:, :4], state[:, :4], **kwargs)
    assert len(calls) == (0 if decay_kind == "float" else 1)


@pytest.mark.parametrize("path", PATHS, indirect=True)
def test_differentiable_on_every_path(path):
    """With inputs that require grad the step is the autograd-visible one, whatever the state's size."""
    q, k, v, state, log_decay = make(torch.float64)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, state, log_decay)]
    o, new = ld.decode_step(*leaves[:4], log_decay=leaves[4], scale=0.5)
    (o.sum() + new.sum()).backward()
    ref_leaves = [t.clone().requires_grad_() for t in (q, k, v, state, log_decay)]
    o_ref, _, s_ref, _ = expected(*ref_leaves, 0.5)
    (o_ref.sum() + s_ref.sum()).backward()
    for name, a, b in zip(("q", "k", "v", "state", "log_decay"), leaves, ref_leaves):
        assert torch.allclose(a.grad, b.grad, rtol=1e-10, atol=1e-10), name


@pytest.mark.parametrize("path", ["whole", "blocks"], indirect=True)
def test_recurrent_method_on_every_path(path):
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, H, 9, d, generator=g) for d in (DK, DK, DV))
    s0 = torch.randn(2, H, DK, DV, generator=g)
    decay = torch.exp(LOG_DECAY[:4]).tolist() + [0.3]
    ref = reference(q, k, v, torch.tensor(decay, dtype=torch.float64), s0)
    o, state = ld.attention(
        q, k, v, torch.tensor(decay), method="recurrent", initial_state=s0, output_final_state=True
    )
    assert_close("recurrent output", o, ref.o, ref.o_abs, torch.float32)
    assert_close("recurrent state", state, ref.state, ref.state_abs, torch.float32)
