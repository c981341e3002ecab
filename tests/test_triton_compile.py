"""The Triton kernels compile for the GPUs that run them (sm_90, sm_80), with the shared memory those have.

The interpreter tests check what the kernels compute; this compiles every launch the methods make, through
their own host code, with Triton's CUDA backend (no GPU needed): a kernel that the interpreter runs but the
compiler rejects, or that needs more shared memory than the device has at every variant, fails here.
"""

import importlib.util
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")

KERNELS = (
    "chunked_fwd_kernel",
    "chunked_bwd_dq_kernel",
    "chunked_bwd_dk_kernel",
    "chunked_bwd_dv_kernel",
    "recurrent_fwd_kernel",
    "fleet_fwd_kernel",
)


def test_every_launch_compiles_and_fits():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    module = "leetdecoding.bench.compile_check"
    runs = {  # one process per architecture, side by side
        arch: subprocess.Popen(
            [sys.executable, "-m", module, "--arch", str(arch), "--quick"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for arch in (90, 80)
    }
    for arch, run in runs.items():
        out, err = run.communicate(timeout=600)
        report = f"sm_{arch}:\n{out}\n{err[-3000:]}"
        assert run.returncode == 0, report
        fitting = [line for line in out.splitlines() if line.endswith(" yes")]
        for name in KERNELS:  # each kernel compiled with a variant that fits
            assert any(name in line for line in fitting), (name, report)


def test_a_second_binary_for_another_length_is_reported():
    from leetdecoding.bench.compile_check import LENGTHS, Compiled, recompiled

    def row(n, binary, kernel="chunked_fwd_kernel"):
        return Compiled(kernel, f"{LENGTHS} N={n} chunked", "BT=64", binary, 0, 0, 0, True)

    assert recompiled([row(100, "a"), row(1024, "a"), row(1, "a")]) == []
    found = recompiled([row(100, "a"), row(1024, "b"), row(1, "a")])
    assert found == ["chunked_fwd_kernel (chunked, BT=64): 2 binaries"]
