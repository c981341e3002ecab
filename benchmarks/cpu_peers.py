"""Prefill against the peers on CPU, interleaved, every output checked against fp64 before it is timed.

    python -m benchmarks.cpu_peers                       # N = 4096, 16384; B = 1; D = 128; fp32 and bf16
    python -m benchmarks.cpu_peers --full                # N in {4096, 16384, 65536}, B in {1, 4}, D in {64, 128, 256}
    python -m benchmarks.cpu_peers --error-by-position   # bf16, N = 65536: the error per block of 4096 positions
    git worktree add /tmp/before 4a2703e && python -m benchmarks.cpu_peers --baseline /tmp/before   # before/after

Timed: leetdecoding.attention (auto), LeetDecoding 0.0.3's block-based and lightningAttention2_torch, transformers'
MiniMax prefill loop and fla's naive_chunk_simple_gla (benchmarks/peers.py loads them), H = 8, MiniMax decays
(layer 0 of 12), scale 1, each peer given the inputs in its own layout and dtype, prepared outside the timed call.
The error is leetdecoding.methods.naive's measure (max |o - o_ref| / the magnitude of the summed terms), against
the fp64 sums of leetdecoding.bench.sweep.fp64_sums computed one (batch row, head) at a time; an output
outside TOLERANCE for its input dtype is reported WRONG and not timed. The checking call is each callable's warm-up.
Useful GFLOP/s = 4 B H N Dk Dv / median time, as a fraction of the same run's torch.mm peak in that dtype.
`measure(...)` returns the rows (dicts) that `main` prints.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch

import leetdecoding as ld
from benchmarks import peers as peer_loaders
from benchmarks.common import feed, header, interleaved, minimax_core, minimax_log_decay
from benchmarks.decay_cache import load_baseline
from leetdecoding.bench.sweep import fp64_sums
from leetdecoding.bench.timing import time_call
from leetdecoding.methods.naive import TOLERANCE

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PEERS = ("leetdecoding-0.0.3", "minimax", "fla")
BLOCK = 4096  # positions per block of the error by position
GB = 2.0**30


@dataclass
class Entry:
    name: str
    short: str  # a column title
    peer: bool
    held_bytes: int  # its inputs in its own layout, held while the others are timed
    peak_bytes: int  # what one call allocates, output included
    prepare: Callable[[], Callable[[], torch.Tensor]]  # allocates its inputs; returns the timed call
    to_bhnd: Callable[[torch.Tensor], torch.Tensor] = lambda o: o  # its output as (B, H, N, Dv)


_loaded: dict[str, object] = {}


def _load(loader):
    """A loader's result, or the PeerUnavailable it raised; tried once per process."""
    if loader.__name__ not in _loaded:
        try:
            _loaded[loader.__name__] = loader()
        except peer_loaders.PeerUnavailable as err:
            _loaded[loader.__name__] = err
    result = _loaded[loader.__name__]
    if isinstance(result, Exception):
        raise result
    return result


def _peer(key: str, peers, loader, label: str, skipped: dict[str, str]):
    """The loader's result when `key` is among the peers asked for; None when it is not, or when it cannot be
    loaded (the reason then recorded as `skipped[label]`)."""
    if key not in peers:
        return None
    try:
        return _load(loader)
    except peer_loaders.PeerUnavailable as err:
        skipped[label] = str(err)
        return None


