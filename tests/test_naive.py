"""The one fp64 reference (leetdecoding.methods.naive) and the one tolerance table: the benchmarks' fast fp64
sums agree with the token-by-token loop, and every bound (tests, check, bench, the GPU benchmark) is read from
TOLERANCE."""

from __future__ import annotations

import torch

from benchmarks import gpu_bench
from leetdecoding.bench import check, sweep
from leetdecoding.inputs import compute_dtype_for
from leetdecoding.methods.naive import (
    TOLERANCE,
    reference,
    reference_closed_form,
    relative_error,
    rounded_operand_tolerance,
)

LOG_DECAY = torch.log(torch.tensor([1.0, 1 - 2**-12, 0.5, 1e-6], dtype=torch.float64))


def inputs(n=37, dk=12, dv=20):
    g = torch.Generator().manual_seed(n)
    return [torch.randn(2, 4, n, d, generator=g, dtype=torch.float64) for d in (dk, dk, dv, dv)]


def test_every_bound_comes_from_the_table():
    for dtype, tol in TOLERANCE.items():
        assert sweep.error_limit(dtype) == tol
        assert check.tolerances(dtype) == (tol, TOLERANCE[compute_dtype_for(dtype)])
        for exact in ("triton_chunked", "torch chunked", "leetdecoding.decode_step torch"):
            assert gpu_bench.bound(dtype, exact) == tol, exact
        for rounded in ("triton_chunked fast", "fla chunk_simple_gla", "transformers MiniMax loop"):
            assert gpu_bench.bound(dtype, rounded) == rounded_operand_tolerance(dtype), rounded
        assert tol < rounded_operand_tolerance(dtype) <= 8 * tol + TOLERANCE[torch.bfloat16]


def test_fp64_sums_are_the_naive_reference():
    q, k, v, _ = inputs()
    o, o_abs = sweep.fp64_sums(q, k, v, LOG_DECAY, scale=-0.5)
    ref = reference(q, k, v, LOG_DECAY.exp(), scale=-0.5)
    assert relative_error(o, ref.o, ref.o_abs) < 1e-13
    assert relative_error(o_abs, ref.o_abs, ref.o_abs) < 1e-13


def test_gpu_bench_gradient_sums_are_the_closed_forms():
    q, k, v, do = inputs()
    got = gpu_bench.fp64_gradients(q, k, v, LOG_DECAY, -0.5, do)
    want = []
    for x, dy, scale in (((q, k, v), do, -0.5), ((q.abs(), k.abs(), v.abs()), do.abs(), 0.5)):
        leaves = [t.clone().requires_grad_() for t in x]
        want.append(torch.autograd.grad(reference_closed_form(*leaves, LOG_DECAY, scale=scale)[0], leaves, dy))
    for (g, g_abs), g_ref, g_abs_ref in zip(got, *want):
        assert relative_error(g, g_ref, g_abs_ref) < 1e-12
        assert relative_error(g_abs, g_abs_ref, g_abs_ref) < 1e-12


def test_relative_error_catches_a_wrong_answer():
    q, k, v, _ = inputs(n=9)
    ref = reference(q, k, v, LOG_DECAY.exp())
    assert relative_error(ref.o, ref.o, ref.o_abs) == 0.0
    assert relative_error(ref.o * 1.001, ref.o, ref.o_abs) > TOLERANCE[torch.float32]
    assert relative_error(ref.o[:, :, 1:], ref.o, ref.o_abs) == float("inf")
    assert relative_error(ref.o.clone().fill_(float("nan")), ref.o, ref.o_abs) == float("inf")
