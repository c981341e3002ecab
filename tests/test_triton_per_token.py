"""Per-token decays (leetdecoding.gates) in the Triton kernels against the fp64 recurrence: the forward of
triton_recurrent and triton_chunked, and the fused decode step, fp32 and fp64, with no decay, tiny, strong and
reset log decays (0, -1e-7, -30, -1e4, -inf) mixed in, initial and final states, packed sequences, a strided
decay, decode steps continuing a prefill; triton_chunked's backward (q, k, v, initial state and the per-token log
decays, packed sequences too) against autograd of an fp64 recurrence, the decay's gradient also at strong decays
(-5, -15, mixed with 0 and -inf) where a form that subtracts sums would cancel; the refusal of per-token decays
that require grad by the methods without a backward.

Without a GPU the kernels run in Triton's interpreter (tests/conftest.py): the problems are tiny.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

import leetdecoding as ld  # noqa: E402
from leetdecoding.inputs import validate  # noqa: E402
from leetdecoding.methods import REGISTRY  # noqa: E402
from leetdecoding.methods.naive import reference  # noqa: E402
from leetdecoding.methods.triton import chunked_bwd  # noqa: E402

from .reference import assert_close  # noqa: E402

if REGISTRY["triton_recurrent"].unavailable_reason():
    pytest.skip(REGISTRY["triton_recurrent"].unavailable_reason(), allow_module_level=True)

DEVICE = "cuda" if torch.cuda.is_available() and REGISTRY["triton_recurrent"].devices == ("cuda",) else "cpu"
H, DK, DV = 3, 8, 5
DTYPES = [torch.float32, torch.float64] if DEVICE == "cpu" else [torch.float32, torch.float16, torch.bfloat16]
METHODS = ["triton_recurrent", "triton_chunked"]


def problem(b=2, n=70, dtype=torch.float32, seed=0):
    """q, k, v in `dtype`, log decays in (-0.5, 0] with the edge values mixed in (`edges`), an initial state, all
    on DEVICE; the log decays and the state in the state dtype."""
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(b, H, n, DK, generator=g, dtype=torch.float64) for _ in range(2))
    v = torch.randn(b, H, n, DV, generator=g, dtype=torch.float64)
    state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    log_decay = edges(torch.rand(b, H, n, generator=g, dtype=torch.float64) * -0.5)
    s0 = torch.randn(b, H, DK, DV, generator=g, dtype=torch.float64)
    dev = lambda t, d: t.to(device=DEVICE, dtype=d)  # noqa: E731
    return dev(q, dtype), dev(k, dtype), dev(v, dtype), dev(log_decay, state_dtype), dev(s0, state_dtype)


def edges(log_decay: torch.Tensor) -> torch.Tensor:
    """No decay, tiny, strong and reset log decays at token 0, at chunk edges (15, 16, 63, 64, 65) and inside."""
    values = [0.0, -1e-7, -30.0, -1e4, float("-inf")]
    for i, t in enumerate([0, 1, 15, 16, 40, 63, 64, 65, 66, 69]):
        if t < log_decay.shape[-1]:
            log_decay[i % log_decay.shape[0], i % H, t] = values[i % len(values)]
    return log_decay


def expected(q, k, v, log_decay, s0, scale=1.0):
    cpu = lambda t: None if t is None else t.cpu().double()  # noqa: E731
    return reference(cpu(q), cpu(k), cpu(v), torch.exp(cpu(log_decay)), cpu(s0), scale)


def check(label, o, state, ref, dtype):
    assert o.dtype == dtype and state.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close(label + " o", o.cpu(), ref.o, ref.o_abs, dtype)
    assert_close(label + " state", state.cpu(), ref.state, ref.state_abs, state.dtype)


# ----- the forward: triton_recurrent and triton_chunked -----


@pytest.mark.parametrize("with_state", [False, True], ids=["zero-state", "initial-state"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("method", METHODS)
def test_forward_matches_the_fp64_recurrence_at_the_edges(method, dtype, with_state):
    q, k, v, log_decay, s0 = problem(dtype=dtype)
    s0 = s0 if with_state else None
    o, state = ld.attention(q, k, v, log_decay=log_decay, scale=0.7, initial_state=s0, output_final_state=True,
                            method=method)  # fmt: skip
    check(method, o, state, expected(q, k, v, log_decay, s0, 0.7), dtype)


def test_chunked_with_small_chunks_and_strong_decays():
    """Chunks of 16 (edges at 15, 16, 63, 64, 65 fall on their borders) and log decays down to -4 (a chunk's sum
    to about -30) in fp32."""
    q, k, v, log_decay, s0 = problem(n=70)
    log_decay = torch.where(log_decay > -0.5, log_decay * 8, log_decay)
    x = validate(q, k, v, None, log_decay, 1.0, s0, True)
    o, state = REGISTRY["triton_chunked"].forward(x, chunk_size=16, precision="ieee")
    check("chunks of 16", o, state, expected(q, k, v, log_decay, s0), torch.float32)


@pytest.mark.parametrize("method", METHODS)
def test_forward_takes_a_strided_decay_and_the_decay_form(method):
    """fla's gates (B, T, H) passed as a transposed view; decay= with zeros (resets) gives the same outputs."""
    q, k, v, log_decay, s0 = problem(n=33)
    strided = log_decay.transpose(1, 2).contiguous().transpose(1, 2)
    assert not strided.is_contiguous()
    o, state = ld.attention(q, k, v, log_decay=strided, initial_state=s0, output_final_state=True,
                            method=method)  # fmt: skip
    check("strided decay", o, state, expected(q, k, v, log_decay, s0), torch.float32)
    o2 = ld.attention(q, k, v, decay=torch.exp(log_decay), initial_state=s0, method=method)
    assert_close("decay form", o2.cpu(), *_o(expected(q, k, v, log_decay, s0)), torch.float32)


