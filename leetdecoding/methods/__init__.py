"""The methods, one file each. `REGISTRY` maps each name to its (stateless) method object."""

from __future__ import annotations

from .base import Method
from .chunked import Chunked
from .fleet import Fleet
from .recurrent import Recurrent
from .recursion import Recursion
from .triton import METHODS as TRITON_METHODS
from .vanilla import Vanilla

REGISTRY: dict[str, Method] = {
    m.name: m for m in (Chunked(), Recurrent(), Vanilla(), Recursion(), Fleet(), *TRITON_METHODS)
}

__all__ = ["Method", "REGISTRY"]
