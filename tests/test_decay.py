"""Each decay convention against its source formula."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

import leetdecoding as ld
from leetdecoding import decay


@pytest.mark.parametrize("heads,layer,layers", [(8, 0, 12), (8, 11, 12), (64, 40, 80), (6, 1, 2), (4, 0, 1)])
def test_minimax_matches_transformers(heads, layer, layers):
    modeling = pytest.importorskip("transformers.models.minimax.modeling_minimax")
    module = SimpleNamespace(num_attention_heads=heads, layer_idx=layer, num_hidden_layers=layers)
    expected = modeling.MiniMaxLightningAttention.get_slope_rate(module).reshape(-1)
    assert torch.equal(decay.minimax_rates(heads, layer, layers), expected)
    assert torch.equal(decay.minimax(heads, layer, layers), -expected)


def test_alibi_slopes_known_values():
    # power of two: 2^(-8 (h+1) / n)
    assert torch.allclose(decay.alibi_slopes(8).double(), 2.0 ** -torch.arange(1, 9, dtype=torch.float64), rtol=1e-7)
    assert torch.allclose(
        decay.alibi_slopes(4).double(), 2.0 ** (-2.0 * torch.arange(1, 5, dtype=torch.float64)), rtol=1e-7
    )
    # 12 heads: the 8 slopes of n=8, then every other slope of n=16 (2^-0.5, 2^-1.5, 2^-2.5, 2^-3.5)
    expected = [2.0**-i for i in range(1, 9)] + [2.0**-0.5, 2.0**-1.5, 2.0**-2.5, 2.0**-3.5]
    assert torch.allclose(decay.alibi_slopes(12).double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-7)
    assert torch.equal(decay.alibi(12), -decay.alibi_slopes(12))


@pytest.mark.parametrize("heads", [1, 8, 32])
def test_retnet_gammas(heads):
    ld_ = decay.retnet(heads).double()
    gamma = 1 - 2.0 ** (-5.0 - torch.arange(heads, dtype=torch.float64))
    assert torch.allclose(torch.exp(ld_), gamma, rtol=1e-7, atol=0)
    # 1 - gamma, the part that matters for long memories, is kept to fp32 precision
    assert torch.allclose(-torch.expm1(ld_), 1 - gamma, rtol=1e-6, atol=0)


@pytest.mark.parametrize("layer,layers", [(0, 24), (5, 24), (23, 24), (0, 1)])
def test_lightning_transnormer_formula(layer, layers):
    factor = 1 + 1e-5 if layers == 1 else 1 - layer / (layers - 1) + 1e-5
    assert torch.equal(decay.lightning(16, layer, layers), -decay.alibi_slopes(16) * factor)
    assert bool((decay.lightning(16, layer, layers) < 0).all())


def test_rate_and_decay_converters_round_trip():
    rate = torch.tensor([0.0, 0.5, 3.0])
    assert torch.equal(decay.from_rate(rate), -rate)
    lam = torch.tensor([1.0, 0.5, 1e-6])
    assert torch.allclose(decay.to_decay(decay.from_decay(lam)), lam, rtol=1e-6)
    assert decay.from_decay(0.5).item() == pytest.approx(math.log(0.5))
    with pytest.raises(ValueError, match="rate must be finite and >= 0"):
        decay.from_rate(torch.tensor([-1.0]))


def test_converter_argument_errors():
    with pytest.raises(ValueError, match="num_heads must be a positive int"):
        decay.alibi_slopes(0)
    with pytest.raises(ValueError, match=r"layer_idx must be an int in \[0, 4\)"):
        decay.minimax(8, 4, 4)


def test_attention_takes_every_convention():
    """log_decay from a converter, decay = exp(log_decay), and the rate convention agree."""
    q, k, v = (torch.randn(1, 8, 33, 16, dtype=torch.float64) for _ in range(3))
    log_dec = decay.minimax(8, 2, 12).double()
    a = ld.attention(q, k, v, log_decay=log_dec)
    b = ld.attention(q, k, v, decay=torch.exp(log_dec))
    c = ld.attention(q, k, v, log_decay=decay.from_rate(decay.minimax_rates(8, 2, 12)).double())
    assert torch.allclose(a, b, rtol=1e-12, atol=1e-12) and torch.equal(a, c)


def test_validated_decay_is_reused_but_not_after_an_in_place_change():
    """Decoding passes the same decay every token; a cached validation must notice an in-place edit."""
    rates = torch.tensor([0.1, 0.2])
    first = decay.canonical_log_decay(None, -rates, 2, torch.device("cpu"), torch.float32)
    lam = torch.tensor([0.5, 0.25])
    a = decay.canonical_log_decay(lam, None, 2, torch.device("cpu"), torch.float32)
    assert decay.canonical_log_decay(lam, None, 2, torch.device("cpu"), torch.float32) is a
    lam[0] = 2.0
    with pytest.raises(ValueError, match=r"decay must be in \(0, 1\]"):
        decay.canonical_log_decay(lam, None, 2, torch.device("cpu"), torch.float32)
    lam[0] = 0.125
    b = decay.canonical_log_decay(lam, None, 2, torch.device("cpu"), torch.float32)
    assert b.tolist() == pytest.approx([math.log(0.125), math.log(0.25)])
    assert torch.equal(first, -rates)


def _fla_lightning_source(heads, layer, layers, dtype):
    """fla.ops.lightning_attn.chunk_lightning_attn (fla 0.3 on): g_gamma = -(8 / H * (1 - layer_idx / num_layers))
    * q.new_tensor(range(H), dtype=torch.float), here in `dtype`."""
    return -(8 / heads * (1 - layer / layers)) * torch.tensor(range(heads), dtype=dtype)


@pytest.mark.parametrize("heads,layer,layers", [(8, 0, 12), (8, 11, 12), (6, 1, 2), (4, 0, 1), (64, 40, 80)])
def test_fla_lightning_matches_fla_formula(heads, layer, layers):
    for dtype in (torch.float32, torch.float64):
        got = decay.fla_lightning(heads, layer, layers, dtype=dtype)
        assert got.dtype == dtype and torch.equal(got, _fla_lightning_source(heads, layer, layers, dtype))
    # linear in h, head 0 undecayed: a different convention from TransNormerLLM's
    exact = [-(8 / heads) * (1 - layer / layers) * h for h in range(heads)]
    assert torch.allclose(decay.fla_lightning(heads, layer, layers, dtype=torch.float64),
                          torch.tensor(exact, dtype=torch.float64), rtol=1e-15, atol=0)  # fmt: skip
    assert decay.fla_lightning(heads, layer, layers)[0].item() == 0.0
    assert not torch.allclose(decay.fla_lightning(heads, layer, layers), decay.transnormer(heads, layer, layers))


def test_transnormer_matches_transnormerllm_source():
    """TransnormerModel.forward: slope_rate = _build_slope_tensor(H) * (1 - idx / (num_layers - 1) + 1e-5), in fp32;
    for 8 heads the slopes are 2^-(h+1). `lightning` is the earlier name of the same convention."""
    assert decay.lightning is decay.transnormer
    for layer in (0, 3, 23):
        factor = 1 - layer / 23 + 1e-5
        slopes = torch.tensor([2.0 ** -(h + 1) for h in range(8)], dtype=torch.float32)
        assert torch.equal(decay.transnormer(8, layer, 24), -(slopes * factor))


def test_retnet_is_fla_retention_gammas():
    """fla.ops.retention.chunk_retention: g_gamma = log(1 - 2^(-5 - h)), formed in fp32. In fp64 the converter gives
    the formula's values; in fp32 it agrees with fla's fp32 expression to one rounding while 1 - 2^(-5-h) is an fp32
    number (h < 20), and keeps a decay where fla's rounds to 1 (h >= 20)."""
    h = torch.arange(32, dtype=torch.float64)
    exact = torch.log(1 - 2.0 ** (-5.0 - h))
    got = decay.retnet(32, dtype=torch.float64)
    assert got.dtype == torch.float64 and torch.allclose(got, exact, rtol=1e-15, atol=0)
    hf = torch.arange(32, dtype=torch.float32)
    fla32 = (1 - torch.tensor(2.0).pow(-5.0 - hf)).log()
    assert torch.allclose(decay.retnet(32)[:20], fla32[:20], rtol=2.0**-23, atol=0)
    assert bool((fla32[20:] == 0).all()) and bool((decay.retnet(32)[20:] < 0).all())


def test_a_converter_passed_as_decay_says_to_pass_it_as_log_decay():
    q = torch.randn(1, 8, 4, 4)
    with pytest.raises(ValueError, match=r"decay must be in \(0, 1\].*return log lambda: pass them as log_decay="):
        ld.attention(q, q, q, decay=ld.decay.retnet(8))
