"""Wall-clock timing of a callable: warm up, then time repeated calls and summarise them."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


def synchronize(device: torch.device | str) -> None:
    """Wait for queued GPU work on `device`; nothing to wait for on CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class TimingStats:
    """Seconds per call over the timed repeats."""

    times: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def min(self) -> float:
        return min(self.times)

    @property
    def max(self) -> float:
        return max(self.times)

    @property
    def iqr(self) -> float:
        """Interquartile range (0 with fewer than two repeats)."""
        if len(self.times) < 2:
            return 0.0
        q = statistics.quantiles(self.times, n=4, method="inclusive")
        return q[2] - q[0]

    @property
    def repeats(self) -> int:
        return len(self.times)


def time_call(
    fn: Callable[[], object],
    repeats: int,
    warmup: int,
    device: torch.device | str,
    budget_s: float | None = None,
) -> TimingStats:
    """Call `fn` `warmup` times untimed, then time up to `repeats` calls (at least one).

    With `budget_s`, repeats stop early once the time spent here (warm-up included) exceeds it.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1; got {repeats}.")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0; got {warmup}.")
    start = time.perf_counter()
    for _ in range(warmup):
        fn()
    synchronize(device)
    times: list[float] = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
        if budget_s is not None and time.perf_counter() - start > budget_s:
            break
    return TimingStats(times)


def interleaved(cases: dict, rounds: int, warmup: int = 1, device: str = "cpu") -> dict[str, TimingStats]:
    """Time each case once per round, alternating, so that drift of the machine hits all cases alike."""
    for fn in cases.values():
        time_call(fn, repeats=1, warmup=warmup, device=device)
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, fn in cases.items():
            times[name] += time_call(fn, repeats=1, warmup=0, device=device).times
    return {name: TimingStats(t) for name, t in times.items()}
