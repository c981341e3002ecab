"""Positions along the sequence: the offsets of packed sequences (`cu_seqlens`, `cu_seqlens_cpu`) and the state
checkpoints, checked and read on the host once per call."""

from __future__ import annotations

import torch

from . import decay as _decay


def check_cu_seqlens(cu_seqlens, q: torch.Tensor, cu_seqlens_cpu=None) -> list[int] | None:
    """flash-attn's varlen convention: (S + 1,) integer offsets, 0 = cu[0] <= cu[1] <= ... <= cu[S] = T_total.

    The offsets are read from `cu_seqlens_cpu` (a list of ints or a CPU tensor) when given, so that a call with
    GPU tensors reads nothing back from the device; else from `cu_seqlens`. When both are given they must agree
    (compared where that is free: `cu_seqlens` on the CPU; on a GPU only their lengths)."""
    if cu_seqlens is None and cu_seqlens_cpu is None:
        return None
    if cu_seqlens is not None:
        _check_offsets_tensor("cu_seqlens", cu_seqlens)
    if q.shape[0] != 1:
        raise ValueError(
            f"with cu_seqlens, q, k and v hold the packed sequences as batch 1, (1, H, T_total, D); got batch "
            f"{q.shape[0]}. Hint: concatenate the sequences along the length axis."
        )
    name = "cu_seqlens" if cu_seqlens_cpu is None else "cu_seqlens_cpu"
    if cu_seqlens_cpu is None:
        cu = [int(c) for c in cu_seqlens.tolist()]
    elif isinstance(cu_seqlens_cpu, torch.Tensor):
        _check_offsets_tensor(name, cu_seqlens_cpu)
        if cu_seqlens_cpu.device.type != "cpu":
            got = cu_seqlens_cpu.device
            raise ValueError(f"cu_seqlens_cpu must be on the CPU (a host copy of cu_seqlens); got {got}.")
        cu = [int(c) for c in cu_seqlens_cpu.tolist()]
    elif isinstance(cu_seqlens_cpu, (list, tuple)) and all(type(c) is int for c in cu_seqlens_cpu):
        cu = list(cu_seqlens_cpu)
    else:
        got = type(cu_seqlens_cpu).__name__
        raise TypeError(f"cu_seqlens_cpu must be a list of ints or a CPU int tensor; got {got}.")
    if len(cu) < 2:
        raise ValueError(f"{name} must hold S + 1 >= 2 offsets; got {cu}.")
    if cu_seqlens is not None and cu_seqlens_cpu is not None:
        if cu_seqlens.numel() != len(cu) or (cu_seqlens.device.type == "cpu" and cu_seqlens.tolist() != cu):
            raise ValueError(f"cu_seqlens_cpu must hold the values of cu_seqlens; got {cu} and {cu_seqlens.tolist()}.")
    total = q.shape[2]
    if cu[0] != 0:
        raise ValueError(f"{name} must start at 0; got {name}[0] = {cu[0]}.")
    drops = [i for i in range(1, len(cu)) if cu[i] < cu[i - 1]]
    if drops:
        i = drops[0]
        raise ValueError(f"{name} must be non-decreasing; got {name}[{i - 1}] = {cu[i - 1]} > {name}[{i}] = {cu[i]}.")
    if cu[-1] != total:
        raise ValueError(f"{name} must end at T_total = {total} (the packed length); got {name}[-1] = {cu[-1]}")
    return cu


def _check_offsets_tensor(name: str, cu: torch.Tensor) -> None:
    if not isinstance(cu, torch.Tensor):
        raise TypeError(f"{name} must be a 1-D int32/int64 tensor of shape (S + 1,); got {type(cu).__name__}.")
    if cu.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be an int32 or int64 tensor; got {cu.dtype}.")
    _decay.check_not_meta(name, cu)
    if cu.ndim != 1 or cu.numel() < 2:
        raise ValueError(f"{name} must be 1-D of shape (S + 1,) with S >= 1 sequences; got shape {tuple(cu.shape)}.")


def check_checkpoints(positions, n: int) -> list[int] | None:
    """Positions p in [1, N], strictly increasing: the state after the first p tokens is returned."""
    if positions is None:
        return None
    if isinstance(positions, torch.Tensor):
        if positions.is_floating_point() or positions.ndim != 1:
            raise TypeError(f"state_checkpoints must be a 1-D integer tensor or a list of ints; got {positions.dtype} "
                            f"of shape {tuple(positions.shape)}.")
        _decay.check_not_meta("state_checkpoints", positions)
        positions = positions.tolist()
    if not isinstance(positions, (list, tuple)) or not all(
        isinstance(p, int) and not isinstance(p, bool) for p in positions
    ):
        raise TypeError(f"state_checkpoints must be a list of ints; got {positions!r}.")
    out = list(positions)
    bad = [p for p in out if not 1 <= p <= n]
    if bad:
        raise ValueError(
            f"state_checkpoints must lie in [1, N = {n}] (p = the state after the first p tokens); got {bad[:4]}."
        )
    if any(b <= a for a, b in zip(out, out[1:])):
        raise ValueError(f"state_checkpoints must be strictly increasing; got {out[:8]}.")
    return out
