"""Sequence parallel against one process at the same total N: per-rank time, peak memory, bytes communicated.

    torchrun --nproc_per_node 2 -m benchmarks.sequence_parallel                   # N = 16K, 64K, 256K (gloo, CPU)
    torchrun --nproc_per_node 2 -m benchmarks.sequence_parallel --tokens 2048,8192  # small N
    torchrun --nproc_per_node 2 -m benchmarks.sequence_parallel --grad 0          # forward only

With CUDA the ranks use nccl, one GPU each (LOCAL_RANK); otherwise gloo on CPU threads. Each rank builds the same
seeded problem and runs its contiguous slice (N / P tokens) through `leetdecoding.distributed.attention`; the first
rank also runs `leetdecoding.attention` on the whole sequence, with the threads of one rank (one device against P
devices), while the others wait. The check compares the first rank's outputs and the final state (which depends on
every rank's slice) with the single-process call; no speed-up is reported when it fails. "bytes" are the sizes of
the tensors the collectives move per call (all-gather results, all-reduced tensors), counted by wrapping
torch.distributed: they depend on P, B, H and D, not on N. On a CPU machine with fewer cores than ranks x threads
the ranks share the cores and the speed-up is bounded by them.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch
import torch.distributed as dist

import leetdecoding as ld
import leetdecoding.distributed as ldd
from leetdecoding.bench.memory import measure_peak
from leetdecoding.bench.timing import time_call

from .common import arguments, header

CHECK = {torch.float32: 1e-4}  # relative to the largest reference value: fp32 sums in another order


@contextmanager
def counting_bytes():
    """Count the bytes of the tensors that all_gather fills and all_reduce reduces while inside."""
    counted = {"bytes": 0}
    gather, reduce = dist.all_gather, dist.all_reduce

    def all_gather(outputs, tensor, *args, **kwargs):
        counted["bytes"] += sum(t.numel() * t.element_size() for t in outputs)
        return gather(outputs, tensor, *args, **kwargs)

    def all_reduce(tensor, *args, **kwargs):
        counted["bytes"] += tensor.numel() * tensor.element_size()
        return reduce(tensor, *args, **kwargs)

    dist.all_gather, dist.all_reduce = all_gather, all_reduce
    try:
        yield counted
    finally:
        dist.all_gather, dist.all_reduce = gather, reduce


def call(fn, q, k, v, grad: bool, **kw):
    """One call, forward (and backward from a ones cotangent with `grad`); returns (o, final state)."""
    inputs = [t.detach().requires_grad_(bool(grad)) for t in (q, k, v)]
    o, state = fn(*inputs, decay=0.999, output_final_state=True, **kw)
    if grad:
        (o.sum() + state.sum()).backward()
    return o.detach(), state.detach()


def one_size(n: int, a, device, rank: int, world: int) -> dict:
    g = torch.Generator().manual_seed(n)
    q, k, v = (torch.randn(a.batch, a.heads, n, a.dim, generator=g).to(device) / a.dim**0.5 for _ in range(3))
    lo, hi = rank * n // world, (rank + 1) * n // world
    mine = [t[:, :, lo:hi] for t in (q, k, v)]
    row = {"n": n}
    if rank == 0:  # with the threads of one rank: one process on one device against P on P devices
        row["single_s"] = time_call(lambda: call(ld.attention, q, k, v, a.grad), a.rounds, 1, device).median
        (o_ref, s_ref), row["single_bytes"] = measure_peak(lambda: call(ld.attention, q, k, v, a.grad), device)
    dist.barrier()

    def parallel():
        return call(ldd.attention, *mine, a.grad)

    def aligned():  # the ranks start together, so that no rank's time includes waiting for a late one
        dist.barrier()
        return parallel()

    row["rank_s"] = time_call(aligned, a.rounds, 1, device).median
    (o, s), row["rank_bytes"] = measure_peak(aligned, device)
    with counting_bytes() as counted:
        parallel()
    row["comm_bytes"] = counted["bytes"]
    if rank == 0:
        err = max((o - o_ref[:, :, lo:hi]).abs().max().item(), (s - s_ref).abs().max().item())
        row["error"] = err / max(o_ref.abs().max().item(), s_ref.abs().max().item())
    return row


def report(rows: list[dict], world: int) -> None:
    """One line per N: the first rank's row, the slowest rank's time, the largest rank's memory."""
    first = rows[0]
    slowest = max(r["rank_s"] for r in rows)
    mib = [r["rank_bytes"] / 2**20 if r["rank_bytes"] is not None else float("nan") for r in rows]
    single_mib = first["single_bytes"] / 2**20 if first["single_bytes"] is not None else float("nan")
    ok = first["error"] <= CHECK[torch.float32]
    speedup = f"{first['single_s'] / slowest:5.2f}x" if ok else " (check failed)"
    print(
        f"{first['n']:>8} {first['single_s'] * 1e3:10.1f} {slowest * 1e3:10.1f} {speedup:>8} {single_mib:10.1f} "
        f"{max(mib):10.1f} {first['comm_bytes']:>10} {first['error']:9.1e}"
    )


def main() -> None:
    p = arguments(__doc__, tokens="16384,65536,262144", heads=8, dim=64, batch=1, rounds=3, grad=1)
    a = p.parse_args()
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if rank == 0:
        what = "forward + backward" if a.grad else "forward"
        header(f"sequence parallel, P={world} ({dist.get_backend()}), B={a.batch} H={a.heads} D={a.dim} fp32, {what}",
               "cuda" if cuda else "cpu")  # fmt: skip
        print(f"{'N':>8} {'1 proc ms':>10} {'rank ms':>10} {'speedup':>8} {'1 proc MiB':>10} {'rank MiB':>10} "
              f"{'comm B':>10} {'rel err':>9}")  # fmt: skip
    for n in (int(x) for x in a.tokens.split(",")):
        rows = [None] * world
        dist.all_gather_object(rows, one_size(n, a, device, rank, world))
        if rank == 0:
            report(rows, world)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
