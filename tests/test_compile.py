"""torch.compile(fullgraph=True) and torch.export of the public calls: one custom op per call, no graph break,
the same numbers as eager and the fp64 reference; torch.library.opcheck on every op."""

from __future__ import annotations

import pytest
import torch

import leetdecoding as ld
from leetdecoding import custom_ops
from leetdecoding.methods.naive import reference, reference_closed_form
from leetdecoding.nn import DecayingLinearAttention, LinearAttentionCache

from .reference import assert_close
from .test_decay_cache import layer_reference

BACKENDS = ["aot_eager", "inductor"]
H, DK, DV = 3, 8, 4


def problem(b=2, n=40, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(b, H, n, DK, generator=g, dtype=torch.float64).to(dtype) for _ in range(2))
    v = torch.randn(b, H, n, DV, generator=g, dtype=torch.float64).to(dtype)
    state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    s0 = torch.randn(b, H, DK, DV, generator=g, dtype=torch.float64).to(state_dtype)
    return q, k, v, s0


def one_graph(fn, *args) -> None:
    """fn traces to one graph with no break."""
    torch._dynamo.reset()
    e = torch._dynamo.explain(fn)(*args)
    assert (e.graph_count, e.graph_break_count) == (1, 0), e.break_reasons


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_with_states_compiles_to_one_graph_and_matches(backend):
    q, k, v, s0 = problem()

    def f(q, k, v, s0):
        o, state = ld.attention(q, k, v, decay=0.9, scale=0.5, initial_state=s0, output_final_state=True)
        return o, state

    one_graph(f, q, k, v, s0)
    o, state = torch.compile(f, fullgraph=True, backend=backend)(q, k, v, s0)
    ref = reference(q, k, v, 0.9, s0, 0.5)
    assert_close("o", o, ref.o, ref.o_abs, torch.float32)
    assert_close("state", state, ref.state, ref.state_abs, torch.float32)
    assert torch.equal(o, f(q, k, v, s0)[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_sequences_compile(backend):
    q, k, v, _ = problem(b=1, n=30)
    cu = torch.tensor([0, 7, 7, 30])

    def f(q, k, v, cu):
        return ld.attention(q, k, v, log_decay=-0.2, cu_seqlens=cu, output_final_state=True, state_checkpoints=[5])

    one_graph(f, q, k, v, cu)
    got = torch.compile(f, fullgraph=True, backend=backend)(q, k, v, cu)
    want = f(q, k, v, cu)
    assert got._fields == want._fields == ("output", "final_state", "checkpoints")
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    for i, (s, e) in enumerate(((0, 7), (7, 7), (7, 30))):
        ref = reference(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], torch.exp(torch.tensor(-0.2)))
        assert_close(f"sequence {i}", got.final_state[i : i + 1], ref.state, ref.state_abs, torch.float32)


def test_gradients_through_the_compiled_call_match_the_fp64_reference():
    q, k, v, s0 = problem(dtype=torch.float64)
    log_decay = torch.tensor([-0.05, -0.3, -1.0], dtype=torch.float64)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, log_decay, s0)]

    def f(q, k, v, log_decay, s0):
        o, state = ld.attention(q, k, v, log_decay=log_decay, initial_state=s0, output_final_state=True)
        return (o * o).sum() + (state * state).sum()

    got = torch.autograd.grad(torch.compile(f, fullgraph=True, backend="aot_eager")(*leaves), leaves)
    refs = [t.clone().requires_grad_() for t in (q, k, v, log_decay, s0)]
    o, state = reference_closed_form(*refs)
    want = torch.autograd.grad((o * o).sum() + (state * state).sum(), refs)
    for name, a, b in zip(("q", "k", "v", "log_decay", "initial_state"), got, want):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-10), name


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_step_in_place_compiles(backend):
    q, k, v, s0 = problem(n=1)
    args = (q[:, :, 0], k[:, :, 0], v[:, :, 0])

    def step(q, k, v, state):
        return ld.decode_step(q, k, v, state, decay=0.9, out_state=state)

    one_graph(step, *args, s0.clone())
    state = s0.clone()
    o, new = torch.compile(step, fullgraph=True, backend=backend)(*args, state)
    assert new is state  # written in place, as in eager mode
    ref = reference(q, k, v, 0.9, s0)
    assert_close("decode o", o, ref.o[:, :, 0], ref.o_abs[:, :, 0], torch.float32)
    assert_close("decode state", state, ref.state, ref.state_abs, torch.float32)


