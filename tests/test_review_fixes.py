"""Cases a review of the exactness fixes found: garbage in padded positions of the layers, refusals that describe
the caller's packed inputs, and the chunk size chosen so that tiny decay factors stay exact without subnormal
products (which CPUs compute many times slower)."""

from __future__ import annotations

import pytest
import torch

import leetdecoding as ld
from leetdecoding import dispatch
from leetdecoding.methods.naive import reference
from leetdecoding.nn import DecayingLinearAttention

from .reference import assert_close

TINY32 = torch.finfo(torch.float32).tiny


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("chunk", [16, 64, 128, 256])
def test_subnormal_band_powers_counts_the_powers(dtype, chunk):
    """Against the powers themselves: j in [1, chunk] with tiny <= lambda^j <= SUBNORMAL_BAND * tiny, one head at a
    time (lambda^j in fp64 from the same log lambda; values chosen away from the band's edges)."""
    tiny = torch.finfo(dtype).tiny
    logs = torch.log(torch.tensor([1.0, 0.9, 0.6, 0.37, 0.1, 0.013], dtype=torch.float64)).to(dtype)
    j = torch.arange(1, chunk + 1, dtype=torch.float64)
    expected = max(
        int(((p >= tiny) & (p <= dispatch.SUBNORMAL_BAND * tiny)).sum())
        for p in (torch.exp(g.double() * j) for g in logs)
    )
    assert dispatch.subnormal_band_powers(logs, chunk) == expected
    if dtype == torch.float32 and chunk == 256:
        assert expected > 1  # the case is not vacuous


@pytest.mark.parametrize("decay,chunk", [(0.9, 64), (0.5, 64), (0.1, 32), (0.05, 16), (0.01, 64)])
def test_chunk_halved_where_factors_would_turn_products_subnormal(decay, chunk):
    """`python -m benchmarks.subnormal_decays` (N = 4096, D = 128): each chosen chunk was within 6% of the fastest."""
    q = torch.randn(1, 2, 300, 128)
    assert ld.explain(q, q, q, decay=decay, method="chunked").options["chunk_size"] == chunk


@pytest.mark.parametrize("method", ["auto", "chunked", "vanilla", "recurrent", "recursion", "fleet"])
def test_tiny_terms_exact_with_the_chosen_chunk(method):
    """o_t = 0.5^t (normal in fp32 down to t = 126) with the chunk the dispatcher picks for lambda = 0.5, and
    ordinary values beside the tiny terms."""
    g = torch.Generator().manual_seed(1)
    n = 140
    q = torch.zeros(1, 1, n, 4)
    q[..., 0] = 1.0
    q[..., 2:] = torch.randn(1, 1, n, 2, generator=g) * 1e-3
    k = torch.zeros(1, 1, n, 4)
    k[..., 1] = 1.0
    k[:, :, 0] = torch.tensor([1.0, 0.0, 0.0, 0.0])
    v = torch.ones(1, 1, n, 1)
    o = ld.attention(q, k, v, decay=0.5, method=method)
    expected = 0.5 ** torch.arange(n, dtype=torch.float64)
    got = o[0, 0, :, 0].double()
    normal = expected >= 2 * TINY32
    torch.testing.assert_close(got[normal], expected[normal], rtol=2e-6, atol=0)
    assert ((got[~normal] >= 0) & (got[~normal] <= 2 * TINY32)).all()


def test_causal_linear_decoder_within_reference():
    """The original call with a fast-decaying head (lambda = 0.01) and a slow one, against the fp64 reference."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 200, 8, generator=g) for _ in range(3))
    gamma = torch.tensor([0.7, 0.01])
    o = ld.causal_linear_decoder(q, k, v, is_mask_weight=True, gamma=gamma, attn_method="block-based")
    ref = reference(q.double(), k.double(), v.double(), torch.exp(-gamma.double()))
    assert_close("causal_linear_decoder", o, ref.o, ref.o_abs, torch.float32)