def _o(ref):
    return ref.o, ref.o_abs


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("method", METHODS)
def test_packed_sequences(method, dtype):
    """(1, H, T) log decays with cu_seqlens: each sequence from its own initial state, with its own decays."""
    q, k, v, log_decay, _ = problem(b=1, n=50, dtype=dtype)
    cuts = [0, 1, 18, 18, 50]  # a one-token and an empty sequence among them
    s0 = problem(b=len(cuts) - 1, n=1, dtype=dtype)[4]
    cu = torch.tensor(cuts, dtype=torch.int32, device=DEVICE)
    o, state = ld.attention(q, k, v, log_decay=log_decay, cu_seqlens=cu, initial_state=s0, output_final_state=True,
                            method=method)  # fmt: skip
    for i, (a, b) in enumerate(zip(cuts, cuts[1:])):
        part = slice(a, b)
        ref = expected(q[:, :, part], k[:, :, part], v[:, :, part], log_decay[:, :, part], s0[i : i + 1])
        assert_close(f"sequence {i} o", o[:, :, part].cpu(), ref.o, ref.o_abs, dtype)
        assert_close(f"sequence {i} state", state[i : i + 1].cpu(), ref.state, ref.state_abs, s0.dtype)


# ----- the fused decode step -----


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_decode_steps_continue_a_triton_prefill(dtype):
    """A prefill by triton_recurrent, then triton_step steps with their own (B, H) decays (a reset among them),
    updating the state in place: the fp64 recurrence over the whole sequence."""
    q, k, v, log_decay, s0 = problem(n=12, dtype=dtype)
    log_decay[1, 2, 9] = float("-inf")
    log_decay[0, 0, 10] = 0.0
    o, state = ld.attention(q[:, :, :8], k[:, :, :8], v[:, :, :8], log_decay=log_decay[:, :, :8], scale=0.7,
                            initial_state=s0, output_final_state=True, method="triton_recurrent")  # fmt: skip
    outs = [o]
    for t in range(8, 12):
        o_t, state = ld.decode_step(q[:, :, t], k[:, :, t], v[:, :, t], state, log_decay=log_decay[:, :, t],
                                    scale=0.7, out_state=state, method="triton_step")  # fmt: skip
        outs.append(o_t.unsqueeze(2))
    check("prefill + decode", torch.cat(outs, 2), state, expected(q, k, v, log_decay, s0, 0.7), dtype)


