"""The custom backward of the chunked method with per-token decays (leetdecoding.methods.gated_chunked): against
autograd of the fp64 recurrence at the edges (log decays 0, -1e-7, -30, -1e4, -inf at chunk edges and token 0),
across spans of one chunk and of many, with bf16 inputs, gradcheck, gradgradcheck, packed sequences and
checkpoints through the public call, a decay gradient at least as accurate as plain autograd's of the chunk loop,
and its memory at a long sequence."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import leetdecoding as ld
from leetdecoding.inputs import validate
from leetdecoding.methods import gated
from leetdecoding.methods.chunked import Chunked
from leetdecoding.methods.naive import reference_closed_form

from .test_per_token import edges

H, DK, DV = 3, 6, 4
SCALE = 0.7
CHUNK = 16
SPANS = {"one chunk per span": 1, "one span": 1 << 30, "three chunks per span": 3 * H * DK * DV * 4 * 2}


def problem(b=2, n=70, seed=0, low=-0.5, h=H):
    """q, k, v, do (b, h, n, D), log decays, initial state and final-state gradient, fp64."""
    g = torch.Generator().manual_seed(seed)
    q, k, do = (torch.randn(b, h, n, d, generator=g, dtype=torch.float64) for d in (DK, DK, DV))
    v = torch.randn(b, h, n, DV, generator=g, dtype=torch.float64)
    log_decay = torch.rand(b, h, n, generator=g, dtype=torch.float64) * low
    s0, ds = (torch.randn(b, h, DK, DV, generator=g, dtype=torch.float64) for _ in range(2))
    return q, k, v, do, log_decay, s0, ds


def chunked(q, k, v, log_decay, s0, span_bytes=1 << 30, chunk_size=CHUNK):
    """The chunked method with these options, straight from its inputs record (o, final state)."""
    x = validate(q, k, v, log_decay=log_decay, scale=SCALE, initial_state=s0, output_final_state=True)
    return Chunked().forward(x, chunk_size=chunk_size, span_bytes=span_bytes)


def recurrence(q, k, v, log_decay, s0):
    """The fp64 recurrence, differentiable by autograd: exact at every edge (exp(-inf) = 0 has derivative 0)."""
    return recurrence_of_lambda(q, k, v, torch.exp(log_decay), s0)


def recurrence_of_lambda(q, k, v, lam, s0=None):
    s = q.new_zeros(*q.shape[:2], q.shape[-1], v.shape[-1]) if s0 is None else s0
    out = []
    for t in range(q.shape[2]):
        s = lam[:, :, t, None, None] * s + k[:, :, t, :, None] * v[:, :, t, None, :]
        out.append(SCALE * (q[:, :, t, None, :] @ s).squeeze(-2))
    return torch.stack(out, 2) if out else q.new_zeros(*q.shape[:3], v.shape[-1]), s


def grads(run, inputs, do, ds):
    leaves = [t.clone().requires_grad_() for t in inputs]
    o, state = run(*leaves)
    return torch.autograd.grad((o.double() * do).sum() + (state.double() * ds).sum(), leaves)


@pytest.mark.parametrize("span", list(SPANS))
def test_gradcheck(span):
    q, k, v, _, log_decay, s0, _ = problem(b=1, n=11)
    leaves = [t[..., :d].clone().requires_grad_() for t, d in ((q, 3), (k, 3), (v, 2))]
    leaves += [log_decay.clone().requires_grad_(), s0[..., :3, :2].clone().requires_grad_()]  # Dk = 3 != Dv = 2

    def f(q, k, v, g, s0):
        return chunked(q, k, v, g, s0, SPANS[span], chunk_size=4)

    assert torch.autograd.gradcheck(f, leaves)


def test_gradgradcheck():
    q, k, v, _, log_decay, s0, _ = problem(b=1, n=7)
    leaves = [t.clone().requires_grad_() for t in (q[..., :2], k[..., :2], v[..., :3], log_decay, s0[..., :2, :3])]

    def f(q, k, v, g, s0):
        return chunked(q, k, v, g, s0, 1, chunk_size=3)

    assert torch.autograd.gradgradcheck(f, leaves)


@pytest.mark.parametrize("span", list(SPANS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gradients_at_the_edges_match_the_fp64_recurrence(dtype, span):
    """Every gradient within the dtype's rounding of the largest one, and exactly 0 for the log decays that reset
    the state (-1e4 and -inf: every factor across them is 0); the reference takes the rounded inputs."""
    q, k, v, do, log_decay, s0, ds = problem(n=70)
    log_decay = edges(log_decay)
    inputs = [q.to(dtype), k.to(dtype), v.to(dtype), log_decay.float(), s0.float()]
    got = grads(lambda *t: chunked(*t, SPANS[span]), inputs, do, ds)
    want = grads(recurrence, [t.double() for t in inputs], do, ds)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2  # bf16: the gradients of q, k, v are bf16
    for name, a, b, x in zip(("q", "k", "v", "log_decay", "initial_state"), got, want, inputs):
        assert a.dtype == x.dtype, f"d{name} in {a.dtype}"
        err = (a.double() - b).abs().max().item() / b.abs().max().item()
        assert err < tolerance, f"d{name}: error {err:.2e} of the largest"
    resets = log_decay < -1e3
    assert torch.equal(got[3][resets], torch.zeros_like(got[3][resets]))


@pytest.mark.parametrize("span", ["one chunk per span", "one span"])
def test_a_decay_without_gradient(span):
    """The backward skips d log_decay when the decay does not require grad (its own branch of the products)."""
    q, k, v, do, log_decay, s0, ds = problem(n=45)
    log_decay = edges(log_decay)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, s0)]
    o, state = chunked(*leaves[:3], log_decay, leaves[3], SPANS[span])
    got = torch.autograd.grad((o * do).sum() + (state * ds).sum(), leaves)
    want = grads(recurrence, (q, k, v, log_decay, s0), do, ds)
    for name, a, b in zip(("q", "k", "v", "initial_state"), got, want[:3] + want[4:]):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-10), f"d{name}"


def test_cumulative_sums_reaching_minus_1e6():
    """Log decays summing to -1e6 over the sequence: the gradients come from sums within a chunk."""
    n = 4096
    q, k, v, do, _, s0, ds = problem(b=1, n=n, h=1)
    log_decay = torch.full((1, 1, n), -1e6 / n, dtype=torch.float64)
    log_decay[..., ::7] = -1e-3
    log_decay[..., 1::7] = -29.0
    inputs = [t.float() for t in (q, k, v, log_decay, s0)]
    got = grads(lambda *t: chunked(*t, 1 << 16, chunk_size=64), inputs, do, ds)
    want = grads(recurrence, [t.double() for t in inputs], do, ds)
    for name, a, b in zip(("q", "k", "v", "log_decay", "initial_state"), got, want):
        err = (a.double() - b).abs().max().item() / b.abs().max().item()
        assert err < 1e-5, f"d{name}: error {err:.2e} of the largest"


def _pair_magnitude(q, k, v, do, log_decay):
    """sum over the pairs s < u <= t of |the pair's term| (no initial state): the scale of d g_u's terms."""
    G = torch.cumsum(log_decay, -1)
    n = q.shape[2]
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    factors = torch.exp((G.unsqueeze(-1) - G.unsqueeze(-2)).masked_fill(~causal, float("-inf")))
    terms = (factors * (q @ k.transpose(-1, -2)) * (do @ v.transpose(-1, -2))).abs().cumsum(-1)  # [t, j]: s <= j
    later = torch.ones(n, n, dtype=torch.float64).tril(-1)  # [t > j]
    return torch.nn.functional.pad((terms[..., :-1] * later[:, :-1]).sum(-2), (1, 0))


@pytest.mark.parametrize("lam,d", [(0.05, 16), (0.99, 64)])
def test_the_decay_gradient_is_as_accurate_as_autograd_of_the_chunk_loop(lam, d):
    """Error of d g per token relative to the magnitude of its terms, against plain autograd of the same chunk
    loop (gated.blocks_differentiable, the path this backward replaced). Measured: lambda 0.05, D 16: 1.1e-5 both (the
    fp32 rounding of q . k where it cancels); lambda 0.99, D 64: 2.5e-8 against autograd's 1.2e-7."""
    gen = torch.Generator().manual_seed(1)
    q, k, v, do = (torch.randn(1, 2, 256, d, generator=gen) for _ in range(4))
    g = torch.log(torch.tensor(lam)) * (0.5 + torch.rand(1, 2, 256, generator=gen))
    ref = grads(lambda g: (reference_closed_form(q.double(), k.double(), v.double(), g)[0], g.new_zeros(())),
                [g.double()], do.double(), 0.0)[0]  # fmt: skip
    magnitude = _pair_magnitude(*(t.double() for t in (q, k, v, do, g)))[..., 1:]  # d g_0 has no terms
    errors = {}
    for name in ("custom", "autograd"):
        leaf = g.clone().requires_grad_()
        x = validate(q, k, v, log_decay=leaf)
        if name == "custom":
            o = Chunked().forward(x, chunk_size=64, span_bytes=1 << 20)[0]
        else:
            o = gated.blocks_differentiable(q, k, v, x.log_decay, torch.zeros(1, 2, d, d), 1.0, 64)[0]
        (got,) = torch.autograd.grad((o * do).sum(), leaf)
        errors[name] = ((got.double() - ref).abs()[..., 1:] / magnitude).max().item()
    assert errors["custom"] <= 1.5 * errors["autograd"] and errors["custom"] < 2e-5, errors