def test_a_layer_with_a_cache_compiles_and_prefill_plus_decode_matches_eager(monkeypatch):
    torch.manual_seed(0)
    layer = DecayingLinearAttention(16, 2, dtype=torch.float64)
    x = torch.randn(2, 9, 16, dtype=torch.float64)

    def run(x, cache):
        return layer(x, cache=cache)

    compiled = torch.compile(run, fullgraph=True, backend="aot_eager")
    cache, eager_cache = LinearAttentionCache(), LinearAttentionCache()
    outs = []
    for part in (x[:, :8], x[:, 8:]):  # prefill, then one decode token through the cache
        outs.append(compiled(part, cache))
        assert torch.allclose(outs[-1], run(part, eager_cache), rtol=0, atol=1e-12)
    ref = layer_reference(layer, x, monkeypatch)  # the layer with the fp64 recurrence as its attention
    assert torch.allclose(torch.cat(outs, 1), ref, rtol=1e-10, atol=1e-10)
    assert torch.allclose(cache.get(0), eager_cache.get(0), rtol=0, atol=1e-12)
    whole = run(x, None)
    assert torch.allclose(compiled(x[:, :1], None), whole[:, :1], atol=1e-12)


def test_dynamic_lengths_compile_once():
    frames = []

    def counting(gm, inputs):
        frames.append(gm)
        return gm.forward

    def f(q):
        return ld.attention(q, q, q, decay=0.95)

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, dynamic=True, backend=counting)
    for n in (100, 200, 300):
        q = problem(n=n)[0]
        ref = reference(q, q, q, 0.95)
        assert_close(f"N={n}", compiled(q), ref.o, ref.o_abs, torch.float32)
    assert len(frames) == 1


def test_export_holds_one_op():
    q, k, v, s0 = problem()

    class M(torch.nn.Module):
        def forward(self, q, k, v, s0):
            return ld.attention(q, k, v, decay=0.9, initial_state=s0, output_final_state=True)

    program = torch.export.export(M(), (q, k, v, s0))
    targets = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
    assert "leetdecoding.attention.default" in targets
    o, state = program.module()(q, k, v, s0)
    ref = reference(q, k, v, 0.9, s0)
    assert_close("exported o", o, ref.o, ref.o_abs, torch.float32)


def test_eager_checks_still_run_inside_the_op():
    # the value checks run when the op runs: a compiled call with a bad decay fails with the eager message
    q = problem()[0]
    compiled = torch.compile(lambda q, d: ld.attention(q, q, q, decay=d), fullgraph=True, backend="aot_eager")
    with pytest.raises(ValueError, match=r"decay must be in \(0, 1\]"):
        compiled(q, torch.tensor([0.9, 1.5, 0.5]))


def opcheck_cases():
    q, k, v, s0 = problem(dtype=torch.float64, n=12)
    grads = [t.clone().requires_grad_() for t in (q, k, v)]
    log_decay = torch.tensor([-0.1, -0.5, -2.0], dtype=torch.float64)
    yield custom_ops.attention_op, (*grads, None, log_decay, None, 1.0, s0.clone().requires_grad_(), True, None,
                                    None, [4], "auto")  # fmt: skip
    yield custom_ops.attention_op, (q[:1], k[:1], v[:1], None, None, [0.9, float("nan")], 0.5, None, False,
                                    torch.tensor([0, 5, 12]), [0, 5, 12], None, "chunked,recurrent")  # fmt: skip
    step = (q[:, :, 0].clone().requires_grad_(), k[:, :, 0], v[:, :, 0], s0.clone())
    yield custom_ops.decode_step_op, (*step, None, log_decay, None, 1.0, "auto")
    yield custom_ops.decode_step_inplace_op, (*(t.detach() for t in step), None, None, [float("nan"), -0.3], 1.0,
                                              "auto")  # fmt: skip
    do = torch.randn(2, H, 12, DV, dtype=torch.float64)
    yield custom_ops.attention_backward_op, (do, None, None, q, k, v, None, log_decay, None, 1.0, None, False, None,
                                             None, None, "auto", [True, True, True, False, True, False])  # fmt: skip
    yield custom_ops.decode_backward_op, (do[:, :, 0], None, *(t.detach() for t in step), None, log_decay, None,
                                          1.0, "auto", [True, False, True, True, False, True])  # fmt: skip


@pytest.mark.parametrize("case", range(6))
def test_opcheck(case):
    op, args = list(opcheck_cases())[case]
    torch.library.opcheck(op, args)



def test_the_public_ops_and_the_kernel_ops_do_not_share_names():
    pytest.importorskip("triton")
    from leetdecoding.methods.triton import ops  # registers the kernels' ops

    assert ops.USE_TRITON_OP in (True, False)
    assert "numbers" in str(torch.ops.leetdecoding.decode_step.default._schema)  # the public op, not the kernel
    assert hasattr(torch.ops.leetdecoding_triton, "decode_step")