def test_decode_step_with_a_decay_form_and_a_new_state():
    q, k, v, log_decay, s0 = problem(n=1)
    lam = torch.exp(log_decay[:, :, 0])
    o, state = ld.decode_step(q[:, :, 0], k[:, :, 0], v[:, :, 0], s0, decay=lam, method="triton_step")
    check("one step", o.unsqueeze(2), state, expected(q, k, v, log_decay, s0), torch.float32)
    assert not torch.equal(state, s0)  # a new tensor: s0 is untouched


# ----- triton_chunked's backward -----

GRAD_DTYPES = [torch.float32, torch.float64] if DEVICE == "cpu" else [torch.float32]


@pytest.fixture
def backward_chunks_of_16(monkeypatch):
    """Under the interpreter the backward walks chunks of 16, so that short sequences cross chunk borders."""
    monkeypatch.setattr(chunked_bwd, "INTERPRET_CHUNK", 16)


def recurrence(q, k, v, log_decay, s0, scale):
    """The operator token by token in fp64, differentiable in every input (exp(-inf) = 0 forgets the state and
    gets a zero gradient): o and the final state."""
    state = s0
    outs = []
    for t in range(q.shape[2]):
        kv = k[:, :, t, :, None] * v[:, :, t, None, :]
        state = torch.exp(log_decay[:, :, t, None, None]) * state + kv
        outs.append(scale * (q[:, :, t, None, :] @ state).squeeze(-2))
    return (torch.stack(outs, 2) if outs else v.new_zeros(*q.shape[:3], v.shape[-1])), state


def assert_grads_close(got, want, dtype, names=("q", "k", "v", "log_decay", "initial_state")):
    """fp64: to 1e-10 as the torch methods' tests (tests/test_per_token.py); fp32: to 1e-4 of the largest entry."""
    for name, a, b in zip(names, got, want):
        atol = 1e-10 if dtype == torch.float64 else 1e-4 * b.abs().max().item()
        assert a.dtype == (dtype if name in "qkv" else b.dtype if dtype == torch.float64 else torch.float32)
        assert torch.allclose(a.cpu().double(), b, rtol=1e-4 if dtype != torch.float64 else 1e-10, atol=atol), name


def leaves_of(tensors, dtype=None):
    return [t.detach().clone().to(dtype=dtype or t.dtype).requires_grad_() for t in tensors]