def test_packed_sequences_and_checkpoints_with_gradients():
    q, k, v, do, log_decay, _, _ = problem(b=1, n=90)
    cu = torch.tensor([0, 30, 30, 90])
    g = torch.Generator().manual_seed(1)
    s0, ds = (torch.randn(3, H, DK, DV, generator=g, dtype=torch.float64) for _ in range(2))
    dc = torch.randn(2, 1, H, DK, DV, generator=g, dtype=torch.float64)
    inputs = [q, k, v, log_decay, s0]

    def packed(q, k, v, g, s0):
        o, states, saved = ld.attention(q, k, v, log_decay=g, cu_seqlens=cu, initial_state=s0, scale=SCALE,
                                        output_final_state=True, state_checkpoints=[10, 60],
                                        method="chunked")  # fmt: skip
        return o, torch.cat([states.flatten(), saved.flatten()])

    def separate(q, k, v, g, s0):
        outs, states, saved = [], [], []
        for i, (a, b) in enumerate(((0, 30), (30, 30), (30, 90))):
            for lo, hi in ((a, min(b, 60)), (min(b, 60), b)) if b == 90 else ((a, b),):
                part = [t[..., lo:hi, :] for t in (q, k, v)] + [g[..., lo:hi]]
                o, s = reference_closed_form(*part, s0[i : i + 1] if lo == a else saved[-1], SCALE)
                outs.append(o)
                saved.append(s) if hi == 60 else None
            states.append(s)
        first = reference_closed_form(q[..., :10, :], k[..., :10, :], v[..., :10, :], g[..., :10], s0[:1], SCALE)[1]
        return torch.cat(outs, 2), torch.cat([torch.cat(states).flatten(), first.flatten(), saved[0].flatten()])

    extra = torch.cat([ds.flatten(), dc.flatten()])
    got = grads(packed, inputs, do, extra)
    want = grads(separate, inputs, do, extra)
    for name, a, b in zip(("q", "k", "v", "log_decay", "initial_state"), got, want):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-10), f"d{name}"


