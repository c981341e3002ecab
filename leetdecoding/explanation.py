"""What the dispatcher decided for one call, as a readable report and as fields for code."""

from __future__ import annotations

from dataclasses import dataclass


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} PiB"


@dataclass
class Explanation:
    """What "auto" (or a forced method) does with these inputs, and why each other method is not used."""

    inputs: str
    method: str | None
    options: dict
    reason: str
    refusals: dict[str, list[str]]
    others: list[str]  # methods that could run these inputs but are not used
    estimate_bytes: int
    forced: bool = False  # the method was forced (method= or the environment): `others` are never chosen

    def __repr__(self) -> str:
        lines = [f"inputs: {self.inputs}"]
        if self.method is None:
            what = "the forced method cannot run these inputs" if self.forced else "no method can run these inputs"
            lines.append(f"{what}: {self.reason}")
        else:
            opts = ", ".join(f"{k}={v}" for k, v in self.options.items())
            lines.append(f"chosen: {self.method}" + (f" ({opts})" if opts else ""))
            lines.append(f"  why: {self.reason}")
            if self.estimate_bytes:
                lines.append(f"  planned memory: {format_bytes(self.estimate_bytes)}")
        for n, r in self.refusals.items():
            lines.append(f"refused: {n}: {'; '.join(r)}")
        if self.forced and self.others:  # never chosen while the method is forced, whatever their priority
            forced = f"{self.method} is {self.reason}" if self.method else "another method is forced"
            lines.append(f"not used ({forced}): {', '.join(self.others)} could also run these")
        else:
            lines.extend(f"also possible (lower priority): {n}" for n in self.others)
        return "\n".join(lines)

    __str__ = __repr__


def build(choose_fn, described: str, forced: bool, registry: dict, reasons) -> Explanation:
    """The Explanation of `choose_fn()` (which raises MethodRefusedError when nothing can run): the choice, and
    `reasons(method)` for every method of `registry`."""
    from .choice import MethodRefusedError

    try:
        c = choose_fn()  # the caller's inputs: a refusal describes them, not the largest segment
    except MethodRefusedError as e:
        chosen, options, reason, estimate = None, {}, str(e), 0
    else:
        chosen, options, reason, estimate = c.method.name, c.options, c.reason, c.estimate_bytes
    refusals, others = {}, []
    for n, m in registry.items():
        r = reasons(m)
        if r:
            refusals[n] = r
        elif n != chosen:
            others.append(n)
    return Explanation(described, chosen, options, reason, refusals, others, estimate, forced)
