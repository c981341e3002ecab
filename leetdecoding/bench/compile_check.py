"""Compile every Triton kernel launch for a GPU that is not here, and report what each launch would use.

    python -m leetdecoding.bench.compile_check              # sm_90 (H100) and sm_80 (A100)
    python -m leetdecoding.bench.compile_check --arch 90 --quick

Triton's interpreter checks what the kernels compute, not that they compile for a GPU. This runs the methods'
own host code on small CPU tensors, but every launch is compiled by Triton's CUDA backend (with the ptxas that
ships with Triton) for the given compute capability instead of being run. Shared memory comes from the
compiled kernel, registers and spills from the cubin (reported: ptxas spills rather than fail, so registers
never stop a launch). A variant that needs more shared memory than the device has raises OutOfResources as the
device would at launch, so the report shows the variant each method settles on. Runs without
TRITON_INTERPRET (the kernels must be compiled, not interpreted); exit status 1 when a launch fails to compile,
has no variant that fits, or compiles again for a new sequence length.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass

import torch

from ..inputs import dtype_name

# shared memory a block may opt into, bytes (CUDA programming guide, compute capabilities table)
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}


@dataclass
class Compiled:
    kernel: str
    case: str
    constants: str
    binary: str  # the compiled kernel's hash
    shared: int
    registers: int
    spill_bytes: int
    fits: bool


class _Target:
    """Triton's active-driver interface, reduced to what compiling (not launching) needs."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.arch = arch
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_device(self):
        return self.arch  # one compile cache per architecture

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self):
        return torch.device("cpu")


