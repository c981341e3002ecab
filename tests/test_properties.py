"""Property tests: every method agrees with the fp64 reference on random shapes, decays, scales and states."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import leetdecoding as ld
from leetdecoding.methods.naive import reference

from .reference import assert_close
from .runnable import RUNNABLE_ON_CPU

decays = st.one_of(st.just(1.0), st.floats(1e-8, 1.0, exclude_min=False), st.sampled_from([1 - 2**-20, 1e-30]))


@st.composite
def problems(draw):
    b, h = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    n = draw(st.integers(0, 150))
    dk, dv = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    dtype = draw(st.sampled_from([torch.float64, torch.float32]))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, n, d, generator=g, dtype=torch.float64) for d in (dk, dk, dv))
    state = torch.randn(b, h, dk, dv, generator=g, dtype=torch.float64) if draw(st.booleans()) else None
    decay = torch.tensor([draw(decays) for _ in range(h)], dtype=torch.float64)
    scale = draw(st.sampled_from([1.0, 0.125, -2.0]))
    return q.to(dtype), k.to(dtype), v.to(dtype), decay, state, scale


@settings(max_examples=60, deadline=None)
@given(problem=problems(), name=st.sampled_from(RUNNABLE_ON_CPU))
def test_method_matches_reference(problem, name):
    q, k, v, decay, state, scale = problem
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    s0 = None if state is None else state.to(compute)
    o, s = ld.attention(q, k, v, decay, method=name, scale=scale, initial_state=s0, output_final_state=True)
    ref = reference(q, k, v, decay, s0)
    assert_close(name, o, ref.o, ref.o_abs, q.dtype, scale)
    assert_close(name + " state", s, ref.state, ref.state_abs, compute)
