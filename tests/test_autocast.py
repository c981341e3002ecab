"""Autocast does not change what a call computes (DESIGN.md section 4): inside torch.autocast, fp32 inputs keep fp32
accuracy, bf16 inputs take the bf16 path, states stay fp32 (fp64 for fp64), for every method, decode_step,
causal_linear_decoder, the custom backwards (called inside the region too), the nn layer with its cache and the
patched transformers MiniMax. The same code path serves torch.autocast("cuda") (the device type of the inputs)."""

from __future__ import annotations

import pytest
import torch

import leetdecoding as ld
from leetdecoding.methods import REGISTRY
from leetdecoding.methods.naive import TOLERANCE, reference, reference_closed_form
from leetdecoding.nn import DecayingLinearAttention, LinearAttentionCache

from .reference import assert_close
from .runnable import RUNNABLE_ON_CPU

DECAY = torch.tensor([0.9, 0.5])
CUSTOM_BACKWARD = [n for n in ("chunked", "recurrent", "triton_chunked") if n in RUNNABLE_ON_CPU]


def bf16_autocast():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def qkv(n, dtype=torch.float32, dk=4, dv=4, seed=0):
    g = torch.Generator().manual_seed(seed + n)
    return [torch.randn(1, 2, n, d, generator=g, dtype=torch.float64).to(dtype) for d in (dk, dk, dv)]


@pytest.mark.parametrize("n", [10, 200])  # vanilla and chunked under auto
def test_fp32_inputs_keep_fp32_accuracy_and_state(n):
    q, k, v = qkv(n)
    s0 = torch.randn(1, 2, 4, 4)
    ref = reference(q, k, v, DECAY, s0)
    for method in ("auto", *RUNNABLE_ON_CPU):
        with bf16_autocast():
            o, state = ld.attention(q, k, v, DECAY, method=method, initial_state=s0, output_final_state=True)
        assert o.dtype == torch.float32 and state.dtype == torch.float32, f"{method}: {o.dtype}, {state.dtype}"
        assert_close(f"{method} o", o, ref.o, ref.o_abs, torch.float32)
        assert_close(f"{method} state", state, ref.state, ref.state_abs, torch.float32)


def test_other_dtypes_compute_as_outside_autocast():
    """bf16 inputs take the bf16 path (fp32 accumulation, fp32 state), fp64 the fp64 one: bit for bit as outside."""
    for dtype in (torch.bfloat16, torch.float64):
        q, k, v = qkv(70, dtype)
        for method in ("auto", *(m for m in RUNNABLE_ON_CPU if dtype in REGISTRY[m].dtypes)):
            outside = ld.attention(q, k, v, DECAY, method=method, output_final_state=True)
            with bf16_autocast():
                inside = ld.attention(q, k, v, DECAY, method=method, output_final_state=True)
            assert inside[1].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
            for a, b in zip(inside, outside):
                assert a.dtype == b.dtype and torch.equal(a, b), f"{method} {dtype}"


def test_decode_step_after_prefill_inside_autocast():
    q, k, v = qkv(12)
    ref = reference(q, k, v, DECAY)
    with bf16_autocast():
        _, state = ld.attention(q[:, :, :10], k[:, :, :10], v[:, :, :10], DECAY, output_final_state=True)
        outs = []
        for t in (10, 11):
            o_t, state = ld.decode_step(q[:, :, t], k[:, :, t], v[:, :, t], state, DECAY)
            assert o_t.dtype == torch.float32 and state.dtype == torch.float32
            outs.append(o_t)
    assert_close("decode", torch.stack(outs, dim=2), ref.o[:, :, 10:], ref.o_abs[:, :, 10:], torch.float32)
    assert_close("state", state, ref.state, ref.state_abs, torch.float32)


def test_causal_linear_decoder_inside_autocast():
    q, k, v = qkv(40)
    gamma = -torch.log(DECAY)
    with bf16_autocast():
        o = ld.causal_linear_decoder(q, k, v, is_mask_weight=True, gamma=gamma)
    ref = reference(q, k, v, DECAY)
    assert_close("causal_linear_decoder", o, ref.o, ref.o_abs, torch.float32)


def test_custom_backward_inside_autocast_keeps_fp32():
    """Forward and backward both called inside the autocast region: the gradients of the fp32 computation."""
    for method in CUSTOM_BACKWARD:
        check_gradients_inside_autocast(method)


