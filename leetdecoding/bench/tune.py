"""`leetdecoding tune`: measure this machine for the values that "auto" uses (see leetdecoding/tuning.py).

Every contender is an exact method (they differ in speed only), timed interleaved, median of `rounds`:

    chunk_size_small / chunk_size_large   chunked at chunks 32 .. 256 (N = 4096), head dim 64 and the given one
    vanilla_max_n                         vanilla against chunked (with the chunk just found) at N = 32 .. 1024:
                                          the longest N before chunked first wins (0 if it always wins)
    triton_chunk_size                     on CUDA with Triton: triton_chunked at chunks 32, 64, 128 (N = 16384)

A value is recorded only where its race covered the default and the allowed values next to it (`covers`): a
narrower race (chunks 32 and 64 against a default of 128, or of 64 with 128 untried) cannot tell that the default
is slower, so the default stays. `Plan.quick` races the same candidates at shorter lengths.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

import leetdecoding as ld

from .. import dispatch, tuning
from ..methods import REGISTRY
from .timing import interleaved


@dataclass
class Measurement:
    value: str  # the tuned value this informs
    case: str  # what was held fixed
    contender: str
    median_ms: float


@dataclass
class Plan:
    chunk_n: int = 4096
    chunks: tuple[int, ...] = (32, 64, 128, 256)
    crossover_n: tuple[int, ...] = (32, 64, 128, 256, 512, 1024)
    triton_n: int = 16384
    triton_chunks: tuple[int, ...] = (32, 64, 128)

    @classmethod
    def quick(cls) -> Plan:
        """Shorter sequences, fewer crossover lengths; each race still covers its default (see `covers`)."""
        return cls(chunk_n=512, crossover_n=(128, 256, 512), triton_n=1024)


def covers(candidates: tuple[int, ...], default: int, allowed) -> bool:
    """Whether a race over `candidates` can confirm `default` or beat it: it includes the default and a value on
    each side of it (where the table allows one). Only then does its winner replace the default."""
    below = any(a < default for a in allowed) and not any(c < default for c in candidates)
    above = any(a > default for a in allowed) and not any(c > default for c in candidates)
    return default in candidates and not below and not above


def _record(name: str, found: int, candidates: tuple[int, ...], values: dict, progress: Callable) -> None:
    """values[name] = found, if the race over `candidates` covered the default; otherwise say why not."""
    default = dispatch.TUNABLE[name]
    if covers(candidates, default, tuning.ALLOWED[name]):
        values[name] = found
    else:
        progress(f"{name}: not recorded, the race over {candidates} does not cover the default {default} and the "
                 f"values next to it; the default stays")


def _inputs(n: int, heads: int, dim: int, dtype: torch.dtype, device: str):
    g = torch.Generator().manual_seed(n + dim)
    q, k, v = (torch.randn(1, heads, n, dim, generator=g).to(device=device, dtype=dtype) for _ in range(3))
    return ld.inputs.validate(q, k, v, log_decay=ld.decay.minimax(heads, 0, 12).to(device))


def _race(value: str, case: str, contenders: dict, rounds: int, device: str, out: list, label=str) -> dict:
    """Median seconds of each contender, timed interleaved; each also recorded in `out` as `label(key)`."""
    stats = interleaved(contenders, rounds=rounds, device=device)
    medians = {key: s.median for key, s in stats.items()}
    out += [Measurement(value, case, label(key), t * 1e3) for key, t in medians.items()]
    return medians


def _sizes(chunks: tuple[int, ...], x) -> tuple[int, ...]:
    """The chunk sizes worth racing at x's length (a chunk longer than the sequence is the sequence)."""
    return tuple(c for c in chunks if c <= max(x.seq_len, 16))


def _best_chunk(value, x, sizes, rounds, device, out, method="chunked", **fixed) -> int:
    m = REGISTRY[method]
    case = f"N={x.seq_len}, D={x.dk}"
    contenders = {c: (lambda c=c: m.forward(x, chunk_size=c, **fixed)) for c in sizes}
    medians = _race(value, case, contenders, rounds, device, out, label=lambda c: f"C={c}")
    return min(medians, key=medians.get)


def measure(
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    heads: int = 8,
    dim: int = 128,
    rounds: int = 5,
    plan: Plan | None = None,
    progress: Callable[[str], None] = lambda _: None,
) -> tuple[dict, list[Measurement]]:
    """(the values to write, every measurement). Nothing is written here."""
    plan = plan or Plan()
    out: list[Measurement] = []
    values: dict[str, int] = {}
    span = {"span_bytes": dispatch.SPAN_BYTES}
    with torch.no_grad():
        for name, d in (("chunk_size_small", min(dim, dispatch.SMALL_HEAD_DIM)), ("chunk_size_large", dim)):
            if name == "chunk_size_large" and dim <= dispatch.SMALL_HEAD_DIM:
                continue
            progress(f"{name}: chunked at chunks {plan.chunks}, N={plan.chunk_n}, D={d}")
            x = _inputs(plan.chunk_n, heads, d, dtype, device)
            sizes = _sizes(plan.chunks, x)
            _record(name, _best_chunk(name, x, sizes, rounds, device, out, **span), sizes, values, progress)

        chunk_name = "chunk_size_large" if dim > dispatch.SMALL_HEAD_DIM else "chunk_size_small"
        chunk = values.get(chunk_name, dispatch.TUNABLE[chunk_name])  # what auto will use
        progress(f"vanilla_max_n: vanilla against chunked (C={chunk}) at N in {plan.crossover_n}")
        crossover = 0
        for n in plan.crossover_n:
            x = _inputs(n, heads, dim, dtype, device)
            contenders = {
                "vanilla": lambda x=x: REGISTRY["vanilla"].forward(x),
                "chunked": lambda x=x: REGISTRY["chunked"].forward(x, chunk_size=chunk, **span),
            }
            medians = _race("vanilla_max_n", f"N={n}, D={dim}", contenders, rounds, device, out)
            if medians["chunked"] <= medians["vanilla"]:
                break
            crossover = n
        _record("vanilla_max_n", crossover, plan.crossover_n, values, progress)

        triton = REGISTRY["triton_chunked"]
        if device == "cuda" and not triton.unavailable_reason():
            progress(f"triton_chunk_size: triton_chunked at chunks {plan.triton_chunks}, N={plan.triton_n}")
            x = _inputs(plan.triton_n, heads, dim, dtype, device)
            sizes = _sizes(plan.triton_chunks, x)
            found = _best_chunk(
                "triton_chunk_size", x, sizes, rounds, device, out, "triton_chunked",
                precision=dispatch.TRITON_PRECISION,
            )  # fmt: skip
            _record("triton_chunk_size", found, sizes, values, progress)
    return values, out


__all__ = ["Measurement", "Plan", "covers", "measure"]
