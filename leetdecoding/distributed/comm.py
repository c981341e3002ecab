"""The collectives of sequence-parallel attention, each a small autograd function whose backward is the matching
collective, so that gradients cross ranks exactly.

Gradients follow the convention of data-parallel training: the objective is the sum of the ranks' losses, so the
gradient of a tensor every rank receives (a gathered state, a summed final state) is the sum over the ranks of the
gradients each rank's loss gives it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def resolve_group(group):
    """A ProcessGroup from `group`: a ProcessGroup, a 1-D DeviceMesh (its group) or None (the default group).

    Raises:
        RuntimeError: torch.distributed is not initialised (the message says how to start it).
        ValueError: a DeviceMesh of more than one dimension (the message says which sub-mesh to pass).
        TypeError: anything else.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "leetdecoding.distributed.attention needs torch.distributed: call torch.distributed.init_process_group "
            "first (torchrun sets the environment it reads), or use leetdecoding.attention in one process."
        )
    if group is None:
        return dist.group.WORLD
    if hasattr(group, "get_group") and hasattr(group, "ndim"):  # a DeviceMesh, without importing its module
        if group.ndim != 1:
            raise ValueError(
                f"group must be a ProcessGroup or a 1-D DeviceMesh (the sequence-parallel dimension); got a "
                f"{group.ndim}-D DeviceMesh with dims {group.mesh_dim_names}. Hint: pass mesh['<sequence dim>']."
            )
        return group.get_group()
    if isinstance(group, dist.ProcessGroup):
        return group
    raise TypeError(f"group must be a ProcessGroup, a 1-D DeviceMesh or None; got {type(group).__name__}.")


def gather_ints(values: list[int], group, device) -> list[list[int]]:
    """Every rank's `values` (the same count on every rank), in the group's rank order, on the host."""
    mine = torch.tensor(values, dtype=torch.int64, device=device)
    out = mine.new_empty(dist.get_world_size(group), len(values))
    dist.all_gather(list(out.unbind(0)), mine, group=group)
    return out.tolist()


def _summed(x: torch.Tensor, group) -> torch.Tensor:
    """A new tensor: the sum of x over the ranks."""
    out = x.contiguous().clone()
    dist.all_reduce(out, group=group)
    return out


class _AllGather(torch.autograd.Function):
    """(P, *x.shape): every rank's x, in rank order. Backward: the gradients of the gathered tensor summed over the
    ranks (an all-reduce, which every backend has), of which this rank keeps its own row."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        out = x.new_empty(dist.get_world_size(group), *x.shape)
        dist.all_gather(list(out.unbind(0)), x.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _summed(grad, ctx.group)[dist.get_rank(ctx.group)], None


class _AllReduce(torch.autograd.Function):
    """The sum of x over the ranks, on every rank. Backward: the same sum of the gradients."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        return _summed(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _summed(grad, ctx.group), None


class _SumGradient(torch.autograd.Function):
    """x itself; its gradient is summed over the ranks (a replicated parameter's gradient made whole)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _summed(grad, ctx.group), None


class _Depend(torch.autograd.Function):
    """The outputs themselves, made to depend on `gathered` with a zero gradient: whatever part of them a rank's
    loss uses, its backward reaches the gather, so that every rank runs the gather's collective (a rank that
    skipped it would leave the others waiting)."""

    @staticmethod
    def forward(ctx, gathered: torch.Tensor, *outputs: torch.Tensor):
        ctx.gathered = gathered.shape, gathered.dtype, gathered.device
        return tuple(t.view_as(t) for t in outputs)

    @staticmethod
    def backward(ctx, *grads):
        shape, dtype, device = ctx.gathered
        return (torch.zeros(shape, dtype=dtype, device=device), *grads)


def depend(gathered: torch.Tensor, *outputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return _Depend.apply(gathered, *outputs)


def all_gather(x: torch.Tensor, group) -> torch.Tensor:
    return _AllGather.apply(x, group)


def all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    return _AllReduce.apply(x, group)


def sum_gradient(x: torch.Tensor, group) -> torch.Tensor:
    return _SumGradient.apply(x, group)
