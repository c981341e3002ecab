"""Every method choice goes through the dispatcher: attention, decode steps, lists of methods, the choices made."""

from __future__ import annotations

import pytest
import torch

import leetdecoding as ld
from leetdecoding import dispatch
from leetdecoding.inputs import validate
from leetdecoding.methods import REGISTRY
from leetdecoding.methods.naive import reference

from .reference import assert_close


def step_inputs(b=2, h=3, dk=8, dv=5, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(b, h, dk, generator=g, dtype=torch.float64).to(dtype) for _ in range(2))
    v = torch.randn(b, h, dv, generator=g, dtype=torch.float64).to(dtype)
    state = torch.randn(b, h, dk, dv, generator=g, dtype=torch.float64).to(torch.float32)
    return q, k, v, state


def test_every_declared_option_gets_a_value_and_no_other():
    q = torch.randn(1, 2, 40, 8)
    x = validate(q, q, q, 0.9)
    for name, m in REGISTRY.items():
        assert tuple(dispatch.options_for(m, x)) == m.options, name


def test_decode_step_is_dispatched_and_explained():
    q, k, v, state = step_inputs()
    e = ld.explain_decode(q, k, v, state, decay=0.9)
    assert e.method == "recurrent_step" and "on cpu the torch step" in e.reason  # Triton is for CUDA
    assert "triton_step" in e.refusals or "triton_step" in e.others  # (Triton's interpreter runs it on CPU)
    with ld.record_choices() as made:
        o, new = ld.decode_step(q, k, v, state, decay=0.9, scale=0.5)
    assert [(c.operation, c.method.name) for c in made] == [("decode_step", "recurrent_step")]
    ref = reference(q[:, :, None], k[:, :, None], v[:, :, None], 0.9, state, 0.5)
    assert_close("decode o", o, ref.o[:, :, 0], ref.o_abs[:, :, 0], torch.float32)
    assert_close("decode state", new, ref.state, ref.state_abs, torch.float32)


def test_a_forced_decode_method_that_cannot_run_says_why():
    q, k, v, state = step_inputs()
    q.requires_grad_()
    with pytest.raises(ld.MethodRefusedError, match=r"method 'triton_step' cannot run a decode step B=2, H=3.*"
                       r"no gradient support.*forced by method='triton_step'"):
        ld.decode_step(q, k, v, state, decay=0.9, method="triton_step")
    assert "no gradient support" in "; ".join(ld.explain_decode(q, k, v, state, 0.9).refusals["triton_step"])
    with pytest.raises(ValueError, match=r"unknown method 'chunked'; known: auto, triton_step, recurrent_step"):
        ld.decode_step(q, k, v, state, decay=0.9, method="chunked")


def test_a_list_of_methods_is_auto_among_them():
    q = torch.randn(1, 2, 40, 8, dtype=torch.float64)
    with ld.record_choices() as made:
        ld.attention(q, q, q, decay=0.9, method=["recurrent", "fleet"])
        ld.attention(q, q, q, decay=0.9, method=["fleet"])
    assert [c.method.name for c in made] == ["fleet", "fleet"]  # fleet comes before recurrent in auto's order
    assert "forced by method='fleet'" in made[1].reason
    # the reason names the list and gives auto's own order as context, not as the reason for a method not listed
    assert made[0].reason.startswith("the first of ['recurrent', 'fleet'] in auto's order that can run (auto's order")
    with pytest.raises(ValueError, match=r"unknown method 'fast' in method=\['chunked', 'fast'\]"):
        ld.attention(q, q, q, method=["chunked", "fast"])
    with pytest.raises(TypeError, match="method must be a string"):
        ld.attention(q, q, q, method=[])
    g = q.float().requires_grad_()
    with pytest.raises(ld.MethodRefusedError, match=r"none of the methods \['fleet', 'triton_fleet'\] can run"):
        ld.attention(g, g, g, method=["fleet", "triton_fleet"])


def test_results_are_named_in_the_documented_order():
    q = torch.randn(1, 2, 20, 8, dtype=torch.float64)
    o = ld.attention(q, q, q, decay=0.9)
    assert isinstance(o, torch.Tensor)
    both = ld.attention(q, q, q, decay=0.9, output_final_state=True, state_checkpoints=[5])
    o2, state, checkpoints = both
    assert both._fields == ("output", "final_state", "checkpoints")
    assert both.output is o2 and both.final_state is state and both.checkpoints is checkpoints
    assert torch.allclose(o2, o, rtol=1e-12, atol=1e-12)
    assert state.shape == (1, 2, 8, 8) and checkpoints.shape == (1, 1, 2, 8, 8)
    only = ld.attention(q, q, q, decay=0.9, state_checkpoints=[5])
    assert only._fields == ("output", "checkpoints") and torch.equal(only.checkpoints, checkpoints)
