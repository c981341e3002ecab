"""Autocast does not change what leetdecoding computes (DESIGN.md section 4).

Under `torch.autocast` every matmul of a call would run in the autocast dtype: fp32 inputs would lose fp32 accuracy
and the states, which the contract keeps in fp32, would come back in bf16 / fp16. The convention here is
`torch.amp.custom_fwd` without `cast_inputs`: a call computes in the dtype of the inputs it is given (bf16 inputs
take the bf16 path, with fp32 accumulation and fp32 states as always), so autocast is switched off inside it, for
the device type of the inputs (CPU and CUDA autocast alike).
"""

from __future__ import annotations

import contextlib
import functools

import torch

_AVAILABLE: dict[str, bool] = {}  # per device type: asked once, as decode_step runs per token
_AUTOCAST_TYPES = ("cpu", "cuda", "xpu", "mps", "hpu")  # device types with autocast, for traced calls


def _has_autocast(device_type: str) -> bool:
    if torch.compiler.is_compiling():  # not the cache (a traced read would guard on its contents), and not
        return device_type in _AUTOCAST_TYPES  # torch.amp.is_autocast_available, which older dynamo cannot trace
    known = _AVAILABLE.get(device_type)
    if known is None:
        known = _AVAILABLE[device_type] = torch.amp.is_autocast_available(device_type)
    return known


def autocast_off(device_type: str):
    """A context with autocast off for `device_type` when it is on there; a no-op context otherwise."""
    if _has_autocast(device_type) and torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _device_type(t) -> str:
    return t.device.type if isinstance(t, torch.Tensor) else "cpu"


def without_autocast(fn):
    """For a public function whose first argument is q: run it with autocast off on q's device type."""

    @functools.wraps(fn)
    def wrapper(q, *args, **kwargs):
        with autocast_off(_device_type(q)):
            return fn(q, *args, **kwargs)

    return wrapper


def backward_without_autocast(backward):
    """For a custom autograd backward `backward(ctx, *grads)`: autocast off on the gradients' device type, as it
    was in the forward (which runs inside a public call), so that a backward called inside an autocast region
    computes in the forward's precision."""

    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        device_type = next((g.device.type for g in grads if isinstance(g, torch.Tensor)), "cpu")
        with autocast_off(device_type):
            return backward(ctx, *grads)

    return wrapper
