"""leetdecoding.distributed.attention on 2 and 4 gloo processes against leetdecoding.attention in one process.

One spawn per world size runs every case: each process builds the same seeded problem (the whole sequence), runs
its slice through the distributed call and the whole sequence through the single-process call, and compares the
outputs of its slice, the final state and the gradients of q, k, v, the initial state and the decay. Failures come
back through a queue; a desynchronised collective fails after the group's timeout instead of hanging.

The objective is the sum of the ranks' losses: rank r's loss is its outputs' and the final state's, each weighed by
its own random cotangent (dS_r), so the single-process reference weighs the final state by the sum of the dS_r.
"""

from __future__ import annotations

import socket
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import leetdecoding as ld
import leetdecoding.distributed as ldd
from leetdecoding.methods.naive import TOLERANCE

H, DK, DV, N = 2, 4, 3, 12
DECAYS = [1.0, 0.97, 1e-3, "per-token"]
SPLITS = {
    2: [[6, 6], [9, 3], [0, 12], [12, 0], [1, 11], [11, 1]],
    4: [[3, 3, 3, 3], [5, 0, 6, 1], [1, 1, 1, 9], [0, 12, 0, 0], [0, 0, 0, 12]],
}
# packed: an empty sequence, sequences crossing one or more rank boundaries, a start on a boundary
OFFSETS = [0, 2, 7, 7, 12]
PACKED_SPLITS = {2: [[6, 6], [7, 5], [0, 12], [1, 11]], 4: [[3, 3, 3, 3], [1, 1, 1, 9], [2, 0, 5, 5]]}


def _limit(dtype: torch.dtype, reference: torch.Tensor) -> float:
    """fp64: 1e-12 of the reference's largest value (at least 1); other dtypes: their tolerance of it."""
    bound = max(1.0, reference.abs().max().item()) if reference.numel() else 1.0
    return (1e-12 if dtype == torch.float64 else TOLERANCE[dtype]) * bound


class Problem:
    """The whole-sequence problem, in fp64, from a seed: the same on every rank."""

    def __init__(self, seed: int, world: int, decay, offsets: list[int] | None):
        g = torch.Generator().manual_seed(seed)
        batch = 1 if offsets is not None else 2
        rows = len(offsets) - 1 if offsets is not None else batch

        def make(*shape):
            return torch.randn(*shape, generator=g, dtype=torch.float64)

        self.q, self.k, self.v = make(batch, H, N, DK), make(batch, H, N, DK), make(batch, H, N, DV)
        self.initial_state = make(rows, H, DK, DV)
        self.do, self.d_state = make(batch, H, N, DV), make(world, rows, H, DK, DV)
        if decay == "per-token":
            self.decay = -3 * torch.rand(batch, H, N, generator=g, dtype=torch.float64)
        else:
            self.decay = torch.full((H,), decay, dtype=torch.float64)
        self.per_token = decay == "per-token"
        self.cu = torch.tensor(offsets) if offsets is not None else None

    def leaves(self, dtype):
        return [
            t.to(dtype, copy=True).requires_grad_() for t in (self.q, self.k, self.v, self.initial_state, self.decay)
        ]

    def decay_args(self, decay: torch.Tensor, a: int, b: int) -> dict:
        return {"log_decay": decay[:, :, a:b]} if self.per_token else {"decay": decay}


def _reference(p: Problem):
    """Single process, fp64: (o, final state, gradients of q, k, v, initial state, decay)."""
    q, k, v, s0, decay = p.leaves(torch.float64)
    o, state = ld.attention(
        q, k, v, **p.decay_args(decay, 0, N), initial_state=s0, output_final_state=True, cu_seqlens=p.cu
    )
    ((o * p.do).sum() + (state * p.d_state.sum(0)).sum()).backward()
    return o.detach(), state.detach(), [t.grad for t in (q, k, v, s0, decay)]


def _check(name, rank, world, lengths, decay, dtype, offsets=None, seed=0, group=None, reduce=False) -> list[str]:
    """The distributed call on this rank's slice against the single-process reference; the failures."""
    p = Problem(seed, world, decay, offsets)
    o_ref, state_ref, grads_ref = _reference(p)
    a = sum(lengths[:rank])
    b = a + lengths[rank]
    q, k, v, s0, dec = p.leaves(dtype)
    o, state = ldd.attention(
        q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], **p.decay_args(dec, a, b), initial_state=s0,
        output_final_state=True, cu_seqlens=p.cu, group=group, reduce_decay_grad=reduce,
    )  # fmt: skip
    ((o * p.do[:, :, a:b].to(dtype)).sum() + (state * p.d_state[rank].to(dtype)).sum()).backward()
    grads = [t.grad if t.grad is not None else torch.zeros_like(t) for t in (q, k, v, s0, dec)]
    replicated = [3] if reduce or p.per_token else [3, 4]  # partial sums: summed here as a user would
    for i in replicated:
        dist.all_reduce(grads[i], group=group.get_group() if hasattr(group, "get_group") else group)
    pairs = {"o": (o, o_ref[:, :, a:b]), "final state": (state, state_ref)}
    for label, got, want in zip(("dq", "dk", "dv", "d initial_state", "d decay"), grads, grads_ref):
        sliced = label in ("dq", "dk", "dv") or (label == "d decay" and p.per_token)
        pairs[label] = (got[:, :, a:b], want[:, :, a:b]) if sliced else (got, want)
    failures = []
    for label, (got, want) in pairs.items():
        err = (got.double() - want).abs().max().item() if want.numel() else 0.0
        if not err <= _limit(dtype, want):
            failures.append(f"{name}: {label} off by {err:.3g} (limit {_limit(dtype, want):.3g})")
    return failures


