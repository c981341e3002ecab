"""Edge cases of issue 10's kinds beyond the named inputs: inference mode and torch.jit.trace with decay tables,
integer and out-of-range decay values, errors in the caller's own terms (attn_method, LEETDECODING_METHOD),
explain for a refused forced method, an overlapping out_state, memory estimates at more shapes."""

from __future__ import annotations

import sys
import warnings

import pytest
import torch

import leetdecoding as ld
from leetdecoding import dispatch
from leetdecoding.methods.naive import reference
from leetdecoding.nn import DecayingLinearAttention

from .reference import assert_close


def problem(n=12, b=1, h=2, dk=4, dv=4, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, h, n, d, generator=g, dtype=torch.float64).to(dtype) for d in (dk, dk, dv))


# ----- 1. torch.inference_mode: a decay not seen before crashes every entry point -----
# memo.ValueMemo.get stores (result, result._version); a result computed under inference mode is an inference
# tensor, which has no version counter: RuntimeError "Inference tensors do not track version counter".


def test_attention_in_inference_mode_with_a_new_decay():
    q, k, v = problem()
    lam = torch.tensor([0.6180339, 0.4142135], dtype=torch.float64)  # values no other test uses
    ref = reference(q, k, v, lam)
    with torch.inference_mode():
        o = ld.attention(q, k, v, decay=lam, method="chunked")
    assert_close("inference_mode", o, ref.o, ref.o_abs, torch.float64)


def test_python_float_decay_in_inference_mode():
    q, k, v = problem()
    ref = reference(q, k, v, torch.tensor([0.5772156] * 2, dtype=torch.float64))
    with torch.inference_mode():
        o = ld.attention(q, k, v, decay=0.5772156)
    assert_close("inference_mode float", o, ref.o, ref.o_abs, torch.float64)


def test_decode_step_in_inference_mode():
    q, k, v = problem(1)
    s0 = torch.zeros(1, 2, 4, 4, dtype=torch.float64)
    ref = reference(q, k, v, torch.tensor([0.3183098, 0.3183098], dtype=torch.float64), s0)
    with torch.inference_mode():
        o, s = ld.decode_step(q[:, :, 0], k[:, :, 0], v[:, :, 0], s0, decay=0.3183098)
    assert_close("inference_mode decode", o, ref.o[:, :, 0], ref.o_abs[:, :, 0], torch.float64)


def test_layer_built_in_inference_mode():
    with torch.inference_mode():  # a layer's decay (layer 3 of 7: values no other test uses)
        m = DecayingLinearAttention(hidden_size=8, num_heads=2, head_dim=4, layer_idx=3, num_layers=7)
        m(torch.randn(1, 3, 8))


# ----- 2. torch.jit.trace (and so the legacy torch.onnx.export) bakes the first decay into the graph -----
# snapshot() reads the values with tolist() and the memo returns a tensor built from them: under the tracer that
# is a constant, not a function of the traced input. snapshot skips torch.compile but not torch.jit.is_tracing().


