"""transformers' MiniMax patched by leetdecoding: against the unpatched model (the reference), on small random-weight
models whose linear and full attention layers alternate, with block_size 32 so that short texts span many blocks."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

pytest.importorskip("transformers")

from transformers import MiniMaxConfig, MiniMaxForCausalLM  # noqa: E402
from transformers.models.minimax.modeling_minimax import MiniMaxCache, MiniMaxLightningAttention  # noqa: E402

import leetdecoding as ld  # noqa: E402
from leetdecoding import dispatch  # noqa: E402
from leetdecoding.integrations import hf_minimax  # noqa: E402
from leetdecoding.integrations.hf_minimax import LeetMiniMaxCache  # noqa: E402
from leetdecoding.methods.naive import reference_closed_form  # noqa: E402

FULL, LINEAR = "full_attention", "linear_attention"
VOCAB = 128


def make_model(layer_types, block_size=32, seed=0) -> MiniMaxForCausalLM:
    torch.manual_seed(seed)
    config = MiniMaxConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=len(layer_types),
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        layer_types=layer_types,
        num_local_experts=2,
        num_experts_per_tok=1,
        block_size=block_size,
        max_position_embeddings=1024,
        pad_token_id=0,
        eos_token_id=None,
    )
    return MiniMaxForCausalLM(config).eval()


@pytest.fixture(scope="module")
def model():
    """Layer 0 is full attention: transformers' own cache handling is right for this stack."""
    return make_model([FULL, LINEAR, FULL, LINEAR])


@pytest.fixture(scope="module")
def model_linear_first():
    """Layer 0 is linear attention, the last layer full attention: where MiniMaxCache goes wrong."""
    return make_model([LINEAR, FULL, LINEAR, FULL], seed=1)


@pytest.fixture
def patched(model):
    hf_minimax.patch(model)
    yield model
    hf_minimax.unpatch(model)


def tokens(batch, n, seed=0):
    return torch.randint(1, VOCAB, (batch, n), generator=torch.Generator().manual_seed(seed))


def rel_err(a, b) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def logits(model, ids, **kw):
    with torch.no_grad():
        return model(ids, **kw).logits


