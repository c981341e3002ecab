"""The memory guard's estimates are upper bounds of what the methods really use.

Each case runs one `ld.attention` call in a fresh process whose allocator returns every freed block to the OS
(leetdecoding/bench/memory.py), and compares the resident high-water mark of the call with the estimate the
dispatcher plans with. Shapes of tens of MiB, so that allocator noise (well under 1 MiB) does not matter;
benchmarks/memory_estimates.py prints the ratios over a larger grid.
"""

from __future__ import annotations

import sys

import pytest

from leetdecoding.bench.memory import measure_cases


def case(method: str, shape: list[int], dtype: str, *flags: str) -> dict:
    return {"method": method, "shape": shape, "dtype": dtype, **{f: True for f in flags}}


STATES = ("initial_state", "output_final_state")
CASES = [
    case("vanilla", [1, 2, 1200, 8, 8], "fp32"),
    case("vanilla", [2, 2, 800, 16, 16], "bf16", *STATES),
    case("vanilla", [1, 2, 800, 8, 8], "fp64", "grad"),
    case("vanilla", [2, 2, 700, 16, 16], "fp32", "grad", "per_token", *STATES),
    case("recurrent", [4, 8, 200, 128, 128], "fp32", "output_final_state"),
    case("recurrent", [4, 8, 300, 128, 128], "fp32", "grad"),
    case("chunked", [2, 4, 4096, 64, 64], "fp32"),
    case("chunked", [1, 8, 2001, 64, 64], "bf16", *STATES),
    case("chunked", [2, 4, 2048, 64, 64], "fp64", "grad"),
    case("chunked", [2, 4, 4096, 64, 64], "fp32", "per_token"),
    case("chunked", [1, 8, 2001, 64, 64], "bf16", "grad", "per_token", *STATES),
    case("recursion", [2, 4, 2048, 64, 64], "fp32", *STATES),
    case("recursion", [1, 4, 2000, 64, 32], "fp32", "grad"),
    case("fleet", [1, 4, 20000, 16, 16], "fp32"),
    case("fleet", [1, 4, 10000, 16, 16], "fp64", *STATES),
]
MIB = 1 << 20


def label(case: dict) -> str:
    flags = [f for f in ("initial_state", "output_final_state", "grad", "per_token") if case.get(f)]
    return f"{case['method']} {tuple(case['shape'])} {case['dtype']} {' '.join(flags)}"


def test_estimates_are_upper_bounds_of_the_peaks():
    """Every case measured in one process (about 15 s); every failing case is listed."""
    if not sys.platform.startswith("linux"):
        pytest.skip("the peak is read from /proc (Linux)")
    problems = []
    for r in measure_cases(CASES):
        if r["peak"] is None:
            pytest.skip("the high-water mark cannot be reset here (/proc/self/clear_refs)")
        peak, estimate = r["peak"], r["estimate"]
        what = f"{label(r)}: measured {peak / MIB:.1f} MiB, estimate {estimate / MIB:.1f} MiB"
        if peak < 2 * MIB:
            problems.append(f"{what}: too small a case to measure")
        if peak > estimate:
            problems.append(f"{what}: the estimate is below the peak")
        # and not so loose that the guard refuses what fits (with grad, recurrent also counts its backward)
        if not r.get("grad") and estimate > 2.5 * peak + 4 * MIB:
            problems.append(f"{what}: the estimate is more than 2.5 times the peak")
    assert not problems, "\n".join(problems)