def test_jit_traced_call_sees_a_new_decay():
    q, k, v = problem(70)
    first = torch.tensor([0.9, 0.5], dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(
            lambda q, k, v, lam: ld.attention(q, k, v, decay=lam, method="chunked"), (q, k, v, first),
            check_trace=False,
        )  # fmt: skip
    new = torch.tensor([0.3, 0.2], dtype=torch.float64)
    ref = reference(q, k, v, new)
    assert_close("jit.trace", traced(q, k, v, new), ref.o, ref.o_abs, torch.float64)


# ----- 3. causal_linear_decoder: a valid uint8 gamma is refused, and the error names log_decay -----
# original.causal_linear_decoder passes log_decay=-gamma: negating a uint8 tensor wraps around (1 -> 255).


def test_uint8_gamma_with_is_need_exp():
    q, k, v = problem()
    gamma = torch.tensor([1, 2], dtype=torch.uint8)
    ref = reference(q, k, v, torch.exp(-gamma.double()))
    o = ld.causal_linear_decoder(q, k, v, is_mask_weight=True, gamma=gamma)
    assert_close("uint8 gamma", o, ref.o, ref.o_abs, torch.float64)


# ----- 4. python ints beyond the float range: OverflowError instead of the limit / a ValueError -----
# decay._as_float_tensor calls float(x) unguarded.


def test_huge_negative_int_log_decay_is_the_lambda_zero_limit():
    q, k, v = problem(6)
    o = ld.attention(q, k, v, log_decay=-(10**400))  # lambda = 0: o_t = (q_t . k_t) v_t, as for -1e300
    expected = (q * k).sum(-1, keepdim=True) * v
    torch.testing.assert_close(o, expected, rtol=1e-13, atol=1e-15)


def test_huge_int_decay_is_a_value_error_naming_decay():
    q, k, v = problem(6)
    with pytest.raises(ValueError, match="decay"):
        ld.attention(q, k, v, decay=10**400)


# ----- 5. causal_linear_decoder: a refused attn_method is reported as method= -----
# original.causal_linear_decoder forwards to attention(method=...), whose MethodRefusedError says
# "method 'vanilla' cannot run ... Hint: method='auto' picks one": the caller passed attn_method.


def big():
    x = torch.zeros(1, 1, 1 << 20, 1)  # 4 MiB each; vanilla would need tens of TiB and is refused up front
    return x, x, x


def test_refused_attn_method_is_named_as_attn_method():
    with pytest.raises(ValueError) as e:
        ld.causal_linear_decoder(*big(), attn_method="vanilla")
    assert "attn_method" in str(e.value), str(e.value)


# ----- 6. explain with a forced method that cannot run -----
# dispatch.explain catches the MethodRefusedError of the forced method and reports "no method can run these
# inputs" with forced=False and no other method, although chunked, fleet, ... run them.


@pytest.mark.parametrize("how", ["argument", "env"])
def test_explain_of_a_refused_forced_method(monkeypatch, how):
    kwargs = {"method": "vanilla"} if how == "argument" else {}
    if how == "env":
        monkeypatch.setenv(dispatch.ENV_METHOD, "vanilla")
    e = ld.explain(*big(), **kwargs)
    assert e.method is None
    assert "no method can run these inputs" not in str(e), str(e)
    assert e.forced and "chunked" in e.others


def test_env_forced_refusal_does_not_hint_method_auto(monkeypatch):
    """The call already said method='auto'; the error must name LEETDECODING_METHOD, which forced vanilla."""
    monkeypatch.setenv(dispatch.ENV_METHOD, "vanilla")
    with pytest.raises(ValueError) as e:
        ld.attention(*big())
    assert dispatch.ENV_METHOD in str(e.value), str(e.value)


# ----- 7. an overlapping out_state is a torch RuntimeError from inside the step, not a clear error -----


def test_expanded_out_state_is_refused_by_name():
    q, k, v = problem(1, b=2)
    s = torch.zeros(1, 2, 4, 4, dtype=torch.float64).expand(2, -1, -1, -1)
    with pytest.raises(ValueError, match="out_state"):
        ld.decode_step(q[:, :, 0], k[:, :, 0], v[:, :, 0], s, 0.9, out_state=s)


# ----- 8. memory estimates below the measured peak at untested shapes -----
# vanilla with B = H = 1 (the fp64 index-difference table and its clamped copy, N^2 x 8 bytes each, are counted
# as one N^2 table in the compute dtype); fleet with a small Dv (per-token tensors of the group, (g, N) each,
# dominate when Dv is small; group_size makes g large as Dv shrinks).


@pytest.mark.parametrize(
    "method,shape",
    [("vanilla", [1, 1, 2000, 8, 8]), ("fleet", [1, 2, 20000, 32, 1]), ("fleet", [2, 4, 20000, 16, 4])],
    ids=str,
)
def test_estimate_is_an_upper_bound(method, shape):
    if not sys.platform.startswith("linux"):
        pytest.skip("the peak is read from /proc (Linux)")
    from leetdecoding.bench.memory import measure_cases

    (r,) = list(measure_cases([{"method": method, "shape": shape, "dtype": "fp32"}]))
    if r["peak"] is None:
        pytest.skip("the high-water mark cannot be reset here")
    assert r["peak"] <= r["estimate"], f"measured {r['peak'] / 2**20:.1f} MiB > estimate {r['estimate'] / 2**20:.1f}"