def _resources(cubin: bytes) -> tuple[int, int]:
    """(registers per thread, spill bytes: stack + local) of the one function in a cubin, from cuobjdump."""
    import triton.backends.nvidia as nvidia

    tool = os.path.join(os.path.dirname(nvidia.__file__), "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout

    def field(name):
        m = re.search(rf"\b{name}:(\d+)", text)
        return int(m.group(1)) if m else 0

    return field("REG"), field("STACK") + field("LOCAL")


class Recorder:
    """Stands in for `launcher(kernel)[grid](*args, **kwargs)`: compiles, records, raises OutOfResources when
    the compiled kernel needs more shared memory than the target has."""

    def __init__(self, arch: int):
        self.arch = arch
        self.case = ""
        self.rows: list[Compiled] = []

    def __call__(self, kernel):
        recorder = self

        class Grid:
            def __getitem__(self, grid):
                return lambda *args, **kwargs: recorder.compile(kernel, grid, args, kwargs)

        return Grid()

    def compile(self, kernel, grid, args, kwargs):
        from triton.runtime.errors import OutOfResources

        compiled = kernel.warmup(*args, grid=grid, **kwargs)
        shared = int(compiled.metadata.shared)
        registers, spills = _resources(compiled.asm["cubin"])
        fits = shared <= SHARED_LIMIT[self.arch]  # registers never fail a launch: ptxas spills instead
        shown = ("BT", "BK", "BV", "BB", "num_warps", "num_stages")
        constants = " ".join(f"{k}={kwargs[k]}" for k in shown if k in kwargs)
        row = Compiled(kernel.fn.__name__, self.case, constants, compiled.hash, shared, registers, spills, fits)
        self.rows.append(row)
        if not fits:
            raise OutOfResources(shared, SHARED_LIMIT[self.arch], "shared memory")


def _tensors(dtype, dk, dv, N=100):
    B, H = 1, 2
    q = torch.randn(B, N, H, dk, dtype=dtype).transpose(1, 2)  # strided, as from a projection
    k = torch.randn(B, H, N, dk, dtype=dtype)
    v = torch.randn(B, H, N, dv, dtype=dtype)
    return q, k, v, torch.full((H,), -0.01), torch.randn(B, H, dk, dv)


def _chunked(dtype, dk, dv, precision, N=100, per_token=False):
    from ..methods.triton import chunked_bwd, chunked_fwd

    q, k, v, ld, s0 = _tensors(dtype, dk, dv, N)
    if per_token:  # (B, H, N) log decays: the kernels' PER_TOKEN mode
        ld = ld[None, :, None].expand(q.shape[0], -1, N).contiguous()
    o, _ = chunked_fwd.forward(q, k, v, ld, s0, 1.0, True, 64, precision)
    chunked_bwd.backward(q, k, v, ld, s0, s0, torch.randn_like(o), s0, 1.0, precision)


def _chunked_varlen(dtype, dk, dv, N=100):
    from ..methods.triton import chunked_bwd, chunked_fwd

    q, k, v, ld, _ = _tensors(dtype, dk, dv, N)
    cu = torch.tensor([0, N // 3, N])
    s0 = torch.randn(2, q.shape[1], dk, dv)
    o, _ = chunked_fwd.forward(q, k, v, ld, s0, 1.0, True, 64, "accurate", cu)
    chunked_bwd.backward(q, k, v, ld, s0, s0, torch.randn_like(o), s0, 1.0, "accurate", cu)


def _recurrent(dtype, dk, dv, N=100):
    from ..methods.triton import recurrent

    q, k, v, ld, s0 = _tensors(dtype, dk, dv, N)
    recurrent.forward(q, k, v, ld, s0, 1.0, True)
    recurrent.decode(q[:, :, 0], k[:, :, 0], v[:, :, 0], s0, ld, 1.0, s0)


def _fleet(dtype, dk, dv, N=100):
    from ..methods.triton import fleet

    q, k, v, ld, s0 = _tensors(dtype, dk, dv, N)
    fleet.forward(q, k, v, ld, s0, 1.0, True)


def cases(quick: bool):
    """(label, function, arguments): each function makes one method's host calls on small CPU tensors."""
    f32, f16, bf16 = torch.float32, torch.float16, torch.bfloat16
    dims = ((64, 64), (128, 128), (96, 100), (60, 128), (192, 192), (256, 256))
    if quick:  # with each precision mode of the kernels once: WIDE (fp32, ieee), LOW, SPLIT_BF16, SPLIT_TF32
        shapes = [
            (f32, 128, 128, ("accurate",)),
            (bf16, 128, 128, ("accurate", "fast")),
            (f16, 96, 100, ("accurate", "ieee")),
        ]
    else:
        shapes = [
            (dtype, dk, dv, ("accurate", "fast", "ieee") if (dk, dv) == (128, 128) else ("accurate",))
            for dtype in (f32, f16, bf16)
            for dk, dv in dims
        ]
    out = []
    for dtype, dk, dv, precisions in shapes:
        name = f"{dtype_name(dtype)} {dk}x{dv}"
        out += [(f"chunked {name} {p}", _chunked, (dtype, dk, dv, p)) for p in precisions]
        out += [(f"recurrent+decode {name}", _recurrent, (dtype, dk, dv)), (f"fleet {name}", _fleet, (dtype, dk, dv))]
    out.append(("chunked varlen bfloat16 128x128", _chunked_varlen, (bf16, 128, 128)))
    out.append(("chunked per-token float32 128x128", _chunked, (f32, 128, 128, "accurate", 100, True)))  # bf16: below
    for n in (100, 1024, 1):  # N % 16 == 0 and N == 1 are what Triton would specialise on: no new binary
        out += [(f"{LENGTHS} N={n} chunked", _chunked, (bf16, 128, 128, "accurate", n))]
        out += [(f"{LENGTHS} N={n} varlen", _chunked_varlen, (bf16, 128, 128, n))]
        out += [(f"{LENGTHS} N={n} per-token", _chunked, (bf16, 128, 128, "accurate", n, True))]
        out += [(f"{LENGTHS} N={n} recurrent", _recurrent, (bf16, 128, 128, n))]
        out += [(f"{LENGTHS} N={n} fleet", _fleet, (bf16, 128, 128, n))]
    return out


LENGTHS = "length"


def recompiled(rows: list[Compiled]) -> list[str]:
    """Kernels (with their constants) that got a second binary for another sequence length."""
    binaries: dict[tuple[str, str, str], set[str]] = {}
    for r in rows:
        if r.case.startswith(LENGTHS):
            binaries.setdefault((r.kernel, r.constants, r.case.split()[-1]), set()).add(r.binary)
    return [f"{k[0]} ({k[2]}, {k[1]}): {len(b)} binaries" for k, b in binaries.items() if len(b) > 1]


def run(arch: int, quick: bool) -> tuple[list[Compiled], list[str]]:
    """Compile every case for `arch`: (every compiled launch, the failures as messages)."""
    from triton.runtime import driver

    from ..methods.triton import launching

    recorder = Recorder(arch)
    failures = []
    previous = getattr(driver, "_active", None)  # None where this machine has no GPU driver
    driver.set_active(_Target(arch))
    launching.COMPILE_ONLY = recorder
    launching._WORKING_VARIANT.clear()
    try:
        for label, case, arguments in cases(quick):
            recorder.case = label
            try:
                case(*arguments)
            except Exception as e:  # a compile error, or no variant fits: report it and go on
                first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                failures.append(f"sm_{arch} {label}: {type(e).__name__}: {first}")
        failures += [f"sm_{arch} recompiled for a new sequence length: {m}" for m in recompiled(recorder.rows)]
    finally:
        launching.COMPILE_ONLY = None
        launching._WORKING_VARIANT.clear()
        driver.set_active(previous)
    return recorder.rows, failures


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90, 80], choices=sorted(SHARED_LIMIT))
    quick = "fp32 and bf16 at 128x128, fp16 at 96x100; every precision mode once"
    parser.add_argument("--quick", action="store_true", help=quick)
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "") == "1":
        print("compile_check: unset TRITON_INTERPRET (the kernels must be compiled, not interpreted)")
        return 2
    status = 0
    for arch in args.arch:
        rows, failures = run(arch, args.quick)
        print(f"## sm_{arch}: shared memory limit {SHARED_LIMIT[arch] // 1024} KiB")
        print(f"{'case':34} {'kernel':24} {'constants':44} {'smem KiB':>8} {'regs':>5} {'spill':>6}  fits")
        for r in rows:
            print(
                f"{r.case:34} {r.kernel:24} {r.constants:44} {r.shared / 1024:8.1f} {r.registers:5d} "
                f"{r.spill_bytes:6d}  {'yes' if r.fits else 'NO -> next variant'}"
            )
        for f in failures:
            print("FAILED", f)
        status |= bool(failures)
    return int(status)


if __name__ == "__main__":
    sys.exit(main())
