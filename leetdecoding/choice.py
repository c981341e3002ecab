"""What the dispatcher chose for a call, how it walks its candidates, and how callers read what was chosen."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field


class MethodRefusedError(ValueError):
    """No method (or not the forced one) can run these inputs; the message lists every reason."""


@dataclass
class Choice:
    """What the dispatcher chose for one call: the method, the options it runs with, why, and why the methods
    tried before it were refused."""

    method: object  # a Method, or a DecodeMethod for a decode step
    options: dict
    reason: str
    refusals: dict[str, list[str]] = field(default_factory=dict)
    estimate_bytes: int = 0
    operation: str = "attention"  # or "decode_step"


def refuse_all(described: str, refusals: dict[str, list[str]], among: tuple[str, ...]) -> MethodRefusedError:
    listing = "\n".join(f"  {n}: {'; '.join(r)}" for n, r in refusals.items())
    what = f"none of the methods {list(among)} can run" if among else "no method can run"
    return MethodRefusedError(f"{what} {described}:\n{listing}")


def walk(order: list[str], among: tuple[str, ...], why: str, reasons) -> tuple[str, str, dict]:
    """The first name of `order` (restricted to `among` when given) whose `reasons(name)` is empty:
    (name or "", why, the refusals before it)."""
    if among:
        order = [n for n in order if n in among]
        why = f"the first of {list(among)} in auto's order that can run (auto's order here: {why})"
    refusals: dict[str, list[str]] = {}
    for n in order:
        r = reasons(n)
        if not r:
            return n, why, refusals
        refusals[n] = r
    return "", why, refusals


_recording = threading.local()


@contextmanager
def record_choices() -> Iterator[list[Choice]]:
    """Collects the choice of every `attention` and `decode_step` call made inside the block (in this thread),
    in order: `with record_choices() as made: ...; made[-1].method.name`. How a caller (a model integration, a
    benchmark) reads which method ran without asking the dispatcher again."""
    lists = _recording.__dict__.setdefault("lists", [])
    made: list[Choice] = []
    lists.append(made)
    try:
        yield made
    finally:  # by identity: list.remove compares by value, and a nested block may have recorded the same choices
        del lists[next(i for i, m in enumerate(lists) if m is made)]


def made(choice: Choice) -> Choice:
    for made in getattr(_recording, "lists", ()):
        made.append(choice)
    return choice
