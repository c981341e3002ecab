"""leetdecoding.compat.fla against fp64 references built from fla's own definitions (fla/ops/simple_gla/naive.py's
recurrence, chunk_retention's and chunk_lightning_attn's decays), and against fla's naive functions where fla is
installed."""

from __future__ import annotations

import importlib.util
import math
import re

import pytest
import torch
import torch.nn.functional as F

import leetdecoding as ld
from leetdecoding.compat import fla as compat
from tests.reference import assert_close


def _per_token_decay() -> bool:
    """Whether ld.attention takes a (B, H, N) log_decay (the per-token decay of issue 10), by a tiny call."""
    x = torch.zeros(1, 1, 2, 1)
    try:
        ld.attention(x, x, x, log_decay=torch.zeros(1, 1, 2))
    except (ValueError, TypeError):
        return False
    return True


PER_TOKEN = _per_token_decay()
needs_per_token = pytest.mark.skipif(not PER_TOKEN, reason="ld.attention does not take a per-token log_decay yet")
needs_fla = pytest.mark.skipif(importlib.util.find_spec("fla") is None, reason="fla is not installed")

B, T, H, K, V = 2, 37, 4, 8, 6
LAYER, LAYERS = 1, 3


def reference(q, k, v, log_gate, scale, h0=None):
    """fla's naive_recurrent_simple_gla in the inputs' dtype (fp64 here): S_t = exp(g_t) S_{t-1} + k_t^T v_t,
    o_t = scale q_t S_t; q, k, v (B, T, H, D), log_gate (B, T, H). Returns (o (B, T, H, V), final state)."""
    state = q.new_zeros(q.shape[0], q.shape[2], q.shape[3], v.shape[3]) if h0 is None else h0
    outputs = [v.new_zeros(v.shape[0], 0, *v.shape[2:])]  # an empty sequence has an empty output
    for t in range(q.shape[1]):
        state = state * log_gate[:, t].exp()[..., None, None] + k[:, t, :, :, None] * v[:, t, :, None, :]
        outputs.append(scale * torch.einsum("bhk,bhkv->bhv", q[:, t], state)[:, None])
    return torch.cat(outputs, dim=1), state


def fla_retention_gammas(heads):
    """chunk_retention: g_gamma = log(1 - 2^(-5 - h)), here in fp64."""
    return torch.log(1 - 2.0 ** (-5.0 - torch.arange(heads, dtype=torch.float64)))


def fla_lightning_gammas(heads, layer, layers):
    """chunk_lightning_attn: g_gamma = -(8 / H * (1 - layer_idx / num_layers)) * h, here in fp64."""
    return -(8 / heads * (1 - layer / layers)) * torch.arange(heads, dtype=torch.float64)


