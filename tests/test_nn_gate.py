"""The layer's data-dependent decay (decay_gate=True, fla's SimpleGLA convention): prefill + decode through the cache
equals one call and the fp64 reference, gradients reach the gate, padding leaves the state as it was, a short
training run teaches the gate, and the constant-decay layer keeps its parameters."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import leetdecoding as ld
from leetdecoding.layers import gate_log_decay, gated_output, split_heads
from leetdecoding.methods.naive import reference, reference_closed_form
from leetdecoding.nn import ACTIVATIONS, DecayingLinearAttention, LinearAttentionCache

HIDDEN, HEADS, HEAD_DIM = 48, 4, 16


def gated_layer(seed=0, **kw):
    torch.manual_seed(seed)
    m = DecayingLinearAttention(HIDDEN, HEADS, HEAD_DIM, layer_idx=1, num_layers=4, decay_gate=True, **kw)
    with torch.no_grad():  # gate logits around -2 +- 3: decays from about 1 down to exp(-0.4) per token
        m.gk_proj.weight.normal_(0.0, 3.0 / math.sqrt(HIDDEN))
        m.gk_proj.bias.fill_(-2.0)
    return m.double()


def by_hand(m, x, state=None):
    """The layer's output from its parts, with the fp64 recurrence (naive.reference) for the attention:
    (y, final state, the log decays (B, H, N))."""
    q, k, v = split_heads(m.qkv_proj(x), HEADS, HEAD_DIM, ACTIVATIONS[m.activation])
    g = F.logsigmoid(m.gk_proj(x)).transpose(1, 2) / m.gate_logit_normalizer  # fla: logsigmoid(gk) / normaliser
    ref = reference(q, k, v, torch.exp(g), state, m.scale)
    o = ref.o.transpose(1, 2).reshape(x.shape[0], x.shape[1], HEADS * HEAD_DIM)
    return gated_output(o, x, m.norm, m.output_gate, m.out_proj), ref.state, g


def test_prefill_then_decode_equals_one_call_and_the_fp64_reference():
    m = gated_layer()
    x = torch.randn(2, 40, HIDDEN, dtype=torch.float64)
    with torch.no_grad():
        full = m(x)
        expected, expected_state, g = by_hand(m, x)
        cache = LinearAttentionCache()
        parts = [m(x[:, :25], cache=cache)]
        with ld.record_choices() as made:
            parts += [m(x[:, t : t + 1], cache=cache) for t in range(25, 33)]  # one token at a time
        parts.append(m(x[:, 33:], cache=cache))  # several tokens continuing from the cache
    assert [c.operation for c in made] == ["decode_step"] * 8
    assert g.min() < -0.2 and g.max() > -0.01  # the decays vary per token: the test would see a wrong one
    assert torch.allclose(full, expected, rtol=1e-10, atol=1e-12)
    assert torch.allclose(torch.cat(parts, 1), full, rtol=1e-10, atol=1e-12)
    assert torch.allclose(cache.get(1), expected_state, rtol=1e-10, atol=1e-12)
    assert cache.get_seq_length(1) == 40 and m.log_decay is None


def test_gradients_reach_the_gate_through_prefill_and_decode():
    """With autograd on, the prefill and a decode step after it give the gradients of the fp64 closed form for
    gk_proj's weight and bias (and qkv_proj's)."""
    m = gated_layer(use_norm=False)
    x = torch.randn(1, 13, HIDDEN, dtype=torch.float64)
    cache = LinearAttentionCache()
    y = torch.cat([m(x[:, :12], cache=cache), m(x[:, 12:], cache=cache)], 1)
    (y * torch.linspace(-1, 1, HIDDEN, dtype=torch.float64)).sum().backward()
    params = (m.gk_proj.weight, m.gk_proj.bias, m.qkv_proj.weight)
    got = [p.grad.clone() for p in params]
    m.zero_grad()
    q, k, v = split_heads(m.qkv_proj(x), HEADS, HEAD_DIM, F.silu)
    g = F.logsigmoid(m.gk_proj(x)).transpose(1, 2) / 16.0
    o = reference_closed_form(q, k, v, g)[0].transpose(1, 2).reshape(1, 13, HEADS * HEAD_DIM)
    y = m.out_proj(torch.sigmoid(m.output_gate(x)) * o)
    (y * torch.linspace(-1, 1, HIDDEN, dtype=torch.float64)).sum().backward()
    for name, a, p in zip(("gk_proj.weight", "gk_proj.bias", "qkv_proj.weight"), got, params):
        assert a.abs().max() > 0, name
        assert torch.allclose(a, p.grad, rtol=1e-9, atol=1e-12), name


def test_padding_gets_no_decay_and_leaves_the_state_as_it_was():
    m = gated_layer()
    x = torch.randn(1, 12, HIDDEN, dtype=torch.float64)
    x[:, :3] = float("nan")  # left padding holding NaN: it must reach neither the output nor the decay
    x[:, 10:] = float("nan")  # right padding: the cached state is the one after token 9
    mask = torch.tensor([[0, 0, 0] + [1] * 7 + [0, 0]])
    with torch.no_grad():
        cache = LinearAttentionCache()
        padded = m(x, cache=cache, attention_mask=mask)[:, 3:10]
        alone, state = by_hand(m, x[:, 3:10])[:2]
    assert torch.allclose(padded, alone, rtol=1e-10, atol=1e-12)
    assert torch.allclose(cache.get(1), state, rtol=1e-10, atol=1e-12)
    logits = torch.randn(2, 5, HEADS, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0, 1, 1], [0, 1, 1, 1, 1]])
    g = gate_log_decay(logits, 4.0, mask)
    assert torch.equal(g, F.logsigmoid(logits).transpose(1, 2) / 4.0 * mask[:, None])


def test_half_precision_layer_keeps_fp32_decays_and_state():
    m = gated_layer().to(torch.bfloat16)
    logits = m.gk_proj(torch.randn(1, 3, HIDDEN, dtype=torch.bfloat16))
    assert gate_log_decay(logits, 16.0).dtype == torch.float32
    x = torch.randn(2, 20, HIDDEN, dtype=torch.bfloat16)
    with torch.no_grad():
        cache = LinearAttentionCache()
        y = torch.cat([m(x[:, :19], cache=cache), m(x[:, 19:], cache=cache)], 1)
        expected = by_hand(m.double(), x.double())[0]
    assert y.dtype == torch.bfloat16 and cache.get(1).dtype == torch.float32
    assert ((y.double() - expected).abs().max() / expected.abs().max()).item() < 3e-2  # bf16 projections


def test_a_short_training_run_teaches_the_gate():
    """A student with a teacher's weights but its own gate, only the gate trained: the loss falls and the
    student's decays come near the teacher's (seeded, CPU, seconds)."""
    teacher = gated_layer(seed=1).float()
    student = gated_layer(seed=2).float()
    student.load_state_dict(
        {k: v for k, v in teacher.state_dict().items() if not k.startswith("gk_proj")}, strict=False
    )
    for p in student.parameters():
        p.requires_grad_(p is student.gk_proj.weight or p is student.gk_proj.bias)
    start = [p.detach().clone() for p in student.gk_proj.parameters()]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 24, HIDDEN, generator=gen)
    with torch.no_grad():
        target = teacher(x)
        decays = [gate_log_decay(m.gk_proj(x), 16.0) for m in (teacher, student)]
    distance = (decays[0] - decays[1]).abs().mean().item()
    optimiser = torch.optim.Adam(student.gk_proj.parameters(), lr=0.05)
    losses = []
    for _ in range(30):
        optimiser.zero_grad()
        loss = F.mse_loss(student(x), target)
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    with torch.no_grad():
        learnt = (gate_log_decay(teacher.gk_proj(x), 16.0) - gate_log_decay(student.gk_proj(x), 16.0)).abs().mean()
    assert losses[-1] < 0.15 * losses[0], losses  # seeded: 0.06 x
    assert learnt.item() < 0.6 * distance  # 0.4 x
    assert all(not torch.equal(a, b) for a, b in zip(start, student.gk_proj.parameters()))


def test_the_constant_decay_layer_keeps_its_parameters_and_the_gated_one_has_flas():
    constant = DecayingLinearAttention(32, 4)
    before = ["log_decay", "qkv_proj.weight", "output_gate.weight", "norm.weight", "out_proj.weight"]  # as at 0496045
    assert list(constant.state_dict()) == before
    assert constant.gk_proj is None
    gated = DecayingLinearAttention(32, 4, decay_gate=True, gate_logit_normalizer=8)
    shapes = {k: tuple(v.shape) for k, v in gated.state_dict().items()}
    assert shapes == {
        "qkv_proj.weight": (96, 32), "output_gate.weight": (32, 32), "norm.weight": (32,), "out_proj.weight": (32, 32),
        "gk_proj.weight": (4, 32), "gk_proj.bias": (4,),
    }  # fmt: skip
    assert gated.log_decay is None and gated.gate_logit_normalizer == 8


@pytest.mark.parametrize(
    ("kw", "name"),
    [
        ({"log_decay": ld.decay.retnet(4)}, "log_decay"),
        ({"learnable_decay": True}, "learnable_decay"),
        ({"gate_logit_normalizer": 0}, "gate_logit_normalizer"),
        ({"gate_logit_normalizer": -16.0}, "gate_logit_normalizer"),
        ({"gate_logit_normalizer": float("inf")}, "gate_logit_normalizer"),
        ({"gate_logit_normalizer": "16"}, "gate_logit_normalizer"),
    ],
)
def test_gate_arguments_errors_name_the_argument(kw, name):
    with pytest.raises(ValueError, match=name):
        DecayingLinearAttention(32, 4, decay_gate=True, **kw)


def test_an_attention_mask_of_the_wrong_shape_is_refused_and_a_past_plus_current_one_is_cut():
    for gate in (False, True):
        layer = DecayingLinearAttention(16, 2, decay_gate=gate, dtype=torch.float64)
        x = torch.randn(2, 3, 16, dtype=torch.float64)
        for bad in (torch.ones(2, 2), torch.ones(1, 3), torch.ones(2, 3, 1)):
            with pytest.raises(ValueError, match=r"attention_mask must have shape \(B, N\) = \(2, 3\)"):
                layer(x, attention_mask=bad)
        mask = torch.tensor([[1, 1, 0, 1, 1], [1, 1, 1, 1, 0]])
        assert torch.equal(layer(x, attention_mask=mask), layer(x, attention_mask=mask[:, -3:]))
