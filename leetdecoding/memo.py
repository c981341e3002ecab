"""Results computed from a tensor, remembered while that very tensor is alive and unmodified.

Decoding calls with the same decay every token; validating it and forming its factors each time would cost more
than the token's own state update at small batch.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")


def _versions(result) -> tuple[int, ...]:
    tensors = result if isinstance(result, tuple) else (result,)
    return tuple(t._version for t in tensors)


class TensorMemo:
    def __init__(self, size: int = 16):
        self._entries: OrderedDict = OrderedDict()
        self._size = size

    def get(self, source: torch.Tensor, key: tuple, compute: Callable[[], T]) -> T:
        """compute() (a tensor or a tuple of tensors), or its earlier result for this same `source` object and
        `key`, if neither `source` nor that result has been modified in place since."""
        if source.requires_grad:
            return compute()
        slot = (id(source), key)
        hit = self._entries.get(slot)
        if hit is not None and hit[0]() is source and hit[1] == source._version and hit[3] == _versions(hit[2]):
            self._entries.move_to_end(slot)
            return hit[2]
        result = compute()
        self._entries[slot] = (weakref.ref(source), source._version, result, _versions(result))
        if len(self._entries) > self._size:
            self._entries.popitem(last=False)
        return result
