"""The benchmark sweep: every (batch, N, method) case checked against fp64, then timed and memory-measured.

    from leetdecoding.bench import SweepConfig, run_sweep
    results = run_sweep(SweepConfig(methods=["chunked", "recursion"], lengths=[1024, 4096]))
    results = run_sweep(SweepConfig(mode="decode", methods=["recurrent_step"], batches=[1, 8]))

The mode (forward, backward = forward + backward, decode) says what one call is (bench.cases). A case is skipped,
with its reason, when the method refuses the inputs, when its planned memory does not fit, or when its predicted
time exceeds the time budget. A case whose result disagrees with the fp64 check is marked "wrong" and gets no
throughput: a fast wrong answer is not a speed. A case whose timings spread is measured again, wider, within its
budget, and flagged `noisy` if it still spreads (bench.timing.measure).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from ..inputs import dtype_name
from ..methods.naive import TOLERANCE
from .cases import CASES, SweepConfig, auto_pick, make_inputs, skip_reasons
from .fp64 import fp64_gradients, fp64_sums
from .memory import measure_peak
from .timing import TimingStats, measure

__all__ = [
    "Result", "SweepConfig", "auto_pick", "error_limit", "fp64_gradients", "fp64_sums", "make_inputs",
    "predicted_seconds", "run_sweep", "skip_reasons",
]  # fmt: skip


def error_limit(dtype: torch.dtype) -> float:
    """The largest `relative_error` accepted before a result is marked wrong: the contract's tolerance."""
    return TOLERANCE[dtype]


# Useful work per call, in units of 4 B H Dk Dv flops (one token's q S and k^T v): N tokens forward, about three
# times that for forward + backward (as benchmarks/gpu_bench.py counts), one token per decode step.
WORK_TOKENS = {"forward": lambda n: n, "backward": lambda n: 3 * n, "decode": lambda n: 1}


@dataclass
class Result:
    method: str
    n: int  # decode: the prefill length before the timed step
    batch: int
    heads: int
    dk: int
    dv: int
    dtype: str
    device: str
    status: str  # "ok", "skip", "wrong" or "error"
    reason: str = ""
    auto: str = ""  # the method "auto" picks for this (N, batch)
    median_s: float | None = None  # per call: a forward, a forward + backward, or one decode step
    min_s: float | None = None
    max_s: float | None = None
    iqr_s: float | None = None
    repeats: int = 0
    gflops: float | None = None  # useful work (WORK_TOKENS) per second; None unless the result is right
    peak_bytes: int | None = None
    error: float | None = None  # max |o - o64| / the magnitude of the summed terms (naive.relative_error)
    mode: str = "forward"
    noisy: bool = False  # the spread stayed large after the re-measurements (timing.TimingStats.noisy)
    rounds: int = 0  # measurements made; more than 1: the first ones were noisy
    calls_per_sample: int = 0
    tokens_per_s: float | None = None  # decode: B tokens per step / median; None unless the result is right

    @property
    def useful_flops(self) -> float:
        return 4.0 * self.batch * self.heads * self.dk * self.dv * WORK_TOKENS[self.mode](self.n)

    def as_dict(self) -> dict:
        return asdict(self)

    def record(self, stats: TimingStats) -> None:
        self.median_s, self.min_s, self.max_s, self.iqr_s = stats.median, stats.min, stats.max, stats.iqr
        self.repeats, self.noisy, self.rounds = stats.repeats, stats.noisy, stats.rounds
        self.calls_per_sample = stats.calls_per_sample


def predicted_seconds(method, n: int, previous: tuple[int, float] | None, calls: int) -> float | None:
    """Time of a whole case, from the same method's last measured (N_prev, t_prev): t_prev (N/N_prev)^e, e the
    method's `time_exponent` (a decode method has none: a step does not grow with the prefill)."""
    if previous is None or previous[0] == 0:  # nothing to scale from (N = 0 measures only overhead)
        return None
    n_prev, t_prev = previous
    return calls * t_prev * (n / n_prev) ** getattr(method, "time_exponent", 0.0)


def case_skip_reasons(cfg: SweepConfig, method, case, previous: tuple[int, float] | None) -> list[str]:
    """Why this case is not run: refusals, memory, or a predicted time over the budget."""
    reasons = case.reasons(method)
    guess = predicted_seconds(method, case.x.seq_len, previous, cfg.calls_per_case)
    if not reasons and guess is not None and guess > cfg.time_budget:
        calls = cfg.calls_per_case
        reasons.append(f"predicted {guess:.1f} s for {calls} calls > budget {cfg.time_budget:g} s")
    return reasons


def run_case(cfg: SweepConfig, method, case, result: Result) -> Result:
    """Measure one case: the first call for memory and correctness, then the timed samples."""
    call = case.call(method)
    t0 = time.perf_counter()
    first_result, result.peak_bytes = measure_peak(call, cfg.device)
    first = time.perf_counter() - t0
    result.error = case.error(method, first_result)
    del first_result
    budget_left = max(cfg.time_budget - first, 0.0)
    warmup = max(cfg.warmup - 1, 0)
    result.record(measure(call, cfg.device, cfg.repeats, warmup, budget_left, first, cfg.max_rounds))
    limit = error_limit(cfg.dtype)
    if result.error > limit:
        result.status = "wrong"
        result.reason = f"error {result.error:.2e} > {limit:.0e}"
    else:
        result.status = "ok"
        result.gflops = result.useful_flops / result.median_s / 1e9
        if cfg.mode == "decode":
            result.tokens_per_s = result.batch / result.median_s
    return result


def _describe(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"


def run_sweep(
    cfg: SweepConfig,
    on_start: Callable[[str, int, int], None] | None = None,
    on_done: Callable[[Result], None] | None = None,
) -> list[Result]:
    """Benchmark every (batch, N, method) of `cfg`, in increasing N so that the time budget can predict.

    `on_start(method, n, batch)` and `on_done(result)` report progress.
    """
    names, registry, make_case = cfg.method_names(), cfg.registry(), CASES[cfg.mode]
    results: list[Result] = []
    last: dict[tuple[str, int], tuple[int, float]] = {}  # (method, batch) -> (N, seconds per call)
    for batch in cfg.batches:
        for n in sorted(cfg.lengths):
            try:
                case, failure = make_case(cfg, n, batch), ""
            except Exception as e:  # a decode case's prefill out of memory: every method of it fails
                case, failure = None, f"preparing the case: {_describe(e)}"
            for name in names:
                if on_start:
                    on_start(name, n, batch)
                r = Result(
                    name, n, batch, cfg.heads, cfg.dk, cfg.dv, dtype_name(cfg.dtype),
                    cfg.device, "error" if failure else "skip", reason=failure, auto=case.auto if case else "",
                    mode=cfg.mode,
                )
                reasons = [] if failure else case_skip_reasons(cfg, registry[name], case, last.get((name, batch)))
                if reasons:
                    r.reason = "; ".join(reasons)
                elif not failure:
                    try:
                        run_case(cfg, registry[name], case, r)
                        last[(name, batch)] = (n, r.median_s)
                    except Exception as e:  # e.g. out of memory: report it and go on with the sweep
                        r.status, r.reason = "error", _describe(e)
                results.append(r)
                if on_done:
                    on_done(r)
            del case
    return results
