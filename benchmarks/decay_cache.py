"""Cost of the exactness fixes (decay tables by value, the causality check, the exact decay gradient): this
checkout against a baseline checkout, in one run, interleaved.

    git worktree add /tmp/orig f4e4e0a          # the baseline: decay tables keyed on tensor identity + version
    python -m benchmarks.decay_cache --baseline /tmp/orig

Cases (fp32, CPU, B=1, H=8, D=128, one decay tensor reused call after call, as a model does):
`attention(method="vanilla")` at N=128 (what auto runs for short inputs), `attention(method="chunked")` at each
N, `decode_step` (a batch of calls per timing, per-call time shown), and chunked's forward + backward at
N=4096 with the decay learnable (--train-length). The baseline package is imported under
another name from its own files, so both run in this process and each round times both, alternating. Outputs
are compared before anything is timed.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import torch

import leetdecoding as ld
from benchmarks.common import header, interleaved

DECODE_CALLS = 200  # decode steps per timing: one step is tens of microseconds


def load_baseline(path: str):
    """The leetdecoding package under `path`/leetdecoding, imported as `leetdecoding_baseline`."""
    init = Path(path) / "leetdecoding" / "__init__.py"
    if not init.is_file():
        raise SystemExit(f"--baseline must be a checkout holding leetdecoding/__init__.py; got {path}")
    spec = importlib.util.spec_from_file_location("leetdecoding_baseline", init, submodule_search_locations=[
        str(init.parent)
    ])
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def attention_case(lib, q, k, v, log_decay, method):
    return lambda: lib.attention(q, k, v, log_decay=log_decay, method=method)


def train_case(lib, q, k, v, log_decay):
    leaves = [t.detach().requires_grad_() for t in (q, k, v, log_decay)]

    def run():
        o = lib.attention(*leaves[:3], log_decay=leaves[3], method="chunked")
        return torch.autograd.grad(o.square().sum(), leaves)

    return run


def decode_case(lib, q, k, v, state, log_decay):
    def run():
        for _ in range(DECODE_CALLS):
            lib.decode_step(q, k, v, state, log_decay=log_decay, out_state=state)

    return run


def check_same(name: str, a: torch.Tensor, b: torch.Tensor) -> None:
    err = ((a - b).abs().max() / b.abs().max()).item()
    if err > 1e-5:
        raise SystemExit(f"{name}: this checkout and the baseline differ by {err:.2e}: no time is reported")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--baseline", required=True, help="a checkout of the commit to compare with")
    p.add_argument("--lengths", default="256,16384", help="lengths of the chunked cases")
    p.add_argument("--vanilla-length", type=int, default=128, help="auto's quadratic form at short N")
    p.add_argument("--train-length", type=int, default=4096, help="chunked forward + backward, decay learnable")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--rounds", type=int, default=15)
    a = p.parse_args(argv)
    base = load_baseline(a.baseline)
    header(f"decay tables: this checkout ({Path(ld.__file__).parent.parent}) against {a.baseline}")
    torch.manual_seed(0)
    h, d = a.heads, a.dim
    log_decay = ld.decay.minimax(h, 3, 12)
    print(f"{'case':>28s} {'baseline ms':>12s} {'this ms':>10s} {'this/base':>10s}   (median, [min, max])")
    runs = [("vanilla", a.vanilla_length)] + [("chunked", int(x)) for x in a.lengths.split(",")]
    for method, n in runs:
        q, k, v = (torch.randn(1, h, n, d) for _ in range(3))
        libs = {"base": base, "this": ld}
        cases = {name: attention_case(lib, q, k, v, log_decay, method) for name, lib in libs.items()}
        check_same(f"{method} N={n}", cases["this"](), cases["base"]())
        rounds = a.rounds if n <= 4096 else max(3, a.rounds // 3)
        report(f"{method} N={n}", interleaved(cases, rounds), 1)
    q, k, v = (torch.randn(1, h, a.train_length, d) for _ in range(3))
    cases = {name: train_case(lib, q, k, v, log_decay) for name, lib in libs.items()}
    for name, this, other in zip(("dq", "dk", "dv"), cases["this"](), cases["base"]()):  # d log lambda: fixed
        check_same(f"forward + backward {name}", this, other)
    report(f"chunked fwd+bwd N={a.train_length}", interleaved(cases, max(3, a.rounds // 3)), 1)
    q, k, v = (torch.randn(1, h, d) for _ in range(3))
    state = torch.randn(1, h, d, d)
    check_same("decode_step", ld.decode_step(q, k, v, state, log_decay=log_decay)[0],
               base.decode_step(q, k, v, state, log_decay=log_decay)[0])
    states = {name: state.clone() for name in ("base", "this")}
    cases = {
        "base": decode_case(base, q, k, v, states["base"], log_decay),
        "this": decode_case(ld, q, k, v, states["this"], log_decay),
    }
    report(f"decode_step B=1 H={h} D={d}", interleaved(cases, a.rounds), DECODE_CALLS)


def report(name: str, stats: dict, calls: int) -> None:
    b, t = stats["base"], stats["this"]
    ms = 1e3 / calls

    def cell(s):
        return f"{s.median * ms:.4g} [{s.min * ms:.4g}, {s.max * ms:.4g}]"

    print(f"{name:>28s} {cell(b):>12s} {cell(t):>10s} {t.median / b.median:9.3f}x")


if __name__ == "__main__":
    main()