@pytest.mark.parametrize("method", ["chunked", "vanilla", "recurrent"])
def test_the_gradient_of_a_decay_given_as_lambda(method):
    """decay= (lambda) with values from 1e-2 down to 1e-12, and resets (1e-20 is one in fp32, below exp(-30); 0),
    in two batch rows, from an initial state: d lambda matches the fp64 recurrence to fp32 accuracy. At a reset it
    is the one-sided <dL/dS_t, S_{t-1}> (segments cut there, leetdecoding.segments._through_reset), not 0; vanilla
    runs gated_chunked's backward over one block (autograd through its block had 1.2e-3 at 1e-12)."""
    q, k, v, do, log_decay, s0, ds = problem(b=2, n=70)
    lam = torch.exp(log_decay)
    small = [1e-2, 1e-6, 1e-10, 1e-12, 1e-20, 0.0]
    at = [(i % 2, i % H, 5 + 11 * i) for i in range(len(small))]  # inside chunks, at 16, 49, and token 60
    for x, where in zip(small, at):
        lam[where] = x
    inputs = [t.float() for t in (q, k, v, lam, s0)]
    leaves = [t.clone().requires_grad_() for t in inputs]
    o, state = ld.attention(*leaves[:3], decay=leaves[3], initial_state=leaves[4], scale=SCALE,
                            output_final_state=True, method=method)  # fmt: skip
    got = torch.autograd.grad((o.double() * do).sum() + (state.double() * ds).sum(), leaves)
    ref_leaves = [t.double().requires_grad_() for t in inputs]
    o, state = recurrence_of_lambda(*ref_leaves)
    want = torch.autograd.grad((o * do).sum() + (state * ds).sum(), ref_leaves)
    for x, where in zip(small, at):
        err = abs(got[3][where].item() - want[3][where].item()) / abs(want[3][where].item())
        assert err < 1e-5, f"d lambda at lambda = {x}: relative error {err:.2e}"
    for name, a, b in zip(("q", "k", "v", "decay", "initial_state"), got, want):
        assert torch.allclose(a.double(), b, rtol=1e-5, atol=1e-5 * b.abs().max().item()), name


