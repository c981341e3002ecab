"""The layer with a cache: prefill + decode equals one forward; MiniMax weights load and give MiniMax's output."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import leetdecoding as ld
from leetdecoding.methods.naive import reference_closed_form
from leetdecoding.nn import DecayingLinearAttention, LinearAttentionCache


def layer(**kw):
    torch.manual_seed(0)
    return DecayingLinearAttention(hidden_size=48, num_heads=4, head_dim=16, layer_idx=1, num_layers=4, **kw).double()


@pytest.mark.parametrize("activate_v", [True, False])
def test_prefill_then_steps_equals_one_forward(activate_v):
    m = layer(activate_v=activate_v)
    x = torch.randn(2, 50, 48, dtype=torch.float64)
    with torch.no_grad():
        full = m(x)
        cache = LinearAttentionCache()
        parts = [m(x[:, :30], cache=cache)]
        parts += [m(x[:, t : t + 1], cache=cache) for t in range(30, 40)]  # one token at a time
        parts.append(m(x[:, 40:], cache=cache))  # several new tokens at once, from the cache
    assert torch.allclose(torch.cat(parts, 1), full, rtol=1e-10, atol=1e-12)
    assert cache.get(1).shape == (2, 4, 16, 16) and cache.get(1).dtype == torch.float64


def test_cache_select_repeat_and_reset():
    m = layer()
    x = torch.randn(2, 20, 48, dtype=torch.float64)
    with torch.no_grad():
        cache = LinearAttentionCache()
        m(x[:, :10], cache=cache)
        cache.repeat_interleave(3)  # beams: rows 0,0,0,1,1,1
        assert cache.batch_size == 6
        cache.select(torch.tensor([4, 0]))  # keep one beam of each prompt, swapped
        out = m(x[[1, 0], 10:], cache=cache)
        assert torch.allclose(out, m(x[[1, 0]])[:, 10:], rtol=1e-10, atol=1e-12)
    cache.reset()
    assert cache.get(1) is None and cache.batch_size is None


def test_loads_minimax_weights_and_matches_it():
    modeling = pytest.importorskip("transformers.models.minimax.modeling_minimax")
    from transformers import MiniMaxConfig

    config = MiniMaxConfig(
        hidden_size=64, num_attention_heads=4, head_dim=16, num_hidden_layers=3, layer_types=["linear_attention"] * 3
    )
    torch.manual_seed(0)
    theirs = modeling.MiniMaxLightningAttention(config, 2).eval()
    for p in theirs.parameters():
        torch.nn.init.normal_(p, std=0.2)
    ours = DecayingLinearAttention(64, 4, 16, layer_idx=2, num_layers=3).eval()
    ours.load_state_dict(theirs.state_dict())
    assert torch.equal(ours.log_decay, -theirs.slope_rate.reshape(-1))
    x = torch.randn(2, 300, 64)  # not a multiple of MiniMax's block of 256
    with torch.no_grad():
        expected = theirs(x, None, None)[0]
        got = ours(x)
    assert ((got - expected).abs().max() / expected.abs().max()).item() < 1e-5


def test_padding_mask_zeroes_padded_tokens():
    m = layer()
    x = torch.randn(1, 12, 48, dtype=torch.float64)
    mask = torch.tensor([[0, 0, 0] + [1] * 9])  # left padding
    with torch.no_grad():
        padded = m(x, attention_mask=mask)[:, 3:]
        alone = m(x[:, 3:])
    assert torch.allclose(padded, alone, rtol=1e-10, atol=1e-12)


def test_other_decay_conventions_and_errors():
    m = DecayingLinearAttention(32, 4, log_decay=ld.decay.retnet(4))
    assert torch.allclose(torch.exp(m.log_decay.double()), 1 - 2.0 ** (-5.0 - torch.arange(4.0, dtype=torch.float64)))
    with pytest.raises(ValueError, match="activation must be one of"):
        DecayingLinearAttention(32, 4, activation="gelu")
    with pytest.raises(ValueError, match="log_decay must be <= 0"):
        DecayingLinearAttention(32, 4, log_decay=torch.ones(4))


def test_one_token_after_a_cache_is_a_decode_step_in_place():
    m = layer()
    x = torch.randn(2, 12, 48, dtype=torch.float64)
    with torch.no_grad():
        full = m(x)
        cache = LinearAttentionCache()
        first = m(x[:, :11], cache=cache)
        state = cache.get(1)
        with ld.record_choices() as made:
            last = m(x[:, 11:], cache=cache)
    assert [c.operation for c in made] == ["decode_step"]
    assert cache.get(1) is state and cache.get_seq_length(1) == 12  # the one buffer, written in place
    assert torch.allclose(torch.cat([first, last], 1), full, rtol=1e-10, atol=1e-12)


def test_decode_with_gradients_matches_the_reference():
    """With autograd on, one token after a cached state is a decode step that leaves the cached state as it was and
    gives the fp64 closed form's gradients, a learnable decay's included."""
    m = layer(learnable_decay=True, use_norm=False)
    x = torch.randn(1, 9, 48, dtype=torch.float64)
    cache = LinearAttentionCache()
    with torch.no_grad():
        m(x[:, :8], cache=cache)
    state = cache.get(1)
    kept = state.clone()
    m(x[:, 8:], cache=cache).sum().backward()
    got = [p.grad.clone() for p in (m.log_decay, m.qkv_proj.weight)]
    assert cache.get(1) is not state and torch.equal(state, kept)
    m.zero_grad()
    q, k, v = F.silu(m.qkv_proj(x[:, 8:])).view(1, 1, 4, 3, 16).permute(3, 0, 2, 1, 4)  # per head [q | k | v]
    o = reference_closed_form(q, k, v, m.log_decay, state)[0].transpose(1, 2).reshape(1, 1, 64)
    m.out_proj(torch.sigmoid(m.output_gate(x[:, 8:])) * o).sum().backward()
    for g, p in zip(got, (m.log_decay, m.qkv_proj.weight)):
        assert torch.allclose(g, p.grad, rtol=1e-10, atol=1e-12)