G_GAMMA = -torch.rand(H, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 0.5

# each per-head entry point: (call with fla's arguments, its log decays per head)
PER_HEAD = {
    "chunk_simple_gla": (lambda q, k, v, **kw: compat.chunk_simple_gla(q, k, v, g_gamma=G_GAMMA, **kw), G_GAMMA),
    "fused_recurrent_simple_gla": (
        lambda q, k, v, **kw: compat.fused_recurrent_simple_gla(q, k, v, None, G_GAMMA, **kw),
        G_GAMMA,
    ),
    "chunk_retention": (compat.chunk_retention, fla_retention_gammas(H)),
    "chunk_lightning_attn": (
        lambda q, k, v, **kw: compat.chunk_lightning_attn(q, k, v, LAYER, LAYERS, **kw),
        fla_lightning_gammas(H, LAYER, LAYERS),
    ),
}


def inputs(dtype=torch.float64, batch=B, length=T, grad=False):
    q, k = (torch.randn(batch, length, H, K, dtype=dtype) for _ in range(2))
    v = torch.randn(batch, length, H, V, dtype=dtype)
    h0 = torch.randn(batch, H, K, V, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    return tuple(x.requires_grad_(grad) for x in (q, k, v, h0))


def gates(gamma, batch=B, length=T):
    return gamma.expand(batch, length, H)


@pytest.mark.parametrize("name", PER_HEAD)
def test_per_head_decays_match_fla_definitions_in_fp64(name):
    call, gamma = PER_HEAD[name]
    q, k, v, h0 = inputs()
    o, state = call(q, k, v, initial_state=h0, output_final_state=True)
    ref_o, ref_state = reference(q, k, v, gates(gamma), K**-0.5, h0)  # scale=None means K^-0.5
    assert o.dtype == state.dtype == torch.float64 and o.shape == (B, T, H, V) and state.shape == (B, H, K, V)
    assert o.is_contiguous()
    assert torch.allclose(o, ref_o, rtol=1e-12, atol=1e-12)
    assert torch.allclose(state, ref_state, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", PER_HEAD)
def test_no_final_state_unless_asked_and_an_explicit_scale(name):
    call, gamma = PER_HEAD[name]
    q, k, v, _ = inputs()
    o, state = call(q, k, v, scale=0.5)
    assert state is None
    assert torch.allclose(o, reference(q, k, v, gates(gamma), 0.5)[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_inputs_fp32_states(dtype):
    call, gamma = PER_HEAD["chunk_lightning_attn"]
    q, k, v, h0 = inputs(dtype)
    o, state = call(q, k, v, initial_state=h0, output_final_state=True)
    assert o.dtype == dtype and state.dtype == torch.float32
    wide = [x.double() for x in (q, k, v, h0)]
    ref_o, _ = reference(*wide[:3], gates(gamma), K**-0.5, wide[3])
    ref_abs, _ = reference(*(x.abs() for x in wide[:3]), gates(gamma), K**-0.5, wide[3].abs())
    assert_close("chunk_lightning_attn", o, ref_o, ref_abs, dtype)


def test_inputs_reach_attention_as_views(monkeypatch):
    seen = {}

    def recording(q, k, v, **kwargs):
        seen.update(q=q, k=k, v=v)
        return ld.attention(q, k, v, **kwargs)

    monkeypatch.setattr(compat, "attention", recording)
    q, k, v, _ = inputs()
    compat.chunk_retention(q, k, v)
    for name, x in (("q", q), ("k", k), ("v", v)):
        assert seen[name].data_ptr() == x.data_ptr() and seen[name].stride() == x.transpose(1, 2).stride(), name


def test_state_v_first():
    q, k, v, h0 = inputs()
    o, state = compat.chunk_simple_gla(
        q, k, v, g_gamma=G_GAMMA, initial_state=h0.transpose(-1, -2).contiguous(), output_final_state=True,
        state_v_first=True,
    )  # fmt: skip
    ref_o, ref_state = reference(q, k, v, gates(G_GAMMA), K**-0.5, h0)
    assert state.shape == (B, H, V, K)
    assert torch.allclose(o, ref_o, rtol=1e-12, atol=1e-12)
    assert torch.allclose(state, ref_state.transpose(-1, -2), rtol=1e-12, atol=1e-12)


def packed_reference(q, k, v, gate, offsets, h0):
    """The reference per sequence of `offsets` on (1, T, H, D) inputs; (o, (S, H, K, V) final states)."""
    outputs, states = [], []
    for i, (start, end) in enumerate(zip(offsets[:-1], offsets[1:])):
        part = (x[:, start:end] for x in (q, k, v, gate))
        o, state = reference(*part, K**-0.5, h0[i : i + 1])
        outputs.append(o)
        states.append(state)
    return torch.cat(outputs, dim=1), torch.cat(states)


@pytest.mark.parametrize("name", ["chunk_simple_gla", "chunk_retention", "chunk_lightning_attn"])
def test_packed_sequences(name):
    call, gamma = PER_HEAD[name]
    offsets = [0, 5, 5, 30]
    q, k, v, _ = inputs(batch=1, length=30)
    h0 = torch.randn(3, H, K, V, dtype=torch.float64)
    o, state = call(q, k, v, initial_state=h0, output_final_state=True, cu_seqlens=torch.tensor(offsets))
    ref_o, ref_state = packed_reference(q, k, v, gates(gamma, 1, 30), offsets, h0)
    assert torch.allclose(o, ref_o, rtol=1e-12, atol=1e-12)
    assert torch.allclose(state, ref_state, rtol=1e-12, atol=1e-12)


def assert_grads_match_reference(o, state, ref_o, ref_state, leaves):
    """Gradients of one random loss on (o, state) through the call and through the fp64 reference."""
    do, ds = torch.randn_like(o), torch.randn_like(state)
    got = torch.autograd.grad((o * do).sum() + (state * ds).sum(), leaves)
    want = torch.autograd.grad((ref_o * do).sum() + (ref_state * ds).sum(), leaves)
    for i, (a, b) in enumerate(zip(got, want)):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-10), f"gradient {i}"


@pytest.mark.parametrize("name", PER_HEAD)
def test_gradients_match_the_reference(name):
    call, gamma = PER_HEAD[name]
    q, k, v, h0 = inputs(length=20, grad=True)
    o, state = call(q, k, v, initial_state=h0, output_final_state=True)
    ref_o, ref_state = reference(q, k, v, gates(gamma, B, 20), K**-0.5, h0)
    assert_grads_match_reference(o, state, ref_o, ref_state, (q, k, v, h0))


def test_g_gamma_gradient():
    q, k, v, h0 = inputs(length=20)
    g_gamma = G_GAMMA.clone().requires_grad_(True)
    o, state = compat.chunk_simple_gla(q, k, v, g_gamma=g_gamma, initial_state=h0, output_final_state=True)
    ref_o, ref_state = reference(q, k, v, gates(g_gamma, B, 20), K**-0.5, h0)
    assert_grads_match_reference(o, state, ref_o, ref_state, (g_gamma,))


# ----- per-token gates g (B, T, H) -----


def log_gates(batch=B, length=T):
    """fla's usual gates (logsigmoid of a projection), with no decay, -30 and lambda -> 0 (-1e4) mixed in."""
    g = F.logsigmoid(torch.randn(batch, length, H, dtype=torch.float64))
    g[:, 0, 0], g[:, length // 2, 1], g[:, length - 1, 2], g[:, 1, 3] = 0.0, -30.0, -1e4, -1e-7
    return g


SIMPLE_GLA = {
    "chunk_simple_gla": compat.chunk_simple_gla,
    "fused_recurrent_simple_gla": compat.fused_recurrent_simple_gla,
}


@needs_per_token
@pytest.mark.parametrize("name", SIMPLE_GLA)
def test_per_token_gates_match_fla_recurrence(name):
    q, k, v, h0 = inputs()
    g = log_gates()
    o, state = SIMPLE_GLA[name](q, k, v, g, initial_state=h0, output_final_state=True)
    ref_o, ref_state = reference(q, k, v, g, K**-0.5, h0)
    assert o.dtype == state.dtype == torch.float64
    assert torch.allclose(o, ref_o, rtol=1e-12, atol=1e-12)
    assert torch.allclose(state, ref_state, rtol=1e-12, atol=1e-12)


@needs_per_token
def test_per_token_gates_packed_and_passed_as_a_view(monkeypatch):
    offsets = [0, 5, 5, 30]
    q, k, v, _ = inputs(batch=1, length=30)
    h0 = torch.randn(3, H, K, V, dtype=torch.float64)
    g = log_gates(1, 30)
    seen = {}

    def recording(*args, **kwargs):
        seen["log_decay"] = kwargs["log_decay"]
        return ld.attention(*args, **kwargs)

    monkeypatch.setattr(compat, "attention", recording)
    o, state = compat.chunk_simple_gla(q, k, v, g, initial_state=h0, output_final_state=True,
                                       cu_seqlens=torch.tensor(offsets))  # fmt: skip
    assert seen["log_decay"].data_ptr() == g.data_ptr() and seen["log_decay"].shape == (1, H, 30)
    ref_o, ref_state = packed_reference(q, k, v, g, offsets, h0)
    assert torch.allclose(o, ref_o, rtol=1e-12, atol=1e-12)
    assert torch.allclose(state, ref_state, rtol=1e-12, atol=1e-12)


@needs_per_token
@pytest.mark.parametrize("name", SIMPLE_GLA)
def test_per_token_gradients_include_g(name):
    q, k, v, h0 = inputs(length=20, grad=True)
    g = F.logsigmoid(torch.randn(B, 20, H, dtype=torch.float64)).requires_grad_(True)
    o, state = SIMPLE_GLA[name](q, k, v, g, initial_state=h0, output_final_state=True)
    ref_o, ref_state = reference(q, k, v, g, K**-0.5, h0)
    assert_grads_match_reference(o, state, ref_o, ref_state, (q, k, v, g, h0))


@needs_per_token
def test_a_positive_gate_is_refused_in_fla_names():
    q, k, v, _ = inputs()
    g = log_gates()
    g[0, 3, 1] = 0.5
    with pytest.raises(ValueError) as error:
        compat.chunk_simple_gla(q, k, v, g)
    assert re.search(r"\bg\b", str(error.value)) and "log_decay" not in str(error.value)


# ----- bad input: errors in fla's names -----


def test_errors_name_fla_arguments():
    q, k, v, h0 = inputs()
    head_first_g = log_gates().transpose(1, 2)  # (B, H, T): the layout of leetdecoding, not fla's
    cases = [
        (ValueError, r"head_first=True", lambda: compat.chunk_retention(q, k, v, head_first=True)),
        (ValueError, r"reverse=True", lambda: compat.fused_recurrent_simple_gla(q, k, v, reverse=True)),
        (ValueError, r"either g .* or g_gamma", lambda: compat.chunk_simple_gla(q, k, v, log_gates(), G_GAMMA)),
        (ValueError, r"^g must have shape \(2, 37, 4\)", lambda: compat.chunk_simple_gla(q, k, v, head_first_g)),
        (TypeError, r"^g must be a torch.Tensor", lambda: compat.chunk_simple_gla(q, k, v, [0.0])),
        (ValueError, r"^g_gamma must have shape \(4,\)", lambda: compat.chunk_simple_gla(q, k, v, None, G_GAMMA[:2])),
        (ValueError, r"^g_gamma must be <= 0", lambda: compat.chunk_simple_gla(q, k, v, g_gamma=-G_GAMMA)),
        (ValueError, r"^q must have 4 dimensions \(B, T, H, D\)", lambda: compat.chunk_retention(q[0], k, v)),
        (ValueError, r"v \(B, T, H, V\)", lambda: compat.chunk_retention(q, k, v[:, 1:])),
        (ValueError, r"with cu_seqlens", lambda: compat.chunk_retention(q, k, v, cu_seqlens=torch.tensor([0, T]))),
        (ValueError, r"^initial_state must be \(N, H, V, K\)",
         lambda: compat.chunk_simple_gla(q, k, v, initial_state=h0, state_v_first=True)),
        (TypeError, r"initial_state", lambda: compat.chunk_retention(q, k, v, initial_state=h0.float())),
        (ValueError, r"^chunk_size must be a power of 2", lambda: compat.chunk_retention(q, k, v, chunk_size=48)),
        (ValueError, r"^layer_idx must be an int in \[0, 3\)", lambda: compat.chunk_lightning_attn(q, k, v, 3, 3)),
    ]  # fmt: skip
    for kind, pattern, call in cases:
        with pytest.raises(kind, match=pattern) as error:
            call()
        assert type(error.value) is kind and "log_decay" not in str(error.value), pattern


def test_harmless_fla_options_are_accepted():
    q, k, v, _ = inputs()
    a = compat.chunk_retention(q, k, v)[0]
    assert torch.equal(compat.chunk_retention(q, k, v, chunk_size=64, head_first=False)[0], a)
    no_decay = reference(q, k, v, gates(torch.zeros(H, dtype=torch.float64)), K**-0.5)[0]
    neither = compat.chunk_simple_gla(q, k, v)[0]  # neither g nor g_gamma: no decay
    assert torch.allclose(neither, no_decay, rtol=1e-12, atol=1e-12)


# ----- fla itself, where it is installed -----


@needs_fla
def test_against_fla_naive_recurrent_simple_gla():
    from fla.ops.simple_gla.naive import naive_recurrent_simple_gla

    q, k, v, h0 = inputs(torch.float32)
    g = gates(G_GAMMA.float()).contiguous()
    want, want_state = naive_recurrent_simple_gla(q, k, v, g, initial_state=h0, output_final_state=True)
    got, state = compat.chunk_simple_gla(q, k, v, g_gamma=G_GAMMA.float(), initial_state=h0, output_final_state=True)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4) and torch.allclose(state, want_state, rtol=1e-4, atol=1e-4)
    if PER_TOKEN:
        gate = log_gates().float()
        want = naive_recurrent_simple_gla(q, k, v, gate, initial_state=h0)[0]
        assert torch.allclose(compat.chunk_simple_gla(q, k, v, gate, initial_state=h0)[0], want, rtol=1e-4, atol=1e-4)


@needs_fla
def test_against_fla_naive_retention():
    from fla.ops.retention.naive import naive_retention

    q, k, v, _ = inputs(torch.float32)
    want = naive_retention(*(x.transpose(1, 2) for x in (q, k, v))).transpose(1, 2)  # fla's naive is (B, H, T, D)
    got = compat.chunk_retention(q, k, v)[0]
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4 * math.sqrt(T))
