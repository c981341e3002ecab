"""Inputs that are tensors of another kind (subclasses, meta), the state dtype rule, the original call's gamma,
the cache's token count and what explain says about a forced method."""

from __future__ import annotations

import re

import pytest
import torch

import leetdecoding as ld
from leetdecoding import dispatch
from leetdecoding.methods.naive import reference
from leetdecoding.nn import DecayingLinearAttention, LinearAttentionCache

from .reference import assert_close

DECAYS = torch.tensor([0.9, 0.5], dtype=torch.float64)


class Tagged(torch.Tensor):
    """The simplest tensor subclass: behaves as a tensor, keeps its type through torch functions."""


def param(t):
    return torch.nn.Parameter(t, requires_grad=False)


def tagged(t):
    return t.as_subclass(Tagged)


def problem(n=9, dtype=torch.float64):
    g = torch.Generator().manual_seed(n)
    q, k, v = (torch.randn(2, 2, n, d, generator=g, dtype=torch.float64).to(dtype) for d in (3, 3, 4))
    s0 = torch.randn(2, 2, 3, 4, generator=g, dtype=torch.float64)
    return q, k, v, s0


# ----- tensor subclasses -----


@pytest.mark.parametrize("wrap", [param, tagged], ids=["Parameter", "subclass"])
def test_decode_step_takes_subclasses_everywhere(wrap):
    q, k, v, s0 = problem(6)
    ref = reference(q, k, v, DECAYS, s0)
    o, state = ld.attention(wrap(q[:, :, :4]), k[:, :, :4], wrap(v[:, :, :4]), wrap(DECAYS), initial_state=wrap(s0),
                            output_final_state=True)  # fmt: skip
    outs = [o]
    for t in (4, 5):  # one step into a new tensor, one in place into the caller's state
        buffer = wrap(state.clone()) if t == 5 else None
        o_t, state = ld.decode_step(wrap(q[:, :, t]), wrap(k[:, :, t]), v[:, :, t], wrap(state), decay=wrap(DECAYS),
                                    out_state=buffer)  # fmt: skip
        outs.append(o_t.unsqueeze(2))
        assert buffer is None or state is buffer
    assert_close("subclass decode", torch.cat(outs, 2), ref.o, ref.o_abs, torch.float64)
    assert_close("subclass state", state, ref.state, ref.state_abs, torch.float64)
    # and bad subclass inputs are still named
    with pytest.raises(ValueError, match=r"state must have shape \(2, 2, 3, 4\)"):
        ld.decode_step(wrap(q[:, :, 0]), k[:, :, 0], v[:, :, 0], wrap(s0[:, :, :2]), 0.9)
    with pytest.raises(TypeError, match=r"out_state must be torch.float64 for torch.float64 inputs"):
        ld.decode_step(wrap(q[:, :, 0]), k[:, :, 0], v[:, :, 0], s0, 0.9, out_state=wrap(s0.float()))


@pytest.mark.parametrize("name", ["vanilla", "chunked", "recurrent", "recursion", "fleet"])
def test_attention_and_explain_take_subclasses(name):
    q, k, v, s0 = problem(71)
    ref = reference(q, k, v, DECAYS, s0)
    args = (tagged(q[:, :, :70]), param(k[:, :, :70]), tagged(v[:, :, :70]))
    o, s = ld.attention(*args, decay=param(DECAYS), method=name, initial_state=tagged(s0), output_final_state=True)
    assert_close(name, o, ref.o[:, :, :70], ref.o_abs[:, :, :70], torch.float64)
    assert ld.explain(*args, decay=param(DECAYS), method=name, initial_state=tagged(s0)).method == name
    # the next token from that state, held as a Parameter
    o_t, s = ld.decode_step(param(q[:, :, 70]), k[:, :, 70], tagged(v[:, :, 70]), param(s), decay=param(DECAYS))
    assert_close(name + " decode", o_t, ref.o[:, :, 70], ref.o_abs[:, :, 70], torch.float64)
    assert_close(name + " state", s, ref.state, ref.state_abs, torch.float64)


def test_layer_and_original_take_subclasses():
    q, k, v, _ = problem(20)
    gamma = torch.tensor([0.1, 0.7], dtype=torch.float64)
    ref = reference(q, k, v, torch.exp(-gamma))
    o = ld.causal_linear_decoder(tagged(q), param(k), v, is_mask_weight=True, gamma=param(gamma))
    assert_close("original", o, ref.o, ref.o_abs, torch.float64)
    torch.manual_seed(0)
    m = DecayingLinearAttention(hidden_size=8, num_heads=2, head_dim=4, num_layers=2).double()
    x = torch.randn(1, 6, 8, dtype=torch.float64)
    with torch.no_grad():
        full = m(x)
        cache = LinearAttentionCache()
        parts = [m(param(x[:, :4]), cache=cache)]
        cache.update(0, param(cache.get(0)))  # a state held as a Parameter, updated in place by the decode step
        parts += [m(tagged(x[:, t : t + 1]), cache=cache) for t in (4, 5)]
    assert torch.allclose(torch.cat(parts, 1), full, rtol=1e-12, atol=1e-12)