def gradients(q, k, v, log_decay, s0, learned=True):
    """Of triton_chunked and of the fp64 recurrence (autograd): the gradients of a random linear loss on the output
    and the final state (scale 0.7), with respect to q, k, v, log_decay (only if `learned`) and s0."""
    w = torch.randn(*q.shape[:3], DV, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    w_state = torch.randn(*s0.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    fixed = log_decay.cpu().double()
    got_leaves = leaves_of((q, k, v, log_decay, s0) if learned else (q, k, v, s0))
    o, state = ld.attention(*got_leaves[:3], log_decay=got_leaves[3] if learned else log_decay,
                            initial_state=got_leaves[-1], scale=0.7, output_final_state=True,
                            method="triton_chunked")  # fmt: skip
    loss = (o * w.to(DEVICE, o.dtype)).sum() + (state * w_state.to(DEVICE, state.dtype)).sum()
    got = torch.autograd.grad(loss, got_leaves)
    leaves = leaves_of([t.cpu() for t in got_leaves], torch.float64)
    o, state = recurrence(*leaves[:3], leaves[3] if learned else fixed, leaves[-1], 0.7)
    return got, torch.autograd.grad((o * w).sum() + (state * w_state).sum(), leaves)


@pytest.mark.parametrize("learned", [True, False], ids=["learned-decay", "fixed-decay"])
@pytest.mark.parametrize("dtype", GRAD_DTYPES, ids=str)
def test_chunked_gradients_match_autograd_of_the_fp64_recurrence(dtype, learned, backward_chunks_of_16):
    """N = 37 (not a multiple of the chunk), Dk != Dv, log decays 0, -1e-7, -30, -1e4, -inf at token 0, at chunk
    edges (15, 16, 31, 32) and at the last token, an initial state, a loss on the output and the final state; the
    decay learned (its gradient compared too) or fixed (the kernels skip its gradient)."""
    q, k, v, log_decay, s0 = problem(n=37, dtype=dtype)
    for i, t in enumerate([31, 32, 36, 33, 34]):
        log_decay[i % 2, (i + 1) % H, t] = [-30.0, float("-inf"), -1e-7, -1e4, 0.0][i]
    got, want = gradients(q, k, v, log_decay, s0, learned)
    names = ("q", "k", "v", "log_decay", "initial_state") if learned else ("q", "k", "v", "initial_state")
    assert_grads_close(got, want, dtype, names)


def strong(log_decay: torch.Tensor, kind: str) -> torch.Tensor:
    """Every log decay -5 or -15, or -15 with 0 and -inf mixed in (at chunk edges 0, 15, 16 and inside at 19)."""
    if kind != "mixed":
        return torch.full_like(log_decay, float(kind))
    out = torch.full_like(log_decay, -15.0)
    out[..., 1::3] = 0.0
    out[..., [0, 15, 16, 19]] = float("-inf")
    return out


@pytest.mark.parametrize("dtype", GRAD_DTYPES, ids=str)
def test_chunked_gradients_with_the_head_dims_split_into_blocks(dtype, monkeypatch):
    """On a GPU the backward splits Dk (dq, dk kernels) and Dv (dv kernel) into blocks of 64 or 32, each block a
    program that adds its share of d log lambda per token and keeps its own tile of every chunk's start state; the
    interpreter's tiles hold a whole head dim. Blocks of 16 here (Dk = 40: three, Dv = 24: two) and chunks of 16,
    a learned decay with the edge values, against autograd of the fp64 recurrence."""
    from leetdecoding.methods.triton.common import dim_block

    monkeypatch.setattr(chunked_bwd, "_bwd_tiles", lambda d_split, d_full: (16, 16, dim_block(d_full)))
    g = torch.Generator().manual_seed(3)
    b, n, dk, dv = 2, 37, 40, 24
    q, k = (torch.randn(b, H, n, dk, generator=g, dtype=torch.float64) for _ in range(2))
    v, w = (torch.randn(b, H, n, dv, generator=g, dtype=torch.float64) for _ in range(2))
    s0, w_state = (torch.randn(b, H, dk, dv, generator=g, dtype=torch.float64) for _ in range(2))
    log_decay = edges(torch.rand(b, H, n, generator=g, dtype=torch.float64) * -2.0)
    state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    inputs = [t.to(DEVICE, d) for t, d in zip((q, k, v, log_decay, s0), (dtype,) * 3 + (state_dtype,) * 2)]
    got_leaves = leaves_of(inputs)
    o, state = ld.attention(*got_leaves[:3], log_decay=got_leaves[3], initial_state=got_leaves[4], scale=0.7,
                            output_final_state=True, method="triton_chunked")  # fmt: skip
    loss = (o * w.to(DEVICE, o.dtype)).sum() + (state * w_state.to(DEVICE, state.dtype)).sum()
    got = torch.autograd.grad(loss, got_leaves)
    leaves = leaves_of([t.cpu() for t in inputs], torch.float64)
    o, state = recurrence(*leaves, 0.7)
    assert_grads_close(got, torch.autograd.grad((o * w).sum() + (state * w_state).sum(), leaves), dtype)


@pytest.mark.parametrize("kind", ["-5", "-15", "mixed"])
@pytest.mark.parametrize("n", [20, 37])
@pytest.mark.parametrize("dtype", GRAD_DTYPES, ids=str)
def test_chunked_decay_gradient_at_strong_decays(dtype, n, kind, backward_chunks_of_16):
    """d log_decay within 2e-6 (fp32) or 1e-10 (fp64) of its largest entry at log decays of -5 and -15: the pairs
    near the diagonal are O(1) while the gradient is a sum of terms exp(G_t - G_s) over pairs crossing each token,
    as small as e^-15 where a pair crosses one token more; a form subtracting sums of O(1) terms was off by 0.27
    of the largest entry at -15 in fp32."""
    q, k, v, log_decay, s0 = problem(n=n, dtype=dtype)
    got, want = gradients(q, k, v, strong(log_decay, kind), s0)
    assert_grads_close(got, want, dtype)
    tol = 1e-10 if dtype == torch.float64 else 2e-6
    err = (got[3].cpu().double() - want[3]).abs().max().item()
    assert err <= tol * want[3].abs().max().item(), f"d log_decay off by {err:.3g}"


@pytest.mark.parametrize("dtype", GRAD_DTYPES, ids=str)
def test_chunked_gradients_of_packed_sequences(dtype, backward_chunks_of_16):
    """(1, H, T) log decays with cu_seqlens: each sequence's gradients from its own initial state and final state,
    a one-token and an empty sequence among them."""
    q, k, v, log_decay, _ = problem(b=1, n=40, dtype=dtype)
    cuts = [0, 1, 18, 18, 40]
    s0 = problem(b=len(cuts) - 1, n=1, dtype=dtype)[4]
    cu = torch.tensor(cuts, dtype=torch.int32, device=DEVICE)
    got_leaves = leaves_of((q, k, v, log_decay, s0))
    o, states = ld.attention(*got_leaves[:3], log_decay=got_leaves[3], cu_seqlens=cu, initial_state=got_leaves[4],
                             output_final_state=True, method="triton_chunked")  # fmt: skip
    got = torch.autograd.grad(o.sum() + states.pow(2).sum(), got_leaves)
    leaves = leaves_of([t.cpu() for t in got_leaves], torch.float64)
    loss = 0
    for i, (a, b) in enumerate(zip(cuts, cuts[1:])):
        part = [t[:, :, a:b] for t in leaves[:4]]
        o, state = recurrence(*part, leaves[4][i : i + 1], 1.0)
        loss = loss + o.sum() + state.pow(2).sum()
    assert_grads_close(got, torch.autograd.grad(loss, leaves), dtype)


# ----- what the methods declare -----


def test_explain_shows_which_triton_methods_take_per_token_decays():
    q, k, v, log_decay, s0 = problem(n=5)
    e = ld.explain(q, k, v, log_decay=log_decay, initial_state=s0)
    assert "triton_recurrent" not in e.refusals and "triton_chunked" not in e.refusals
    assert "no per-token decay" in "; ".join(e.refusals["triton_fleet"])
    d = ld.explain_decode(q[:, :, 0], k[:, :, 0], v[:, :, 0], s0, log_decay=log_decay[:, :, 0])
    assert "triton_step" not in d.refusals
    assert REGISTRY["triton_recurrent"].info()["per_token_decay"]


def test_per_token_decays_that_require_grad_are_refused_by_the_methods_without_a_backward():
    """triton_chunked trains a per-token decay (tested above) and takes one that requires grad; triton_recurrent
    and the decode step have no backward and say so."""
    q, k, v, log_decay, _ = problem(n=5)
    assert "triton_chunked" not in ld.explain(q.clone().requires_grad_(), k, v, log_decay=log_decay).refusals
    learned = log_decay.clone().requires_grad_()
    assert "triton_chunked" not in ld.explain(q, k, v, log_decay=learned).refusals
    with pytest.raises(ld.MethodRefusedError, match=r"'triton_recurrent' cannot run .*no gradient support"):
        ld.attention(q, k, v, log_decay=log_decay.requires_grad_(), method="triton_recurrent")
    lam = log_decay.detach()[:, :, 0].requires_grad_()
    with pytest.raises(ld.MethodRefusedError, match=r"'triton_step' cannot run .*no gradient support"):
        ld.decode_step(q[:, :, 0], k[:, :, 0], v[:, :, 0], _state(q), log_decay=lam, method="triton_step")


def _state(q):
    return torch.zeros(*q.shape[:2], DK, DV, dtype=torch.float32, device=q.device)