def entries(q, k, v, log_decay, peers, layer=0, baseline=None) -> tuple[list[Entry], dict[str, str]]:
    """The callables for these inputs, and the reason for each peer that cannot be loaded. `baseline`: another
    checkout's leetdecoding package (benchmarks.decay_cache.load_baseline), timed beside ours, not as a peer."""
    b, h, n, d = q.shape
    e, s = q.numel(), q.element_size()
    plan = ld.explain(q, k, v, log_decay=log_decay)
    ours = partial(ld.attention, q, k, v, log_decay=log_decay)
    peak = max(plan.estimate_bytes, 2 * e * 4)  # the plan's estimate was below the measured peak in bf16
    out = [Entry(f"leetdecoding auto ({plan.method})", "ours", False, 0, peak, lambda: ours)]
    if baseline is not None:
        theirs = partial(baseline.attention, q, k, v, log_decay=log_decay)
        out.append(Entry("leetdecoding before (--baseline, auto)", "before", False, 0, 4 * peak, lambda: theirs))
    skipped = {}
    fns = _peer("leetdecoding-0.0.3", peers, peer_loaders.leetdecoding_003, "LeetDecoding 0.0.3", skipped)
    if fns is not None:
        # lambda = exp(-gamma). block-based multiplies gamma's weights into its bf16 products: gamma in q's dtype;
        # lightningAttention2_torch converts gamma to fp32 itself.
        for name, short, gamma in (
            ("block-based", "block-based", -log_decay.to(q.dtype)),
            ("lightningAttention2_torch", "lightning2", -log_decay),
        ):
            call = partial(fns[name], q, k, v, gamma)
            out.append(Entry(f"LeetDecoding 0.0.3 {name}", short, True, 0, 2 * e * s, lambda call=call: call))

    def minimax():
        module = minimax_core(h, d, layer).to(q.dtype)  # a bf16 model's module: its decay buffers and state in bf16
        hidden = feed(module, q, k, v)
        return lambda: module(hidden, None, None)[0]

    def unpack(o):  # MiniMax's (B, N, H * D) output as (B, H, N, D)
        return o.reshape(b, n, h, d).transpose(1, 2)

    if "minimax" in peers:
        out.append(Entry("transformers MiniMax prefill loop", "minimax", True, 4 * e * s, 5 * e * s, minimax, unpack))
    naive = _peer("fla", peers, peer_loaders.fla_naive_chunk, "fla naive_chunk_simple_gla", skipped)
    if naive is not None:

        def fla():
            qf, kf, vf = (t.transpose(1, 2).contiguous() for t in (q, k, v))  # fla's (B, T, H, D)
            g = log_decay.expand(b, n, h).contiguous()  # the per-token log decay, (B, T, H), fp32
            return lambda: naive(qf, kf, vf, g, scale=1.0)[0]

        work = 5 * e * 4 + 3 * b * h * n * 64 * 4  # fp32 copies, output, (B, H, N, 64) decay masks
        out.append(Entry("fla naive_chunk_simple_gla", "fla", True, 3 * e * s, work, fla, lambda o: o.transpose(1, 2)))
    return out, skipped