@pytest.mark.parametrize("n", [1, 45, 300])  # vanilla and chunked; never a multiple of the block size 32
def test_prefill_equals_unpatched(model, n):
    ids = tokens(2, n)
    mask = torch.ones_like(ids)
    mask[0, : n // 3] = 0  # left padding, as transformers passes it: q, k, v of padded tokens zeroed
    ref, masked_ref = logits(model, ids), logits(model, ids, attention_mask=mask)
    hf_minimax.patch(model)
    try:
        out, masked = logits(model, ids), logits(model, ids, attention_mask=mask)
    finally:
        hf_minimax.unpatch(model)
    assert rel_err(out, ref) <= 1e-5
    keep = mask.bool()
    assert rel_err(masked[keep], masked_ref[keep]) <= 1e-5


def test_unpatch_restores_exactly(model):
    ids = tokens(2, 70)
    before = logits(model, ids)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    layers = [m for m in model.modules() if isinstance(m, MiniMaxLightningAttention)]
    hf_minimax.patch(model)
    assert all("forward" in m.__dict__ for m in layers)
    assert list(model.state_dict()) == list(state)  # names kept: nothing added, renamed or removed
    hf_minimax.unpatch(model)
    assert all("forward" not in m.__dict__ and not hasattr(m, "_leetdecoding_patch") for m in layers)
    assert all(m.forward.__func__ is MiniMaxLightningAttention.forward for m in layers)
    assert torch.equal(logits(model, ids), before)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_greedy_and_beam_search_token_identical(model):
    ids = tokens(2, 40)
    kw = {"max_new_tokens": 12, "do_sample": False}
    with torch.no_grad():
        ref_greedy, ref_beam = model.generate(ids, **kw), model.generate(ids, num_beams=3, **kw)
        hf_minimax.patch(model)
        try:
            greedy, beam = model.generate(ids, **kw), model.generate(ids, num_beams=3, **kw)
            report = hf_minimax.report(model)
        finally:
            hf_minimax.unpatch(model)
    assert torch.equal(greedy, ref_greedy) and torch.equal(beam, ref_beam)
    assert report.patched == ["model.layers.1.self_attn", "model.layers.3.self_attn"]
    assert set(report.layers[0].calls) == {"prefill", "decode"}
    # two generate calls, 11 steps after prefill, each a decode_step whose dispatcher chose the torch step on a CPU
    assert report.layers[0].calls["decode"] == {"recurrent_step": 2 * 11}


def test_continuation_equals_one_forward(patched):
    n = dispatch.VANILLA_MAX_N + 2  # every call of more than one token goes to chunked
    ids = tokens(2, 2 * n + 40)
    full = logits(patched, ids)
    with torch.no_grad():
        out = patched(ids[:, :n], use_cache=True)
        steps = [patched(ids[:, t : t + 1], cache=out.cache).logits for t in range(n, n + 3)]  # decode_step
        rest = patched(ids[:, n + 3 :], cache=out.cache).logits  # many tokens at once from the cache (chunked)
    got = torch.cat([out.logits, *steps, rest], dim=1)
    assert rel_err(got, full) <= 1e-5
    assert out.cache.linear_cache[1].dtype == torch.float32
    calls = hf_minimax.report(patched).layers[0].calls
    assert calls["continue"] == {"chunked": 1} and calls["prefill"] == {"chunked": 2}


def test_linear_layer_0_continuation_exact_with_our_cache(model_linear_first):
    m = model_linear_first
    ids = tokens(2, 200)
    ref = logits(m, ids)  # unpatched, one forward over the whole text
    hf_minimax.patch(m)
    try:
        cache = LeetMiniMaxCache()
        with torch.no_grad():
            first = m(ids[:, :90], cache=cache, use_cache=True).logits
            assert cache.get_seq_length() == 90  # MiniMaxCache says 0 here
            rest = m(ids[:, 90:], cache=cache, use_cache=True).logits
    finally:
        hf_minimax.unpatch(m)
    assert rel_err(torch.cat([first, rest], 1), ref) <= 1e-5


@pytest.mark.parametrize("patch", [True, False])
def test_beam_search_with_our_cache_equals_no_cache(model_linear_first, patch):
    """MiniMaxCache does not reorder linear states between beams; LeetMiniMaxCache does, so beam search with it
    equals beam search that recomputes everything without a cache (patched, and unpatched as well)."""
    m = model_linear_first
    ids = tokens(2, 20, seed=3)
    kw = {"max_new_tokens": 10, "do_sample": False, "num_beams": 3}
    if patch:
        hf_minimax.patch(m)
    try:
        with torch.no_grad():
            ours = m.generate(ids, cache=LeetMiniMaxCache(), **kw)
            recomputed = m.generate(ids, use_cache=False, **kw)
    finally:
        if patch:
            hf_minimax.unpatch(m)
    assert torch.equal(ours, recomputed)


@pytest.mark.parametrize("cache_cls", [MiniMaxCache, LeetMiniMaxCache])
def test_cache_repeat_and_select_rows(patched, cache_cls):
    """batch_repeat_interleave / batch_select_indices on a patched prefill's cache, then one more token."""
    ids = tokens(2, 50)
    with torch.no_grad():
        cache = cache_cls()
        patched(ids[:, :49], cache=cache, use_cache=True)
        cache.batch_repeat_interleave(2)  # rows 0, 0, 1, 1
        cache.batch_select_indices(torch.tensor([3, 0]))  # rows 1, 0
        got = patched(ids[[1, 0], 49:], cache=cache).logits[:, -1]
    assert rel_err(got, logits(patched, ids[[1, 0]])[:, -1]) <= 1e-5


def test_bf16_model_within_bf16_tolerance(model):
    ids = tokens(2, 300)
    ref = logits(model, ids)
    half = copy.deepcopy(model).to(torch.bfloat16)
    unpatched_err = rel_err(logits(half, ids), ref)
    hf_minimax.patch(half)
    with torch.no_grad():
        out = half(ids[:, :200], use_cache=True)
        rest = half(ids[:, 200:], cache=out.cache).logits
        step = half(ids[:, :1], cache=out.cache).logits[:, -1]  # one more token: decode_step on the fp32 state
    assert out.cache.linear_cache[1].dtype == torch.float32  # the state stays fp32 in a bf16 model
    tolerance = max(2 * unpatched_err, 2e-2)
    assert rel_err(torch.cat([out.logits, rest], 1), ref) <= tolerance
    assert rel_err(step, logits(model, torch.cat([ids, ids[:, :1]], 1))[:, -1]) <= tolerance


def test_zero_slope_stays_causal():
    """transformers' block prefill tests slope * diff >= 0, so a zero slope lets tokens see the future; the
    patched forward must equal the causal per-token path (transformers' cache loop) for any slope."""
    m = make_model([LINEAR], block_size=32).model.layers[0].self_attn
    m.slope_rate.zero_()
    x = torch.randn(2, 40, 64)
    with torch.no_grad():
        cache = MiniMaxCache()
        ref = torch.cat([m(x[:, :1], None, None, cache=cache)[0], m(x[:, 1:], None, None, cache=cache)[0]], 1)
        hf_minimax.patch(m)
        out = m(x, None, None)[0]
    assert rel_err(out, ref) <= 1e-5


def test_gradients_equal_unpatched(model):
    ids = tokens(1, 70)
    grads = []
    for patch in (False, True):
        model.zero_grad()
        if patch:
            hf_minimax.patch(model)
        try:
            model(ids, labels=ids).loss.backward()
        finally:
            if patch:
                hf_minimax.unpatch(model)
        grads.append(model.model.layers[1].self_attn.qkv_proj.weight.grad.clone())
    model.zero_grad()
    assert rel_err(grads[1], grads[0]) <= 1e-4


def test_save_load_and_pickle(model, tmp_path):
    m = copy.deepcopy(model)
    hf_minimax.patch(m)
    m.save_pretrained(tmp_path)
    loaded = MiniMaxForCausalLM.from_pretrained(tmp_path).eval()
    loaded.load_state_dict(m.state_dict(), strict=True)
    ids = tokens(1, 40)
    assert torch.equal(logits(loaded, ids), logits(model, ids))
    copied = pickle.loads(pickle.dumps(m))  # a patched model pickles, and stays patched
    assert hf_minimax.is_patched(copied) and torch.equal(logits(copied, ids), logits(m, ids))
    hf_minimax.unpatch(copied)
    assert torch.equal(logits(copied, ids), logits(model, ids))


def test_report_and_errors(model):
    report = hf_minimax.report(model)
    assert not report.patched and len(report.layers) == 2 and not hf_minimax.is_patched(model)
    with pytest.raises(ValueError, match="MiniMaxLightningAttention"):
        hf_minimax.patch(torch.nn.Linear(4, 4))
    with pytest.raises(TypeError, match="nn.Module"):
        hf_minimax.patch("model")
    with pytest.raises(ValueError, match="method"):
        hf_minimax.patch(model, method="nope")
    report = hf_minimax.patch(model.model, method="chunked")  # a MiniMaxModel works as well
    try:
        assert hf_minimax.is_patched(model) and "method=chunked" in str(report)
        layer = model.model.layers[1].self_attn
        ours = layer.forward
        layer.forward = lambda *a, **k: None  # someone patched over us
        with pytest.raises(ValueError, match="replaced after patch"):
            hf_minimax.unpatch(model)
        layer.forward = ours
    finally:
        hf_minimax.unpatch(model)
    assert not hf_minimax.report(model).patched


def fp64_layer_reference(m, x, initial_state=None):
    """A MiniMaxLightningAttention whose norm is an identity, by the fp64 closed form (differentiable): its output
    and final state."""
    b, n, _ = x.shape
    h, d = m.num_attention_heads, m.head_dim
    q, k, v = m.act_fn(m.qkv_proj(x)).view(b, n, h, 3, d).permute(3, 0, 2, 1, 4)  # per head [q | k | v]
    o, state = reference_closed_form(q, k, v, -m.slope_rate.reshape(-1), initial_state)
    return m.out_proj(torch.sigmoid(m.output_gate(x)) * o.transpose(1, 2).reshape(b, n, h * d)), state


def test_decode_goes_through_decode_step_in_place_and_equals_one_call():
    """A prefill and then one token at a time through the patched layer equal the fp64 reference of one call over
    the whole text (MiniMaxRMSNorm, which normalises in fp32, replaced by an identity); every token after the prefill
    is a `decode_step` (recorded by the dispatcher, counted by the report) that writes the cached state in place."""
    m = make_model([LINEAR]).model.layers[0].self_attn.double()
    m.norm = torch.nn.Identity()
    x = torch.randn(2, 45, 64, dtype=torch.float64)
    with torch.no_grad():
        ref, ref_state = fp64_layer_reference(m, x)
        hf_minimax.patch(m)
        try:
            cache = MiniMaxCache()
            with ld.record_choices() as made:
                parts = [m(x[:, :40], None, None, cache=cache)[0]]
                state = cache.linear_cache[0]
                parts += [m(x[:, t : t + 1], None, None, cache=cache)[0] for t in range(40, 45)]
            calls = hf_minimax.report(m).layers[0].calls
        finally:
            hf_minimax.unpatch(m)
    assert rel_err(torch.cat(parts, 1), ref) <= 1e-12 and rel_err(cache.linear_cache[0], ref_state) <= 1e-12
    assert [c.operation for c in made] == ["attention"] + ["decode_step"] * 5
    assert calls == {"prefill": {made[0].method.name: 1}, "decode": {made[-1].method.name: 5}}
    assert cache.linear_cache[0] is state and state.dtype == torch.float64  # one buffer, updated in place


def test_decode_with_gradients_leaves_the_cached_state_and_matches_the_reference():
    """With autograd on, a decode step returns a new state (the one backward needs is not overwritten), and the
    gradient through one decoded token equals the fp64 reference's."""
    m = make_model([LINEAR]).model.layers[0].self_attn.double()
    m.norm = torch.nn.Identity()
    x = torch.randn(1, 9, 64, dtype=torch.float64)
    with torch.no_grad():
        prefill_state = fp64_layer_reference(m, x[:, :8])[1]
    fp64_layer_reference(m, x[:, 8:], prefill_state)[0].sum().backward()
    expected = m.qkv_proj.weight.grad.clone()
    m.zero_grad()
    hf_minimax.patch(m)
    try:
        cache = MiniMaxCache()
        with torch.no_grad():
            m(x[:, :8], None, None, cache=cache)
        prior = cache.linear_cache[0]
        kept = prior.clone()
        m(x[:, 8:], None, None, cache=cache)[0].sum().backward()
    finally:
        hf_minimax.unpatch(m)
    assert cache.linear_cache[0] is not prior and torch.equal(prior, kept)
    assert rel_err(m.qkv_proj.weight.grad, expected) <= 1e-12
