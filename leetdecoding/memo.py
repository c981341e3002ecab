"""Results derived from a decay, remembered by the VALUES they were computed from.

Decoding calls with the same decay every token; validating it and forming its factors each time would cost more
than the token's own state update at small batch. A table remembered per tensor object and version counter goes
stale: writes through `.data`, numpy views or `torch.from_numpy` arrays do not bump the version, torch.compile
bakes a remembered tensor into its graph, and another thread can write between the check and the store. So:

- the key is the values themselves: a small CPU tensor's values are read once per call (`snapshot`, H entries),
  and the result is computed from exactly those values, never from the live tensor, so an entry always holds
  the tables of its key, whoever writes the tensor meanwhile;
- nothing is remembered while a graph is recorded (torch.compile, torch.jit.trace: the graph computes from its
  inputs), for tensors that require grad, or for tensors on other devices (reading their values would be a host
  sync per call: there the tables are rebuilt per call, on the device, without a sync);
- one lock guards the dict, so concurrent calls never see it half updated.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import TypeVar

import torch

T = TypeVar("T")

MAX_ELEMENTS = 4096  # beyond this, reading the values per call costs more than it saves (a decay has H entries)

_is_wrapped = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", lambda t: False)


def snapshot(t: torch.Tensor) -> tuple[Hashable, Callable[[], torch.Tensor]] | None:
    """(key, copy) where `key` holds `t`'s current values (with dtype and shape), read once, and `copy()` makes a
    tensor of exactly those values; or None where the values must not be read on the host now: while
    torch.compile traces, for a tensor that requires grad, on another device than the CPU, under vmap, or for more
    than MAX_ELEMENTS values."""
    # this runs twice per decode step: the cheapest tests first (is_cpu, unlike device.type, makes no object)
    if not t.is_cpu or t.requires_grad or t.numel() > MAX_ELEMENTS or tracing() or _is_wrapped(t):
        return None
    values = tuple((t if t.ndim == 1 else t.reshape(-1)).tolist())  # exact: every dtype's values are Python's
    dtype, shape = t.dtype, t.shape
    return (dtype, shape, values), lambda: torch.tensor(values, dtype=dtype, device="cpu").reshape(shape)


def tracing() -> bool:
    """Whether a graph is being recorded (torch.compile, or torch.jit.trace and so the legacy ONNX export): a
    value read on the host there would become a constant of the graph instead of a function of its inputs."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


def _versions(result) -> int | tuple[int, ...]:
    if isinstance(result, torch.Tensor):
        return result._version
    return tuple([t._version for t in result if isinstance(t, torch.Tensor)])  # other fields cannot change


class ValueMemo:
    """A bounded, thread-safe memo of results (a tensor or a tuple of tensors) keyed by value."""

    def __init__(self, size: int = 16):
        self._entries: OrderedDict = OrderedDict()
        self._size = size
        self._lock = threading.Lock()

    def get(self, key: Hashable, compute: Callable[[], T]) -> T:
        """The result remembered for `key`, else compute() (which must depend on nothing but the key)."""
        with self._lock:
            hit = self._entries.get(key)
            if hit is not None and hit[1] == _versions(hit[0]):  # a caller that modified a shared result loses it
                self._entries.move_to_end(key)
                return hit[0]
        # outside the lock: it may be slow, and may use other memos. Never as an inference tensor (under
        # torch.inference_mode): a remembered result must serve later calls with autograd on, and have a version
        with torch.inference_mode(False):
            result = compute()
        with self._lock:
            self._entries[key] = (result, _versions(result))
            while len(self._entries) > self._size:
                self._entries.popitem(last=False)
        return result

    def derive(self, source: torch.Tensor, key: tuple, compute: Callable[[torch.Tensor], T]) -> T:
        """compute(values) for the current values of `source`: remembered by those values where `snapshot` can
        read them, else computed from `source` itself on every call."""
        snap = snapshot(source)
        if snap is None:
            return compute(source)
        values, copy = snap
        return self.get((values, key), lambda: compute(copy()))


class CheckedTensors:
    """Device tensors whose values passed a check, by identity and version counter, so that the check (a host
    sync) runs once per tensor and version rather than once per call.

    Only the check is remembered: callers still compute from the tensor's current values on every call, so a
    stale entry (a write that bypasses the version counter) can skip a check, never change a result.
    """

    def __init__(self, size: int = 64):
        self._entries: OrderedDict = OrderedDict()
        self._size = size
        self._lock = threading.Lock()

    def passed(self, t: torch.Tensor, key: Hashable) -> bool:
        if t.is_inference():  # no version counter: checked on every call
            return False
        with self._lock:
            hit = self._entries.get((id(t), key))
            return hit is not None and hit[0]() is t and hit[1] == t._version

    def check(self, t: torch.Tensor, key: Hashable, run_check: Callable[[], T]) -> T:
        """run_check() (which raises if `t` fails), remembered as passed for `t` at the version read before."""
        if t.is_inference():
            return run_check()
        version = t._version  # read first: a write during the check leaves the entry stale, so it runs again
        result = run_check()
        with self._lock:
            self._entries[(id(t), key)] = (weakref.ref(t), version)
            while len(self._entries) > self._size:
                self._entries.popitem(last=False)
        return result
