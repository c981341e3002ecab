"""The original `causal_linear_decoder` call: its semantics, every original method name, one decay convention."""

from __future__ import annotations

import pytest
import torch

import leetdecoding as ld
from leetdecoding.methods.naive import reference
from leetdecoding.original import ALIASES

from .reference import assert_close


def inputs(h=8, n=258, dk=16, dv=24):
    # N % 256 = 2 < H: the original sliced the head axis instead of time for such lengths
    return (torch.randn(2, h, n, d, dtype=torch.float64) for d in (dk, dk, dv))


@pytest.mark.parametrize("attn_method", [None, *ALIASES])
def test_every_name_both_conventions(attn_method):
    q, k, v = inputs()
    gamma = torch.linspace(0.01, 2.0, 8, dtype=torch.float64)
    plain = reference(q, k, v, 1.0)
    exp_conv = reference(q, k, v, torch.exp(-gamma))
    direct = reference(q, k, v, torch.sigmoid(gamma))
    f64 = torch.float64
    assert_close("plain", ld.causal_linear_decoder(q, k, v, attn_method=attn_method), plain.o, plain.o_abs, f64)
    o = ld.causal_linear_decoder(q, k, v, is_mask_weight=True, gamma=gamma, attn_method=attn_method)
    assert_close("exp(-gamma)", o, exp_conv.o, exp_conv.o_abs, f64)
    o = ld.causal_linear_decoder(
        q, k, v, is_mask_weight=True, gamma=torch.sigmoid(gamma), is_need_exp=False, attn_method=attn_method
    )
    assert_close("gamma as lambda", o, direct.o, direct.o_abs, f64)


def test_low_precision_keeps_dtype():
    q, k, v = (t.to(torch.bfloat16) for t in inputs(n=300))
    gamma = torch.full((8,), 0.1)
    o = ld.causal_linear_decoder(q, k, v, is_mask_weight=True, gamma=gamma)
    ref = reference(q, k, v, torch.exp(-gamma.double()))
    assert o.dtype == torch.bfloat16
    assert_close("bf16", o, ref.o, ref.o_abs, torch.bfloat16)


def test_errors():
    q, k, v = inputs()
    with pytest.raises(ValueError, match="gamma is given but is_mask_weight=False"):
        ld.causal_linear_decoder(q, k, v, gamma=torch.ones(8))
    with pytest.raises(ValueError, match=r"gamma must be a tensor of shape \(8,\).*got \(4,\)"):
        ld.causal_linear_decoder(q, k, v, is_mask_weight=True, gamma=torch.ones(4))
    with pytest.raises(ValueError, match="is_mask_weight=True needs gamma"):
        ld.causal_linear_decoder(q, k, v, is_mask_weight=True)
    with pytest.raises(ValueError, match="needs gamma >= 0"):
        ld.causal_linear_decoder(q, k, v, is_mask_weight=True, gamma=-torch.ones(8))
    with pytest.raises(ValueError, match=r"is_need_exp=False, lambda = gamma must be in \(0, 1\]; got gamma = 2"):
        ld.causal_linear_decoder(q, k, v, is_mask_weight=True, gamma=torch.full((8,), 2.0), is_need_exp=False)
    with pytest.raises(ValueError, match="unknown method 'lightning3'"):
        ld.causal_linear_decoder(q, k, v, attn_method="lightning3")


def test_gpu_names_run_the_same_algorithm_in_pytorch_where_the_kernel_cannot_run():
    # the alias table names the Triton kernel and the PyTorch method; the dispatcher picks, and says why
    q, k, v = inputs(n=8)
    with ld.record_choices() as made:
        o = ld.causal_linear_decoder(q, k, v, attn_method="FleetAttention")
    assert [c.method.name for c in made] == ["fleet"] and "['triton_fleet', 'fleet']" in made[0].reason
    ref = reference(q, k, v, 1.0)
    assert_close("FleetAttention on CPU", o, ref.o, ref.o_abs, q.dtype)
