"""Wall-clock timing of a callable: warm up, then time repeated calls and summarise them.

`time_call` and `interleaved` take a fixed number of single-call samples (tune and the scripts in benchmarks/).
`measure` is the benchmark's: samples of one or more calls, their spread judged (`TimingStats.noisy`), and a
noisy point measured again, wider, while the case's time budget allows (on CUDA through triton.testing.do_bench).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

# A point is noisy when its samples spread this much: the IQR above this fraction of the median (the threshold at
# which torch.utils.benchmark's adaptive_autorange stops by default), or a median more than NOISY_MEDIAN_OVER_MIN
# times the fastest sample (a first `make bench` showed chunked at N = 256 with median 128 ms and minimum 1.9 ms).
NOISY_IQR_FRACTION = 0.1
NOISY_MEDIAN_OVER_MIN = 2.0
# Calls per sample: enough that one sample lasts this long, so that reading the clock is small beside it (the block
# of torch.utils.benchmark's autoranges). A noisy round is measured again with twice the calls per sample.
MIN_SAMPLE_S = 1e-3
MAX_ROUNDS = 3  # the first measurement and at most two wider ones


def synchronize(device: torch.device | str) -> None:
    """Wait for queued GPU work on `device`; nothing to wait for on CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class TimingStats:
    """Seconds per call over the timed repeats (`measure`: each sample the mean of `calls_per_sample` calls, from
    the last of `rounds` measurements)."""

    times: list[float]
    calls_per_sample: int = 1
    rounds: int = 1

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

    @property
    def noisy(self) -> bool:
        """The spread is too large to trust the median (NOISY_IQR_FRACTION, NOISY_MEDIAN_OVER_MIN)."""
        return self.iqr > NOISY_IQR_FRACTION * self.median or self.median > NOISY_MEDIAN_OVER_MIN * self.min


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


def sample(fn: Callable[[], object], calls: int, device: torch.device | str) -> float:
    """Seconds per call of `calls` back-to-back calls (one sample; tests replace it to fake a noisy machine)."""
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    synchronize(device)
    return (time.perf_counter() - t0) / calls


def measure(
    fn: Callable[[], object],
    device: torch.device | str,
    repeats: int,
    warmup: int = 0,
    budget_s: float | None = None,
    first_s: float | None = None,
    max_rounds: int = MAX_ROUNDS,
) -> TimingStats:
    """`repeats` samples of `fn` after `warmup` untimed calls; while they are noisy, again with twice the calls per
    sample, up to `max_rounds` rounds and while the next round fits in `budget_s` (the time spent here included).
    The last round is returned, with its number. `first_s`, the time of a call made before, sizes the first
    samples (MIN_SAMPLE_S). On CUDA each round is triton.testing.do_bench's (`cuda_measure`).

    torch.utils.benchmark.Timer was the first choice on CPU, and its block idea is kept: its autoranges choose the
    number of samples themselves (adaptive_autorange takes 4 or more, blocked_autorange as many as fit in
    min_run_time, both after a block-size search that runs blocks of 1, 10, 100, ... calls), and Timer.timeit runs
    at least 2 warm-up calls before each sample, so that a sample of one 2-s prefill would cost 3 calls.
    `--repeats` promises a number of samples and `--time-budget` a cost per case; this loop keeps both, in exactly
    the calls it states.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1; got {repeats}.")
    if torch.device(device).type == "cuda":
        return cuda_measure(fn, repeats, budget_s, first_s, max_rounds)
    start = time.perf_counter()
    for _ in range(warmup):
        fn()
    if not first_s or first_s < MIN_SAMPLE_S:  # a fast call, whose first (cold) time overstates it: one more
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        first_s = min(first_s or math.inf, time.perf_counter() - t0)
    calls = max(1, math.ceil(MIN_SAMPLE_S / first_s))
    rounds, times = 0, []
    while True:
        rounds += 1
        times = []
        for _ in range(repeats):
            times.append(sample(fn, calls, device))
            if budget_s is not None and time.perf_counter() - start > budget_s:
                break
        stats = TimingStats(times, calls, rounds)
        if not stats.noisy or rounds >= max_rounds:
            return stats
        calls *= 2
        next_round = repeats * calls * stats.median
        if budget_s is not None and time.perf_counter() - start + next_round > budget_s:
            return stats


def cuda_measure(
    fn: Callable[[], object], repeats: int, budget_s: float | None, first_s: float | None, max_rounds: int
) -> TimingStats:
    """`measure` on CUDA: triton.testing.do_bench, which times each call with CUDA events and clears the L2 cache
    between calls, for about `repeats` calls, twice as many in each wider round."""
    from triton.testing import do_bench

    start = time.perf_counter()
    rep_ms = max(repeats * (first_s or 0.0) * 1e3, 1.0)
    rounds = 0
    while True:
        rounds += 1
        times = [ms * 1e-3 for ms in do_bench(fn, warmup=1, rep=rep_ms, return_mode="all")]
        stats = TimingStats(times, 1, rounds)
        if not stats.noisy or rounds >= max_rounds:
            return stats
        rep_ms *= 2
        if budget_s is not None and time.perf_counter() - start + 2 * rep_ms * 1e-3 > budget_s:
            return stats