# ----- meta tensors -----


def meta(t):
    return t.to("meta")


@pytest.mark.parametrize(
    "argument,kwargs",
    [
        ("decay", {"decay": meta(torch.tensor([0.9, 0.5]))}),
        ("log_decay", {"log_decay": meta(torch.tensor([-0.1, 0.0]))}),
        ("initial_state", {"initial_state": meta(torch.zeros(2, 2, 3, 4))}),
        ("state_checkpoints", {"state_checkpoints": meta(torch.tensor([2]))}),
    ],
)
def test_meta_arguments_are_refused_by_name(argument, kwargs):
    q, k, v, _ = problem(4, torch.float32)
    for fn in (ld.attention, ld.explain):
        with pytest.raises(ValueError, match=f"^{argument} is on the meta device, which holds no values"):
            fn(q, k, v, **kwargs)


def test_meta_cu_seqlens_qkv_and_decode():
    q, k, v, s0 = problem(4, torch.float32)
    with pytest.raises(ValueError, match="^cu_seqlens is on the meta device"):
        ld.attention(q[:1], k[:1], v[:1], cu_seqlens=meta(torch.tensor([0, 1, 4])))
    with pytest.raises(ValueError, match=r"^q is on the meta device.*shape \(2, 2, 4, 3\)"):
        ld.attention(meta(q), meta(k), meta(v), 0.9)
    with pytest.raises(ValueError, match="one device"):  # mixed devices: that error first
        ld.attention(q, k, meta(v))
    step = (q[:, :, 0], k[:, :, 0], v[:, :, 0], s0.float())
    with pytest.raises(ValueError, match="^q is on the meta device"):
        ld.decode_step(*(meta(t) for t in step), 0.9)
    with pytest.raises(ValueError, match="^decay is on the meta device"):
        ld.decode_step(*step, decay=meta(torch.tensor([0.9, 0.5])))
    with pytest.raises(ValueError, match="^out_state is on the meta device"):
        ld.decode_step(*step, 0.9, out_state=meta(s0.float()))
    with pytest.raises(ValueError, match="^gamma is on the meta device"):
        ld.causal_linear_decoder(q, k, v, is_mask_weight=True, gamma=meta(torch.tensor([0.1, 0.2])))


# ----- causal_linear_decoder: errors name gamma and the flags -----


@pytest.mark.parametrize(
    "gamma,need_exp,exc,pattern",
    [
        (torch.tensor([True, False]), True, TypeError, r"gamma must be a real tensor \(lambda = exp\(-gamma\)\); got torch.b"),  # noqa: E501
        (torch.tensor([0.1j, 0.2j]), False, TypeError, r"gamma must be a real tensor \(lambda = gamma\); got torch.complex"),  # noqa: E501
        (torch.tensor([float("nan"), 0.1]), True, ValueError, r"exp\(-gamma\) needs gamma >= 0 and finite; got gamma = nan"),  # noqa: E501
        (torch.tensor([float("inf"), 0.1]), True, ValueError, r"needs gamma >= 0 and finite; got gamma = inf"),
        (torch.tensor([-0.5, 0.1]), True, ValueError, r"needs gamma >= 0 and finite; got gamma = -0.5"),
        (torch.tensor([0.0, 0.5]), False, ValueError, r"=False, lambda = gamma must be in \(0, 1\]; got gamma = 0"),
        (torch.tensor([float("nan"), 0.5]), False, ValueError, r"lambda = gamma must be in \(0, 1\]; got gamma = nan"),
        (torch.tensor([1.5, 0.5]), False, ValueError, r"lambda = gamma must be in \(0, 1\]; got gamma = 1.5"),
        ([0.1, 0.2], True, TypeError, r"gamma must be a tensor of shape \(2,\).*got list"),
        (0.1, True, TypeError, r"gamma must be a tensor of shape \(2,\).*got float"),
    ],
)  # fmt: skip
def test_bad_gamma_is_named_in_its_convention(gamma, need_exp, exc, pattern):
    q, k, v, _ = problem(4, torch.float32)
    with pytest.raises(exc, match=pattern):
        ld.causal_linear_decoder(q, k, v, is_mask_weight=True, gamma=gamma, is_need_exp=need_exp)