def _cases(world: int):
    """(name, keyword arguments of _check) for every case of this world size."""
    for split in SPLITS[world]:
        for decay in DECAYS:
            yield f"fp64 {split} {decay}", {"lengths": split, "decay": decay, "dtype": torch.float64}
    for split in SPLITS[world][:3]:
        for decay in DECAYS:
            yield f"fp32 {split} {decay}", {"lengths": split, "decay": decay, "dtype": torch.float32, "reduce": True}
    for split in PACKED_SPLITS[world]:
        for decay in (0.97, "per-token"):
            kw = {"lengths": split, "decay": decay, "dtype": torch.float64, "offsets": OFFSETS, "reduce": True}
            yield f"packed fp64 {split} {decay}", kw
    kw = {"lengths": PACKED_SPLITS[world][0], "decay": 0.97, "dtype": torch.float32, "offsets": OFFSETS}
    yield "packed fp32", kw


def _errors(rank: int, world: int) -> list[str]:
    """Ranks that disagree get a ValueError on every rank; a wrong initial_state names the argument."""
    failures = []
    heads = 2 if rank == 0 else 3
    q = torch.randn(1, heads, 2, 4)
    try:
        ldd.attention(q, q, q)
        failures.append("disagreeing H: no error")
    except ValueError as e:
        if "every rank must pass the same H; it differs between ranks" not in str(e):
            failures.append(f"disagreeing H: {e}")
    q = torch.randn(1, 2, 2, 4)
    for name, kw in (("decay", {"decay": 0.9 if rank == 0 else 0.5}), ("scale", {"scale": 1.0 + rank}),
                     ("cu_seqlens", {"cu_seqlens": torch.tensor([0, 1 + rank, 2 * world])})):  # fmt: skip
        try:
            ldd.attention(q[:1], q[:1], q[:1], **kw)
            failures.append(f"disagreeing {name}: no error")
        except ValueError as e:
            if f"every rank must pass the same {name}; it differs between ranks" not in str(e):
                failures.append(f"disagreeing {name}: {e}")
    try:
        ldd.attention(q, q, q, initial_state=torch.zeros(2, 2, 4, 4))
        failures.append("wrong initial_state shape: no error")
    except ValueError as e:
        if "initial_state" not in str(e):
            failures.append(f"wrong initial_state shape: {e}")
    return failures


def _layer(rank: int, world: int) -> list[str]:
    """DecayingLinearAttention(group=...) on each rank's slice: the outputs and, summed over the ranks, the
    parameters' gradients (the decay's included) of the layer on the whole sequence, in fp64."""
    from leetdecoding.nn import DecayingLinearAttention

    torch.manual_seed(3)
    layer = DecayingLinearAttention(16, 2, learnable_decay=True, dtype=torch.float64)
    x = torch.randn(2, N, 16, dtype=torch.float64)
    dy = torch.randn(2, N, 16, dtype=torch.float64)
    a, b = rank * N // world, (rank + 1) * N // world
    y = layer(x)
    (y * dy).sum().backward()
    want = [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    y_mine = layer(x[:, a:b], group=dist.group.WORLD)
    (y_mine * dy[:, a:b]).sum().backward()
    failures = []
    if not (y_mine - y[:, a:b]).abs().max().item() <= _limit(torch.float64, y):
        failures.append("layer: outputs differ")
    for (name, p), g in zip(layer.named_parameters(), want):
        dist.all_reduce(p.grad)
        if not (p.grad - g).abs().max().item() <= _limit(p.dtype, g):  # the layer keeps log_decay in fp32
            failures.append(f"layer: d {name} differs")
    return failures


def _mesh_cases(rank: int, world: int) -> list[str]:
    """A 2-D (data x sequence) DeviceMesh: each data-parallel replica runs its own problem over its sequence group;
    a 2-D mesh passed as the group is refused, naming the argument."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp", "sp"))
    sp = mesh["sp"]
    dp_index, sp_rank = mesh.get_coordinate()
    failures = _check("2-D mesh", sp_rank, 2, [4, 8], "per-token", torch.float64, seed=10 + dp_index, group=sp)
    try:
        ldd.attention(torch.zeros(1, 1, 1, 1), torch.zeros(1, 1, 1, 1), torch.zeros(1, 1, 1, 1), group=mesh)
        failures.append("2-D mesh as group: no error")
    except ValueError as e:
        if "group" not in str(e):
            failures.append(f"2-D mesh as group: {e}")
    return failures


def _worker(rank: int, world: int, port: int, queue) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timedelta(seconds=60)
    )
    torch.set_num_threads(1)
    failures = []
    try:
        for name, kw in _cases(world):
            failures += _check(name, rank, world, **kw)
        failures += _errors(rank, world)
        failures += _layer(rank, world)
        if world == 4:
            failures += _mesh_cases(rank, world)
    except Exception:  # a crash is a failure to report, not a hang of the other ranks' join
        failures.append(traceback.format_exc())
    finally:
        queue.put((rank, failures))
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("world", [2, 4])
def test_sequence_parallel_matches_one_process(world):
    queue = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_worker, args=(world, _free_port(), queue), nprocs=world, join=True)
    failures = [f"rank {rank}: {f}" for rank, fs in (queue.get() for _ in range(world)) for f in fs]
    assert not failures, "\n".join(failures[:20])


def test_needs_an_initialised_group():
    q = torch.zeros(1, 1, 2, 2)
    with pytest.raises(RuntimeError, match="init_process_group"):
        ldd.attention(q, q, q)
