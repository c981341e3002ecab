"""Review of the one-chunk-at-a-time chunked forward / backward, the huge-page outputs and the blocked decode step
(commits 4a2703e..4f52079): the inputs that broke them, and a few kinds of input no other test covers."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import leetdecoding as ld
from leetdecoding.methods import base
from leetdecoding.methods.naive import reference, reference_closed_form

from .reference import assert_close


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread: on this 2-core machine shared with other jobs, two threads made each small product
    100x slower (1.6 s against 0.017 s for a gradient case below)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def randn(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


# ----- outputs are allocated on the inputs' device, whatever torch's default device is -----


@pytest.mark.parametrize("method", ["auto", "chunked", "recurrent", "vanilla", "recursion", "fleet"])
def test_attention_output_on_the_inputs_device_under_a_default_device(method, monkeypatch):
    """`torch.set_default_device` / `with torch.device(...)` must not move a CPU call's output: hugepages.empty
    calls torch.empty(shape, dtype) without device=, so the output is made on the default device (meta here, cuda
    for a user who set it) and the chunks are copied into it (RuntimeError here; a CUDA output for CPU inputs
    there). 4a2703e returned the CPU result. The production allocator (no NaN fill) is the one under test."""
    monkeypatch.setattr(base, "FILL_UNWRITTEN_WITH_NAN", False)
    q, k, v = (randn(1, 2, 10, 8, seed=i) for i in range(3))
    expected = ld.attention(q, k, v, 0.9, method=method)  # also warms the decay memos (not part of this bug)
    with torch.device("meta"):
        o = ld.attention(q, k, v, 0.9, method=method)
    assert o.device.type == "cpu"
    assert torch.equal(o, expected)


@pytest.mark.parametrize("decay", [0.8125, torch.tensor([0.71875, 0.59375])])
def test_a_decay_first_seen_under_a_default_device(decay):
    """The decay's checks and tables are built on the CPU, not on torch's default device, also the first time a
    value is seen (the memos are cold for these values): a number, and a CPU tensor read by value."""
    q, k, v = (randn(1, 2, 300, 8, seed=i) for i in range(3))
    with torch.device("meta"):
        o, state = ld.attention(q, k, v, decay, output_final_state=True)
        o_step, new = ld.decode_step(q[:, :, 0], k[:, :, 0], v[:, :, 0], state, decay)
    r = reference(q, k, v, torch.as_tensor(decay, dtype=torch.float64))
    assert o.device.type == state.device.type == o_step.device.type == new.device.type == "cpu"
    assert_close("under a default device", o, r.o, r.o_abs, torch.float32)


def test_decode_step_blocked_path_on_the_state_device_under_a_default_device(monkeypatch):
    """recurrent.step's blocked and per-head paths (a CPU state over WHOLE_STATE_BYTES and CACHE_BLOCK_BYTES per
    torch thread) allocate `new` and `o` with torch.empty(..., dtype=) and no device=: under a default device the
    step fails with 'Attempting to copy from device cpu to device meta'. The whole-state path (small states) and
    4a2703e work."""
    B, H, D = 10, 16, 128  # a 10 MiB fp32 state: blocks at 1 and 2 threads
    q, k, v = (randn(B, H, D, seed=i) for i in range(3))
    state = randn(B, H, D, D, seed=3)
    expected_o, expected_state = ld.decode_step(q, k, v, state, 0.9)
    with torch.device("meta"):
        o, new = ld.decode_step(q, k, v, state, 0.9)
    assert o.device.type == "cpu" and new.device.type == "cpu"
    assert torch.equal(o, expected_o) and torch.equal(new, expected_state)


# ----- the memory guard's estimate for the (B, N, H, D).transpose(1, 2) layout -----

_PEAK_SCRIPT = r"""
import json, sys, torch
import leetdecoding as ld
from leetdecoding import dispatch
from leetdecoding.inputs import validate
from leetdecoding.bench.memory import PeakMemory
B, H, N, D = 2, 4, int(sys.argv[1]), 64
def make(n):
    return torch.randn(B, n, H, D).transpose(1, 2)  # a (B, N, H, D) projection: B and H cannot merge
ld.attention(make(70), make(70), make(70), 0.9, method="chunked")  # warm-up
q, k, v = make(N), make(N), make(N)
estimate = dispatch.choose(validate(q, k, v, 0.9, None, 1.0, None, False), "chunked").estimate_bytes
with PeakMemory("cpu") as peak:
    o = ld.attention(q, k, v, 0.9, method="chunked")
