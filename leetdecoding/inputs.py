"""The validated-inputs record: every check on user input happens here, once, with a clear message.

Methods receive an `AttentionInputs` and trust it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import decay as _decay

FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def compute_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """Accumulation and state dtype: fp64 for fp64 inputs, fp32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass
class AttentionInputs:
    q: torch.Tensor  # (B, H, N, Dk), possibly a strided view
    k: torch.Tensor  # (B, H, N, Dk)
    v: torch.Tensor  # (B, H, N, Dv)
    log_decay: torch.Tensor  # (H,) in compute_dtype, on the inputs' device, every entry <= 0
    scale: float
    initial_state: torch.Tensor | None  # (B, H, Dk, Dv) in compute_dtype
    output_final_state: bool

    @property
    def batch(self) -> int:
        return self.q.shape[0]

    @property
    def heads(self) -> int:
        return self.q.shape[1]

    @property
    def seq_len(self) -> int:
        return self.q.shape[2]

    @property
    def dk(self) -> int:
        return self.q.shape[3]

    @property
    def dv(self) -> int:
        return self.v.shape[3]

    @property
    def dtype(self) -> torch.dtype:
        return self.q.dtype

    @property
    def compute_dtype(self) -> torch.dtype:
        return compute_dtype_for(self.q.dtype)

    @property
    def device(self) -> torch.device:
        return self.q.device

    @property
    def requires_grad(self) -> bool:
        tensors = [self.q, self.k, self.v, self.log_decay]
        if self.initial_state is not None:
            tensors.append(self.initial_state)
        return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)

    def describe(self) -> str:
        s = (
            f"q {tuple(self.q.shape)}, k {tuple(self.k.shape)}, v {tuple(self.v.shape)}, "
            f"{str(self.dtype).replace('torch.', '')} on {self.device}"
        )
        if self.initial_state is not None:
            s += ", with initial_state"
        return s


def _shape(t: torch.Tensor) -> str:
    return str(tuple(t.shape))


def check_tensor(name: str, t, ndim: int, what: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {what}; got {type(t).__name__}.")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be a floating tensor (float64, float32, float16 or bfloat16); got {t.dtype}. "
            f"Hint: convert with {name}.float()."
        )
    if t.ndim != ndim:
        raise ValueError(
            f"{name} must have {ndim} dimensions {what}; got {t.ndim} dimensions, shape {_shape(t)}."
            + (" Hint: the layout is (B, H, N, D); for a (B, N, H, D) tensor pass x.transpose(1, 2)." if ndim == 4 else "")
        )


def check_same(names: tuple[str, ...], tensors: tuple[torch.Tensor, ...]) -> None:
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) > 1:
        got = ", ".join(f"{n} {t.dtype}" for n, t in zip(names, tensors))
        raise TypeError(f"{', '.join(names)} must share one dtype; got {got}. Hint: cast them to one dtype.")
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        got = ", ".join(f"{n} on {t.device}" for n, t in zip(names, tensors))
        raise ValueError(f"{', '.join(names)} must be on one device; got {got}.")


def check_scale(scale) -> float:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a real number; got {type(scale).__name__} {scale!r}.")
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite; got {scale}.")
    return scale


def check_state(name: str, state, expected: tuple[int, ...], device: torch.device, dtype: torch.dtype):
    """Return the state converted to the compute dtype, after checking its shape and device."""
    if state is None:
        return None
    if not isinstance(state, torch.Tensor) or state.dtype not in FLOAT_DTYPES:
        got = state.dtype if isinstance(state, torch.Tensor) else type(state).__name__
        raise TypeError(f"{name} must be a floating torch.Tensor of shape {expected}; got {got}.")
    if tuple(state.shape) != tuple(expected):
        raise ValueError(
            f"{name} must have shape {expected} (B, H, Dk, Dv); got {_shape(state)}."
        )
    if state.device != device:
        raise ValueError(f"{name} must be on {device} like q; got {state.device}.")
    return state.to(compute_dtype_for(dtype))


def validate(
    q,
    k,
    v,
    decay=None,
    log_decay=None,
    scale=1.0,
    initial_state=None,
    output_final_state=False,
) -> AttentionInputs:
    """Check everything the public `attention` call receives and build the record methods use."""
    check_tensor("q", q, 4, "(B, H, N, Dk)")
    check_tensor("k", k, 4, "(B, H, N, Dk)")
    check_tensor("v", v, 4, "(B, H, N, Dv)")
    check_same(("q", "k", "v"), (q, k, v))
    for axis, label in ((0, "batch B"), (1, "heads H"), (2, "length N")):
        if not q.shape[axis] == k.shape[axis] == v.shape[axis]:
            raise ValueError(
                f"q, k and v must agree on {label} (axis {axis}); got q {_shape(q)}, k {_shape(k)}, v {_shape(v)}."
            )
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"q and k must have the same head dim Dk (last axis); got q {_shape(q)}, k {_shape(k)}.")
    if q.shape[3] < 1 or v.shape[3] < 1:
        raise ValueError(f"head dims must be >= 1; got Dk={q.shape[3]}, Dv={v.shape[3]}.")
    if not isinstance(output_final_state, bool):
        raise TypeError(f"output_final_state must be a bool; got {type(output_final_state).__name__}.")
    B, H, _, Dk = q.shape
    Dv = v.shape[3]
    cd = compute_dtype_for(q.dtype)
    return AttentionInputs(
        q=q,
        k=k,
        v=v,
        log_decay=_decay.canonical_log_decay(decay, log_decay, H, q.device, cd),
        scale=check_scale(scale),
        initial_state=check_state("initial_state", initial_state, (B, H, Dk, Dv), q.device, q.dtype),
        output_final_state=output_final_state,
    )
