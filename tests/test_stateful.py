"""Stateful inference: decode steps, chunked prefill, packed variable-length batches, state checkpoints."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import leetdecoding as ld
from leetdecoding.methods.naive import TOLERANCE, reference

from .reference import assert_close
from .runnable import RUNNABLE_ON_CPU

DECAYS = torch.tensor([1.0, 1 - 2**-12, 0.5, 1e-6], dtype=torch.float64)
METHODS = RUNNABLE_ON_CPU


def make(b, n, dk=12, dv=20, dtype=torch.float32, seed=0, h=4):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, h, n, d, generator=g, dtype=torch.float64).to(dtype) for d in (dk, dk, dv))


def state_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("method", METHODS)
def test_prefill_then_decode_equals_one_call(method, dtype):
    q, k, v = make(2, 40, dtype=dtype)
    ref = reference(q, k, v, DECAYS)
    o, state = ld.attention(q[:, :, :25], k[:, :, :25], v[:, :, :25], DECAYS, method=method, output_final_state=True)
    assert state.dtype == state_dtype(dtype)
    outs = [o]
    for t in range(25, 40):
        o_t, state = ld.decode_step(q[:, :, t], k[:, :, t], v[:, :, t], state, DECAYS)
        assert o_t.dtype == dtype and state.dtype == state_dtype(dtype)
        outs.append(o_t.unsqueeze(2))
    assert_close("decode output", torch.cat(outs, 2), ref.o, ref.o_abs, dtype)
    assert_close("decode state", state, ref.state, ref.state_abs, state_dtype(dtype))


def test_decode_into_a_reused_buffer():
    """In place (out_state=state) or into a second buffer: the result lands where asked, nothing else allocated."""
    q, k, v = make(3, 10)
    ref = reference(q, k, v, DECAYS)
    buffers = [torch.zeros(3, 4, 12, 20), torch.empty(3, 4, 12, 20)]
    cur = 0
    for t in range(10):
        target = cur if t % 2 == 0 else 1 - cur
        o_t, new = ld.decode_step(
            q[:, :, t], k[:, :, t], v[:, :, t], buffers[cur], DECAYS, scale=0.5, out_state=buffers[target]
        )
        assert new.data_ptr() == buffers[target].data_ptr()
        assert_close(f"token {t}", o_t, ref.o[:, :, t], ref.o_abs[:, :, t], torch.float32, 0.5)
        cur = target
    assert_close("state", buffers[cur], ref.state, ref.state_abs, torch.float32)


@settings(max_examples=25, deadline=None)
@given(
    method=st.sampled_from(METHODS),
    n=st.integers(1, 300),
    cuts=st.lists(st.integers(0, 300), max_size=5),
    with_state=st.booleans(),
)
def test_chunked_prefill_equals_one_call(method, n, cuts, with_state):
    q, k, v = make(1, n)
    s0 = torch.randn(1, 4, 12, 20) if with_state else None
    ref = reference(q, k, v, DECAYS, s0)
    points = [0, *sorted({c for c in cuts if 0 < c < n}), n]
    state, outs = s0, []
    for a, b in zip(points, points[1:]):
        o, state = ld.attention(
            q[:, :, a:b],
            k[:, :, a:b],
            v[:, :, a:b],
            DECAYS,
            method=method,
            initial_state=state,
            output_final_state=True,
        )
        outs.append(o)
    assert_close("pieces", torch.cat(outs, 2), ref.o, ref.o_abs, torch.float32)
    assert_close("pieces state", state, ref.state, ref.state_abs, torch.float32)


@settings(max_examples=25, deadline=None)
@given(
    method=st.sampled_from(METHODS),
    lengths=st.lists(st.integers(0, 130), min_size=1, max_size=6),
    with_state=st.booleans(),
    index_dtype=st.sampled_from([torch.int32, torch.int64]),
)
def test_varlen_equals_separate_calls(method, lengths, with_state, index_dtype):
    total = sum(lengths)
    q, k, v = make(1, total)
    s0 = torch.randn(len(lengths), 4, 12, 20) if with_state else None
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=index_dtype)
    o, states = ld.attention(q, k, v, DECAYS, method=method, cu_seqlens=cu, initial_state=s0, output_final_state=True)
    assert o.shape == q.shape[:3] + (20,) and states.shape == (len(lengths), 4, 12, 20)
    for i, (a, b) in enumerate(zip(cu.tolist(), cu.tolist()[1:])):
        ref = reference(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], DECAYS, None if s0 is None else s0[i : i + 1])
        assert_close(f"sequence {i} output", o[:, :, a:b], ref.o, ref.o_abs, torch.float32)
        assert_close(f"sequence {i} state", states[i : i + 1], ref.state, ref.state_abs, torch.float32)


@pytest.mark.parametrize("method", METHODS)
def test_checkpoints_resume(method):
    q, k, v = make(2, 200)
    ref = reference(q, k, v, DECAYS)
    points = [1, 64, 100, 199, 200]
    o, final, ckpt = ld.attention(q, k, v, DECAYS, method=method, output_final_state=True, state_checkpoints=points)
    assert ckpt.shape == (5, 2, 4, 12, 20)
    assert torch.equal(ckpt[-1], final)
    assert_close("output", o, ref.o, ref.o_abs, torch.float32)
    for p, s in zip(points, ckpt):
        resumed, end = ld.attention(
            q[:, :, p:], k[:, :, p:], v[:, :, p:], DECAYS, method=method, initial_state=s, output_final_state=True
        )
        assert_close(f"resume from {p}", resumed, ref.o[:, :, p:], ref.o_abs[:, :, p:], torch.float32)
        assert_close(f"resume from {p} state", end, ref.state, ref.state_abs, torch.float32)


def test_varlen_checkpoints_belong_to_their_sequence():
    q, k, v = make(1, 30)
    cu = torch.tensor([0, 10, 10, 30])
    o, ckpt = ld.attention(q, k, v, DECAYS, cu_seqlens=cu, state_checkpoints=[4, 10, 25])
    assert ckpt.shape == (3, 4, 12, 20)
    for s, (a, p) in zip(ckpt, [(0, 4), (0, 10), (10, 25)]):
        ref = reference(q[:, :, a:p], k[:, :, a:p], v[:, :, a:p], DECAYS)
        assert_close(f"checkpoint {p}", s.unsqueeze(0), ref.state, ref.state_abs, torch.float32)


@pytest.mark.parametrize(
    "cu,pattern",
    [
        (torch.tensor([[0, 5]]), r"cu_seqlens must be 1-D of shape \(S \+ 1,\)"),
        (torch.tensor([0.0, 5.0]), r"cu_seqlens must be an int32 or int64 tensor; got torch.float32"),
        (torch.tensor([1, 5]), r"must start at 0; got cu_seqlens\[0\] = 1"),
        (torch.tensor([0, 4, 3, 5]), r"non-decreasing; got cu_seqlens\[1\] = 4 > cu_seqlens\[2\] = 3"),
        (torch.tensor([0, 4]), r"must end at T_total = 5 .*got cu_seqlens\[-1\] = 4"),
        ([0, 5], r"cu_seqlens must be a 1-D int32/int64 tensor"),
    ],
)
def test_cu_seqlens_errors(cu, pattern):
    q, k, v = make(1, 5)
    with pytest.raises((ValueError, TypeError), match=pattern):
        ld.attention(q, k, v, cu_seqlens=cu)


def test_stateful_errors():
    q, k, v = make(2, 5)
    with pytest.raises(ValueError, match=r"packed sequences as batch 1.*got batch 2"):
        ld.attention(q, k, v, cu_seqlens=torch.tensor([0, 5]))
    q1, k1, v1 = make(1, 5)
    with pytest.raises(ValueError, match=r"initial_state must have shape \(2, 4, 12, 20\)"):
        ld.attention(q1, k1, v1, cu_seqlens=torch.tensor([0, 2, 5]), initial_state=torch.zeros(3, 4, 12, 20))
    with pytest.raises(ValueError, match=r"state_checkpoints must lie in \[1, N = 5\].*got \[6\]"):
        ld.attention(q, k, v, state_checkpoints=[2, 6])
    with pytest.raises(ValueError, match="strictly increasing"):
        ld.attention(q, k, v, state_checkpoints=[3, 2])
    s = torch.zeros(2, 4, 12, 20)
    with pytest.raises(ValueError, match=r"decode inputs must be q, k \(B, H, Dk\)"):
        ld.decode_step(q[:, :, 0], k[:, :, 0, :5], v[:, :, 0], s)
    with pytest.raises(ValueError, match=r"q must have 3 dimensions"):
        ld.decode_step(q, k, v, s)
    with pytest.raises(ValueError, match=r"state must have shape \(2, 4, 12, 20\)"):
        ld.decode_step(q[:, :, 0], k[:, :, 0], v[:, :, 0], s[:1])
    with pytest.raises(TypeError, match=r"state must be torch.float32 for torch.bfloat16 inputs"):
        ld.decode_step(*(t[:, :, 0].bfloat16() for t in (q, k, v)), s.bfloat16())
    with pytest.raises(TypeError, match=r"out_state must be torch.float32"):
        ld.decode_step(q[:, :, 0], k[:, :, 0], v[:, :, 0], s, out_state=s.double())


def test_tolerance_table_covers_states():
    assert TOLERANCE[state_dtype(torch.bfloat16)] == TOLERANCE[torch.float32]