print(json.dumps({"peak": peak.bytes, "estimate": estimate}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the peak is read from /proc (Linux)")
def test_memory_estimate_covers_a_transposed_layout_with_a_partial_chunk():
    """B=2, H=4, N=2000 (not a multiple of the chunk, 128 at D=64), fp32 q, k, v as (B, N, H, D).transpose(1, 2),
    no grad: the forward's step for the whole chunks and the step for the last partial chunk each copied q, k, v
    whole to (B*H, N, D), and the first step was still alive when the second was built, so two full copies were
    live while extra_memory_bytes counted one (now each chunk is copied into one buffer). At N=4000 that measured
    56.5 MiB against an estimate of 38.4 MiB; 4a2703e peaked at 13.2 MiB."""
    from leetdecoding.bench.memory import MEASURE_ENV

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, **MEASURE_ENV, "PYTHONPATH": root, "LEETDECODING_TUNING": "off"}
    env.pop("LEETDECODING_DEBUG_NAN", None)
    out = subprocess.run(
        [sys.executable, "-c", _PEAK_SCRIPT, "2000"], env=env, capture_output=True, text=True, check=True
    ).stdout
    r = json.loads(out.strip().splitlines()[-1])
    if r["peak"] is None:
        pytest.skip("the high-water mark cannot be reset here (/proc/self/clear_refs)")
    mib = 1 << 20
    assert r["peak"] <= r["estimate"], f"measured {r['peak'] / mib:.1f} MiB > estimate {r['estimate'] / mib:.1f} MiB"


# ----- kept: kinds of input nothing else covers (they pass) -----


@pytest.mark.parametrize(
    "n,d,dtype", [(129, 64, torch.float32), (65, 128, torch.bfloat16)], ids=["chunk128-fp32", "chunk64-bf16"]
)  # chunk 128 (D=64) and 64 (D=128), each with a partial last chunk
def test_gradients_of_transposed_and_expanded_inputs(n, d, dtype):
    """q expanded over batch and heads (stride 0), k and v (B, N, H, D).transpose(1, 2) with Dk != Dv, loss o.sum()
    (an expanded do) plus the final state's sum (an expanded d_final), a learnable decay and initial state; no
    input is written."""
    B, H, dv = 2, 3, d + 32
    cd = torch.float32
    q_base = randn(1, 1, n, d, dtype=dtype, seed=1).requires_grad_()
    k = randn(B, n, H, d, dtype=dtype, seed=2).transpose(1, 2).requires_grad_()
    v = randn(B, n, H, dv, dtype=dtype, seed=3).transpose(1, 2).requires_grad_()
    g = torch.log(torch.tensor([0.5, 0.9, 1.0], dtype=cd)).requires_grad_()
    s0 = randn(B, H, d, dv, dtype=cd, seed=4).requires_grad_()
    leaves = [q_base, k, v, g, s0]
    before = [t.detach().clone() for t in leaves]
    o, st = ld.attention(
        q_base.expand(B, H, n, d), k, v, log_decay=g, initial_state=s0, scale=0.088, method="chunked",
        output_final_state=True,
    )  # fmt: skip
    (o.sum() + st.sum()).backward()
    for t, b in zip(leaves, before):
        assert torch.equal(t.detach(), b)
    ref = [t.detach().double().requires_grad_() for t in leaves]
    ro, rs = reference_closed_form(ref[0].expand(B, H, n, d), *ref[1:3], ref[3], ref[4], scale=0.088)
    o_err = ((o.double() - ro).abs().max() / ro.abs().max()).item()
    assert o_err < (1e-5 if dtype == torch.float32 else 1e-2), f"o: relative error {o_err:.2e}"
    (ro.sum() + rs.sum()).backward()
    tol = 2e-4 if dtype == torch.float32 else 3e-2
    for name, a, b in zip(("dq", "dk", "dv", "dlog_decay", "dinitial_state"), leaves, ref):
        err = ((a.grad.double() - b.grad).abs().max() / b.grad.abs().max()).item()
        assert err < tol, f"{name}: relative error {err:.2e}"


def test_production_output_buffer_large_output(monkeypatch):
    """The allocator the tests otherwise replace with a NaN fill: a 4 MiB+ CPU output (madvise'd huge pages),
    twice in a row (the second may reuse the first's memory), against the fp64 reference."""
    q, k = (randn(1, 4, 1030, 16, seed=i) for i in range(2))
    v = randn(1, 4, 1030, 256, seed=2)  # o: 4.2 MiB
    r = reference(q, k, v, torch.tensor(0.95, dtype=torch.float64))
    monkeypatch.setattr(base, "FILL_UNWRITTEN_WITH_NAN", False)
    for _ in range(2):
        assert_close("production output buffer", ld.attention(q, k, v, 0.95, method="chunked"), r.o, r.o_abs,
                     torch.float32)
