"""Cases a review of the exactness fixes found: garbage in padded positions of the layers, refusals that describe
the caller's packed inputs, and subnormal numbers flushed during a call (exact, fast, the caller's setting kept)."""

from __future__ import annotations

import pytest
import torch

import leetdecoding as ld
from leetdecoding.nn import DecayingLinearAttention

from .reference import assert_close, reference, reference_closed_form

TINY32 = torch.finfo(torch.float32).tiny


def flushing() -> bool:
    return bool(torch.tensor(TINY32) * 0.5 == 0)


def test_layer_attention_mask_with_garbage_in_padding():
    """Padded tokens are zeroed by selection, not by multiplying with the mask (NaN * 0 = NaN)."""
    torch.manual_seed(0)
    layer = DecayingLinearAttention(16, 2, layer_idx=0, num_layers=2)
    x = torch.randn(2, 8, 16)
    mask = torch.ones(2, 8)
    mask[1, :3] = 0
    garbage = x.clone()
    garbage[1, :3] = float("nan")
    with torch.no_grad():
        clean, dirty = layer(x, attention_mask=mask), layer(garbage, attention_mask=mask)
    assert torch.isfinite(dirty[1, 3:]).all(), "real tokens after NaN padding are not finite"
    torch.testing.assert_close(dirty[1, 3:], clean[1, 3:], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dirty[0], clean[0])


def test_patched_minimax_attention_mask_with_garbage_in_padding():
    pytest.importorskip("transformers")
    from transformers import MiniMaxConfig
    from transformers.models.minimax.modeling_minimax import MiniMaxLightningAttention

    from leetdecoding.integrations import hf_minimax

    config = MiniMaxConfig(hidden_size=32, num_attention_heads=2, head_dim=16, num_hidden_layers=2)
    torch.manual_seed(0)
    attn = MiniMaxLightningAttention(config, layer_idx=0)
    hf_minimax.patch(attn)
    x = torch.randn(2, 8, 32)
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, :3] = 0
    garbage = x.clone()
    garbage[1, :3] = float("nan")
    with torch.no_grad():
        clean = attn(x, position_embeddings=None, attention_mask=mask)[0]
        dirty = attn(garbage, position_embeddings=None, attention_mask=mask)[0]
    assert torch.isfinite(dirty[1, 3:]).all()
    torch.testing.assert_close(dirty[1, 3:], clean[1, 3:], rtol=1e-5, atol=1e-6)


def test_forced_method_refusal_describes_the_callers_packed_inputs():
    q, k, v = (torch.randn(1, 2, 5, d, requires_grad=True) for d in (3, 3, 2))
    with pytest.raises(ld.MethodRefusedError) as info:
        ld.attention(q, k, v, decay=0.9, method="fleet", cu_seqlens=torch.tensor([0, 0, 3, 3, 5]))
    message = str(info.value)
    assert "(1, 2, 5, 3)" in message and "packed" in message, message


@pytest.mark.parametrize("method", ["chunked", "vanilla", "recurrent", "recursion", "fleet"])
@pytest.mark.parametrize("user_flushes", [False, True])
def test_subnormals_flushed_during_a_call_only(method, user_flushes):
    """Inside a CPU call every result below the smallest normal number is 0 (subnormal arithmetic is many times
    slower); normal terms down to that number stay exact, and the caller's setting is back afterwards."""
    g = torch.Generator().manual_seed(1)
    n = 130
    q = torch.zeros(1, 1, n, 2)
    q[..., 0] = 1.0
    k = torch.zeros(1, 1, n, 2)
    k[..., 1] = 1.0
    k[:, :, 0] = torch.tensor([1.0, 0.0])
    v = torch.ones(1, 1, n, 1)
    noise = torch.randn(1, 1, n, 2, generator=g) * 1e-3  # ordinary values beside the tiny terms
    q2 = torch.cat((q, noise), dim=-1)
    k2 = torch.cat((k, torch.zeros_like(noise)), dim=-1)
    torch.set_flush_denormal(user_flushes)
    try:
        o = ld.attention(q2, k2, v, decay=0.5, method=method)
        assert flushing() == user_flushes
    finally:
        torch.set_flush_denormal(False)
    expected = 0.5 ** torch.arange(n, dtype=torch.float64)  # o_t = 0.5^t: normal in fp32 up to t = 125
    got = o[0, 0, :, 0].double()
    normal = expected >= 2 * TINY32
    torch.testing.assert_close(got[normal], expected[normal], rtol=2e-6, atol=0)
    assert ((got[~normal] >= 0) & (got[~normal] <= 2 * TINY32)).all()


def test_backward_keeps_the_callers_setting_and_is_exact():
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, 70, 4, generator=g, dtype=torch.float64).requires_grad_() for _ in range(3))
    log_decay = torch.tensor([-0.7, -0.05], dtype=torch.float64)
    o = ld.attention(q, k, v, log_decay=log_decay, method="chunked")
    o.square().sum().backward()
    assert not flushing()
    ref_o, _ = reference_closed_form(q, k, v, log_decay)
    ref = torch.autograd.grad(ref_o.square().sum(), (q, k, v))
    for got, want in zip((q.grad, k.grad, v.grad), ref):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_causal_linear_decoder_within_reference():
    """The original call goes through the same flush: still within the fp32 tolerance of the fp64 reference."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 200, 8, generator=g) for _ in range(3))
    gamma = torch.tensor([0.7, 0.01])
    o = ld.causal_linear_decoder(q, k, v, is_mask_weight=True, gamma=gamma, attn_method="block-based")
    ref = reference(q.double(), k.double(), v.double(), torch.exp(-gamma.double()))
    assert_close("causal_linear_decoder", o, ref.o, ref.o_abs, torch.float32)