def test_the_gradient_of_a_decay_given_as_lambda_at_resets_in_packed_sequences():
    """Packed sequences (cu_seqlens) with lambda = 0 at a sequence's first token, inside one and at a chunk edge:
    each reset's d lambda is its one-sided value, each sequence from its own initial state."""
    q, k, v, do, log_decay, _, _ = problem(b=1, n=50)
    cuts = [0, 20, 50]
    s0 = problem(b=2, n=1, seed=1)[5]
    lam = torch.exp(log_decay)
    for t in (7, 16, 20, 33):
        lam[0, t % H, t] = 0.0
    inputs = [t.float() for t in (q, k, v, lam, s0)]
    leaves = [t.clone().requires_grad_() for t in inputs]
    cu = torch.tensor(cuts)
    o = ld.attention(*leaves[:3], decay=leaves[3], initial_state=leaves[4], scale=SCALE, cu_seqlens=cu,
                     method="chunked")  # fmt: skip
    got = torch.autograd.grad((o.double() * do).sum(), leaves)
    ref_leaves = [t.double().requires_grad_() for t in inputs]
    parts = [recurrence_of_lambda(*(t[:, :, a:b] for t in ref_leaves[:4]), ref_leaves[4][i : i + 1])[0]
             for i, (a, b) in enumerate(zip(cuts, cuts[1:]))]  # fmt: skip
    want = torch.autograd.grad((torch.cat(parts, 2) * do).sum(), ref_leaves)
    for name, a, b in zip(("q", "k", "v", "decay", "initial_state"), got, want):
        assert torch.allclose(a.double(), b, rtol=1e-5, atol=1e-5 * b.abs().max().item()), name
    for t in (7, 16, 20, 33):
        assert got[3][0, t % H, t].item() != 0.0 and want[3][0, t % H, t].item() != 0.0


MEASURE = """
import json, sys, torch
from leetdecoding.bench.memory import PeakMemory
from leetdecoding.inputs import validate
from leetdecoding.methods import gated
from leetdecoding.methods.chunked import Chunked
g = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(1, 2, 8192, 16, generator=g).requires_grad_() for _ in range(3))
log_decay = -torch.rand(1, 2, 8192, generator=g).requires_grad_()
def run(new):
    x = validate(q, k, v, log_decay=log_decay)
    if new:
        o = Chunked().forward(x, chunk_size=64, span_bytes=8 << 20)[0]
    else:  # plain autograd through the chunk loop: every chunk's products and tables kept
        o = gated.blocks_differentiable(q, k, v, x.log_decay, torch.zeros(1, 2, 16, 16), 1.0, 64)[0]
    return torch.autograd.grad(o.sum(), (q, k, v, log_decay))
peaks = {}
for name in ("new", "old", "new", "old"):  # the first of each warms up
    with PeakMemory("cpu") as peak:
        run(name == "new")
    peaks[name] = peak.bytes
print(json.dumps(peaks))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the peak is read from /proc (Linux)")
def test_forward_and_backward_memory_is_far_below_plain_autograd():
    """Resident peak of forward + backward at N = 8192 (D = 16, chunks of 64), gradients included, measured in a
    fresh process whose allocator returns freed blocks (leetdecoding.bench.memory.MEASURE_ENV). Measured: 4.9 MiB
    against 29.5 MiB (autograd keeps every chunk's products and tables)."""
    from leetdecoding.bench.memory import MEASURE_ENV

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, **MEASURE_ENV, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", MEASURE], env=env, capture_output=True, text=True, check=True)
    peaks = json.loads(out.stdout.strip().splitlines()[-1])
    if peaks["new"] is None:
        pytest.skip("the high-water mark cannot be reset here (/proc/self/clear_refs)")
    assert peaks["new"] * 4 < peaks["old"], peaks