def check_gradients_inside_autocast(method):
    leaves = [t.requires_grad_() for t in qkv(70, dk=8, dv=8)]
    g = torch.log(DECAY).requires_grad_()
    s0 = torch.randn(1, 2, 8, 8, requires_grad=True)
    gen = torch.Generator().manual_seed(1)
    do, ds = torch.randn(1, 2, 70, 8, generator=gen), torch.randn(1, 2, 8, 8, generator=gen)
    with bf16_autocast():
        o, state = ld.attention(*leaves, log_decay=g, method=method, initial_state=s0, output_final_state=True)
        torch.autograd.backward([o, state], [do, ds])
    inputs = [*leaves, g, s0]
    ref_inputs = [t.detach().double().requires_grad_() for t in inputs]
    o_ref, s_ref = reference_closed_form(*ref_inputs[:3], ref_inputs[3], ref_inputs[4])
    torch.autograd.backward([o_ref, s_ref], [do.double(), ds.double()])
    for label, t, r in zip(("dq", "dk", "dv", "dlog_decay", "dinitial_state"), inputs, ref_inputs):
        assert t.grad.dtype == t.dtype
        err = ((t.grad.double() - r.grad).abs().max() / r.grad.abs().max()).item()
        assert err < 2e-5, f"{method} {label}: relative error {err:.2e} (bf16 would be about 1e-2)"


def test_layer_prefill_and_decode_with_cache_inside_autocast():
    torch.manual_seed(0)
    layer = DecayingLinearAttention(32, 4, layer_idx=1, num_layers=4)
    x = torch.randn(2, 9, 32)
    cache = LinearAttentionCache()
    with torch.no_grad(), bf16_autocast():
        full = layer(x)
        steps = [layer(x[:, :7], cache=cache)]
        steps += [layer(x[:, t : t + 1], cache=cache) for t in (7, 8)]  # decode_step from the cached state
    assert cache.get(1).dtype == torch.float32
    got = torch.cat(steps, dim=1)
    err = ((got.double() - full.double()).abs().max() / full.double().abs().max()).item()
    assert err <= 2 * TOLERANCE[torch.bfloat16], f"prefill + decode vs one call: {err:.2e}"


def test_patched_minimax_stores_fp32_states_inside_autocast():
    pytest.importorskip("transformers")
    from leetdecoding.integrations import hf_minimax

    from .test_hf_minimax import FULL, LINEAR, make_model, tokens

    model = make_model([LINEAR, FULL])
    ids = tokens(2, 12)
    hf_minimax.patch(model)
    try:
        with torch.no_grad(), bf16_autocast():
            out = model(ids[:, :10], use_cache=True)
            dtypes = [s.dtype for s in out.cache.linear_cache if isinstance(s, torch.Tensor)]  # after prefill
            for t in (10, 11):  # the decode path: leetdecoding's step on the cached state
                out = model(ids[:, t : t + 1], cache=out.cache, use_cache=True)
                dtypes += [s.dtype for s in out.cache.linear_cache if isinstance(s, torch.Tensor)]
    finally:
        hf_minimax.unpatch(model)
    assert dtypes and all(d == torch.float32 for d in dtypes), dtypes


def test_inputs_device_type_decides(monkeypatch):
    """Autocast is switched off for the inputs' device type: CUDA autocast reaches the same code path (asked for
    "cuda" when the inputs are on a CUDA device; checked here through the device type the helper is given)."""
    from leetdecoding import amp

    asked = []
    real = torch.is_autocast_enabled
    monkeypatch.setattr(torch, "is_autocast_enabled", lambda *a: asked.append(a) or real(*a))
    q, k, v = qkv(3)
    with bf16_autocast():
        ld.attention(q, k, v, DECAY)
    assert ("cpu",) in asked
    with amp.autocast_off("cuda"):  # no CUDA here: a no-op context, never an error
        pass


@pytest.mark.parametrize("name", ["vanilla", "recursion", "auto"])
def test_plain_autograd_backward_inside_autocast_keeps_fp32(name):
    """fp32 inputs, forward and backward inside torch.autocast('cpu', bf16): the methods differentiated by plain
    autograd run their backward with autocast off too (bf16 matmuls there gave a relative error of 4.5e-3)."""
    g = torch.Generator().manual_seed(2)
    leaves = [torch.randn(1, 2, 70, 4, generator=g).requires_grad_() for _ in range(3)]
    log_decay = torch.log(torch.tensor([0.9, 0.5])).requires_grad_()
    s0 = torch.randn(1, 2, 4, 4, generator=g).requires_grad_()
    do = torch.randn(1, 2, 70, 4, generator=g)
    ds = torch.randn(1, 2, 4, 4, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        o, s = ld.attention(*leaves, log_decay=log_decay, method=name, initial_state=s0, output_final_state=True)
        ((o * do).sum() + (s * ds).sum()).backward()
    inputs = [*leaves, log_decay, s0]
    ref_inputs = [t.detach().double().requires_grad_() for t in inputs]
    o_ref, s_ref = reference_closed_form(*ref_inputs[:3], ref_inputs[3], ref_inputs[4])
    ((o_ref * do.double()).sum() + (s_ref * ds.double()).sum()).backward()
    for label, t, r in zip(("dq", "dk", "dv", "dlog_decay", "dinitial_state"), inputs, ref_inputs):
        err = ((t.grad.double() - r.grad).abs().max() / r.grad.abs().max()).item()
        assert err < 2e-5, f"{name} {label}: relative error {err:.2e} (bf16 is about 5e-3)"