def fp64_reference(q, k, v, log_decay, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """o and o_abs (the same sums on |q|, |k|, |v|) in fp64, stored in `dtype`, one (batch row, head) at a time."""
    o = torch.empty(q.shape[:-1] + v.shape[-1:], dtype=dtype)
    o_abs = torch.empty_like(o)
    for i in range(q.shape[0]):
        for j in range(q.shape[1]):
            sums = fp64_sums(*(t[i : i + 1, j : j + 1] for t in (q, k, v)), log_decay[j : j + 1])
            o[i, j], o_abs[i, j] = (t[0, 0] for t in sums)
    return o, o_abs


def error_by_position(got, o, o_abs) -> torch.Tensor:
    """(N,) fp64: max over batch rows, heads and features of |got - o| / o_abs; inf for a wrong shape or NaN."""
    if got.shape != o.shape:
        return torch.full(o.shape[2:3], float("inf"), dtype=torch.float64)
    worst = torch.zeros(o.shape[2], dtype=torch.float64)
    for i in range(o.shape[0]):
        for j in range(o.shape[1]):
            err = (got[i, j].double() - o[i, j]).abs() / (o_abs[i, j].double() + 1e-300)
            worst = torch.maximum(worst, torch.nan_to_num(err, nan=float("inf")).amax(-1))
    return worst


def gemm_peaks(n: int = 2048) -> dict[str, float]:
    """torch.mm GFLOP/s on an n x n product, per dtype name, measured now."""
    peaks = {}
    for name, dtype in DTYPES.items():
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        stats = time_call(lambda a=a, b=b: torch.mm(a, b), repeats=5, warmup=1, device="cpu")
        peaks[name] = 2.0 * n**3 / stats.median / 1e9
    return peaks


@torch.no_grad()
def run_case(
    b, h, n, d, dtype_name, peers=PEERS, rounds=5, budget=16 * GB, peak=None, layer=0, baseline=None
) -> list[dict]:
    """One shape and dtype: a row per callable (checked, then timed interleaved) and per peer that cannot run."""
    dtype = DTYPES[dtype_name]
    case = {"b": b, "h": h, "n": n, "d": d, "dtype": dtype_name, "gemm_peak": peak}
    torch.manual_seed(0)
    q, k, v = (torch.randn(b, h, n, d, dtype=dtype) for _ in range(3))
    log_decay = minimax_log_decay(minimax_core(h, d, layer))
    found, skipped = entries(q, k, v, log_decay, peers, layer, baseline)
    rows = [
        {**case, "name": name, "short": name, "peer": True, "status": f"skipped: {why}"}
        for name, why in skipped.items()
    ]
    e = q.numel()
    held = 3 * e * q.element_size()
    ref_dtype = torch.float64 if held + 16 * e + max(x.peak_bytes for x in found) <= budget else torch.float32
    ref_bytes = 2 * e * torch.finfo(ref_dtype).bits // 8
    if held + ref_bytes > budget:
        why = f"skipped: the reference needs {(held + ref_bytes) / GB:.2f} GB, over the budget of {budget / GB:.2f} GB"
        return rows + [{**case, "name": x.name, "short": x.short, "peer": x.peer, "status": why} for x in found]
    o_ref, o_abs = fp64_reference(q, k, v, log_decay, ref_dtype)
    calls = {}
    for x in found:
        row = {**case, "name": x.name, "short": x.short, "peer": x.peer, "tolerance": TOLERANCE[dtype]}
        rows.append(row)
        need = held + x.held_bytes + x.peak_bytes + ref_bytes
        if need > budget:
            row["status"] = f"skipped: needs about {need / GB:.2f} GB, over the budget of {budget / GB:.2f} GB"
            continue
        try:
            call = x.prepare()
            err = error_by_position(x.to_bhnd(call()), o_ref, o_abs)
        except Exception as exc:  # a peer that fails on these inputs is reported, not fatal
            row["status"] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
            continue
        row["error"] = err.max().item()
        row["error_by_block"] = [blk.max().item() for blk in err.split(BLOCK)]
        row["status"] = "ok" if row["error"] <= row["tolerance"] else "WRONG"
        if row["status"] == "ok":
            calls[x.name] = call
            held += x.held_bytes
        call = None  # a wrong callable's inputs are not held while the others are timed
    del o_ref, o_abs
    stats = interleaved(calls, rounds=rounds, warmup=0) if calls and rounds > 0 else {}
    useful = 4.0 * b * h * n * d * d
    for row in rows:
        if row["name"] in stats:
            s = stats[row["name"]]
            row.update(ms=s.median * 1e3, min_ms=s.min * 1e3, max_ms=s.max * 1e3, gflops=useful / s.median / 1e9)
            if peak:
                row["of_peak"] = row["gflops"] / peak
    timed_peers = [r for r in rows if r["peer"] and "ms" in r]
    ours = next(r for r in rows if not r["peer"])
    if timed_peers and "ms" in ours:
        fastest = min(timed_peers, key=lambda r: r["ms"])
        ours.update(fastest_peer=fastest["name"], speedup=fastest["ms"] / ours["ms"])
    return rows


def measure(
    ns, batches, dims, dtypes, heads=8, peers=PEERS, rounds=5, budget=16 * GB, layer=0, echo=None, baseline=None
) -> list[dict]:
    """The torch.mm peak rows, then run_case's rows for every case of the grid (each passed to `echo` as it ends)."""
    peaks = gemm_peaks()
    rows = [{"name": "torch.mm 2048 peak", "dtype": name, "gflops": g} for name, g in peaks.items()]
    for dtype_name in dtypes:
        for d in dims:
            for b in batches:
                for n in ns:
                    case = run_case(
                        b, heads, n, d, dtype_name, peers, rounds, budget, peaks[dtype_name], layer, baseline
                    )
                    if echo:
                        echo(case)
                    rows += case
    return rows


# issue 11's prefill targets: fp32 at D = 128 and N >= 4096 at least half the same run's fp32 matmul peak in
# useful GFLOP/s and 1.6x the fastest peer; bf16 at least 2x the fastest peer
PEAK_TARGET = 0.5
SPEEDUP_TARGET = {"fp32": 1.6, "bf16": 2.0}


def targets(ours: dict) -> list[tuple[str, str, bool]]:
    """(figure, target, met) for our row of a case, where the issue sets a target for it."""
    out = []
    if ours["dtype"] == "fp32" and ours["d"] == 128 and ours["n"] >= 4096 and "of_peak" in ours:
        out.append((f"{ours['of_peak']:.0%} of the fp32 peak", f">= {PEAK_TARGET:.0%}", ours["of_peak"] >= PEAK_TARGET))
    if "speedup" in ours and ours["dtype"] in SPEEDUP_TARGET:
        goal = SPEEDUP_TARGET[ours["dtype"]]
        out.append((f"{ours['speedup']:.2f}x the fastest peer", f">= {goal}x", ours["speedup"] >= goal))
    return out


def print_case(rows: list[dict], by_position: bool = False) -> None:
    r0 = rows[0]
    peak = f", torch.mm {r0['gemm_peak']:.0f} GFLOP/s" if r0.get("gemm_peak") else ""
    print(f"\n## B={r0['b']} H={r0['h']} N={r0['n']} D={r0['d']} {r0['dtype']}{peak}")
    print(f"{'':46s} {'median ms':>9s} {'min..max ms':>17s} {'GFLOP/s':>8s} {'of peak':>7s} {'err/fp64':>9s}")
    for r in rows:
        err = f"{r['error']:9.1e}" if "error" in r else " " * 9
        if "ms" in r:
            t = f"{r['ms']:9.1f} {r['min_ms']:8.1f}..{r['max_ms']:<8.1f} {r['gflops']:8.1f} {r.get('of_peak', 0):7.1%}"
            print(f"{r['name']:46s} {t} {err}")
        else:
            print(f"{r['name']:46s} {r['status']:>44s} {err}" if "error" in r else f"{r['name']:46s} {r['status']}")
    ours = next(r for r in rows if not r["peer"])
    if "speedup" in ours:
        print(f"speed-up of leetdecoding over the fastest peer ({ours['fastest_peer']}): {ours['speedup']:.2f}x")
    for figure, target, met in targets(ours):
        print(f"  target: {figure} {target}: {'met' if met else 'NOT MET'}")
    checked = [r for r in rows if "error_by_block" in r]
    if by_position and checked:
        print(f"max relative error per block of {BLOCK} positions (tolerance {checked[0]['tolerance']:.0e}):")
        print(f"{'positions':>13s} " + " ".join(f"{r['short']:>11s}" for r in checked))
        for i in range(len(checked[0]["error_by_block"])):
            errs = " ".join(f"{r['error_by_block'][i]:11.2e}" for r in checked)
            print(f"{i * BLOCK:>6d}..{min((i + 1) * BLOCK, r0['n']) - 1:<6d} {errs}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, nargs="+")
    p.add_argument("--batch", type=int, nargs="+")
    p.add_argument("--dim", type=int, nargs="+")
    p.add_argument("--dtype", nargs="+", choices=list(DTYPES))
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--rounds", type=int, default=5, help="timed calls per callable (0: check only)")
    p.add_argument("--peers", nargs="+", choices=PEERS, default=list(PEERS))
    p.add_argument("--full", action="store_true", help="the whole grid (about an hour or more on 2 cores)")
    p.add_argument("--error-by-position", action="store_true", help=f"print the error per {BLOCK} positions")
    p.add_argument("--layer", type=int, default=0, help="MiniMax layer of 12 whose decays are used (11: the slowest)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument("--mem-gb", type=float, help="memory budget (default: 80%% of MemAvailable)")
    p.add_argument("--baseline", help="a checkout of another commit, timed beside this one (e.g. a git worktree)")
    a = p.parse_args(argv)
    grid = {"n": [4096, 16384, 65536], "batch": [1, 4], "dim": [64, 128, 256], "dtype": list(DTYPES)}
    if not a.full:
        grid = {"n": [4096, 16384], "batch": [1], "dim": [128], "dtype": list(DTYPES)}
        if a.error_by_position:
            grid.update(n=[65536], dtype=["bf16"])
    ns, batches, dims, dtypes = (getattr(a, key) or grid[key] for key in ("n", "batch", "dim", "dtype"))
    if a.threads:
        torch.set_num_threads(a.threads)
    budget = a.mem_gb * GB if a.mem_gb else 0.8 * _mem_available()
    header(f"prefill against the peers, H={a.heads}, MiniMax decays (layer {a.layer} of 12), scale 1")
    print(f"# memory budget {budget / GB:.1f} GB; peers: {', '.join(a.peers)}")
    echo = lambda case: print_case(case, a.error_by_position)  # noqa: E731
    baseline = load_baseline(a.baseline) if a.baseline else None
    rows = measure(ns, batches, dims, dtypes, a.heads, a.peers, a.rounds, budget, a.layer, echo, baseline)
    print("\n" + "; ".join(f"{r['name']} {r['dtype']}: {r['gflops']:.0f} GFLOP/s" for r in rows if "b" not in r))


def _mem_available() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024.0
    return 16 * GB


if __name__ == "__main__":
    main()