def test_original_flags_and_method_names():
    q, k, v, _ = problem(4, torch.float32)
    gamma = torch.tensor([0.1, 0.2])
    with pytest.raises(TypeError, match="is_mask_weight must be a bool.*got int 1"):
        ld.causal_linear_decoder(q, k, v, is_mask_weight=1, gamma=gamma)
    with pytest.raises(TypeError, match="is_need_exp must be a bool.*got str 'no'"):
        ld.causal_linear_decoder(q, k, v, is_mask_weight=True, gamma=gamma, is_need_exp="no")
    with pytest.raises(ValueError, match="attn_method must be None, .auto., an original name .*lightningAttention2.*"
                                         "got unknown method 'flash'"):  # fmt: skip
        ld.causal_linear_decoder(q, k, v, is_mask_weight=True, gamma=gamma, attn_method="flash")
    with pytest.raises(ValueError, match=r"gamma must be a tensor of shape \(2,\).*got \(2, 1\)"):
        ld.causal_linear_decoder(q, k, v, is_mask_weight=True, gamma=torch.ones(2, 1))
    with pytest.raises(TypeError, match="attn_method must be a string or None; got int"):
        ld.causal_linear_decoder(q, k, v, attn_method=3)


# ----- one rule for states: the compute dtype, never cast -----


@pytest.mark.parametrize(
    "inputs,state,expected",
    [
        (torch.float32, torch.float64, torch.float32),
        (torch.bfloat16, torch.bfloat16, torch.float32),
        (torch.float16, torch.float64, torch.float32),
        (torch.float64, torch.float32, torch.float64),
    ],
    ids=str,
)
def test_states_in_another_dtype_are_refused_everywhere(inputs, state, expected):
    q, k, v, s0 = problem(5, inputs)
    s = s0.to(state)
    hint = ".double()" if expected == torch.float64 else ".float()"

    def pattern(name):
        return "^" + re.escape(f"{name} must be {expected} for {inputs} inputs") + ".*" + re.escape(
            f"got {state}. Hint: pass {name}{hint}"
        )

    with pytest.raises(TypeError, match=pattern("initial_state")):
        ld.attention(q, k, v, 0.9, initial_state=s)
    with pytest.raises(TypeError, match=pattern("initial_state")):
        ld.explain(q, k, v, 0.9, initial_state=s)
    step = (q[:, :, 0], k[:, :, 0], v[:, :, 0])
    with pytest.raises(TypeError, match=pattern("state")):
        ld.decode_step(*step, s, 0.9)
    with pytest.raises(TypeError, match="^out_state must be"):
        ld.decode_step(*step, s0.to(expected), 0.9, out_state=s)


def test_layer_cache_state_in_another_dtype_is_refused():
    m = DecayingLinearAttention(hidden_size=8, num_heads=2, head_dim=4, num_layers=2)
    cache = LinearAttentionCache()
    x = torch.randn(1, 3, 8)
    with torch.no_grad():
        m(x, cache=cache)
        cache.update(0, cache.get(0).double())
        for n in (1, 3):  # the decode step and the continuation
            with pytest.raises(TypeError, match=r"the cache's state of layer 0 must be torch.float32.*got torch.f"):
                m(x[:, :n], cache=cache)


# ----- the cache counts tokens -----


def test_cache_counts_seen_tokens():
    layers = [DecayingLinearAttention(hidden_size=8, num_heads=2, head_dim=4, layer_idx=i, num_layers=3)
              for i in (1, 2)]  # fmt: skip
    cache = LinearAttentionCache()
    assert cache.seen_tokens == 0 and cache.get_seq_length() == 0
    x = torch.randn(2, 7, 8)
    with torch.no_grad():
        for steps in (x[:, :5], x[:, 5:6], x[:, 6:7]):  # prefill, then two decode steps
            for m in layers:
                steps = m(steps, cache=cache)
    assert cache.seen_tokens == 7 and cache.get_seq_length(2) == 7 and cache.get_seq_length(0) == 0
    cache.repeat_interleave(2)
    assert cache.seen_tokens == 7
    cache.reset()
    assert cache.seen_tokens == 0


# ----- explain says what really happens when a method is forced -----


def qkv(n=20):
    return torch.randn(1, 2, n, 4), torch.randn(1, 2, n, 4), torch.randn(1, 2, n, 4)


@pytest.mark.parametrize("how", ["env", "argument"])
def test_explain_never_offers_a_method_that_a_forced_call_cannot_choose(monkeypatch, how):
    kwargs = {}
    if how == "env":
        monkeypatch.setenv(dispatch.ENV_METHOD, "recurrent")
    else:
        kwargs["method"] = "recurrent"
    e = ld.explain(*qkv(), **kwargs)
    text = str(e)
    assert e.method == "recurrent" and e.forced
    assert "also possible" not in text and "lower priority" not in text
    expected = "LEETDECODING_METHOD=recurrent" if how == "env" else "method='recurrent'"
    assert f"not used (recurrent is forced by {'the environment variable ' if how == 'env' else ''}{expected}" in text
    assert "chunked" in e.others


def test_explain_auto_still_lists_lower_priority_methods():
    e = ld.explain(*qkv())
    assert not e.forced and "also possible (lower priority): chunked" in str(e)
