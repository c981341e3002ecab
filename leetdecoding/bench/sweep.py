"""The benchmark sweep: every (batch, N, method) case timed, memory-measured and checked against fp64.

    from leetdecoding.bench import SweepConfig, run_sweep
    results = run_sweep(SweepConfig(methods=["chunked", "recursion"], lengths=[1024, 4096]))

A case is skipped, with its reason, when the method refuses the inputs, when its planned memory does not fit,
or when its predicted time exceeds the time budget. A case whose result disagrees with the fp64 check is
marked "wrong" and gets no throughput: a fast wrong answer is not a speed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from .. import decay as _decay
from .. import dispatch
from ..choice import MethodRefusedError
from ..inputs import AttentionInputs, validate
from ..methods import REGISTRY, Method
from ..methods.naive import TOLERANCE, relative_error
from .memory import measure_peak
from .timing import time_call


def error_limit(dtype: torch.dtype) -> float:
    """The largest `relative_error` accepted before a result is marked wrong: the contract's tolerance."""
    return TOLERANCE[dtype]


@dataclass
class SweepConfig:
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    methods: list[str] = field(default_factory=lambda: list(REGISTRY))
    lengths: list[int] = field(default_factory=lambda: [256, 1024, 4096, 16384])
    batches: list[int] = field(default_factory=lambda: [1])
    heads: int = 8
    dk: int = 128
    dv: int = 128
    repeats: int = 5
    warmup: int = 1
    time_budget: float = 10.0  # seconds per case, warm-up and repeats together
    log_decay: torch.Tensor | None = None  # (H,) log lambda; None: MiniMax layer 0 of 12, as the CLI
    seed: int = 0

    def resolved_log_decay(self) -> torch.Tensor:
        if self.log_decay is not None:
            return self.log_decay
        return _decay.minimax(self.heads, 0, 12)

    @property
    def calls_per_case(self) -> int:
        """Calls one case makes: the warm-up (the first one measures memory) and the timed repeats."""
        return max(self.warmup, 1) + self.repeats


@dataclass
class Result:
    method: str
    n: int
    batch: int
    heads: int
    dk: int
    dv: int
    dtype: str
    device: str
    status: str  # "ok", "skip", "wrong" or "error"
    reason: str = ""
    auto: str = ""  # the method "auto" picks for this (N, batch)
    median_s: float | None = None
    min_s: float | None = None
    max_s: float | None = None
    iqr_s: float | None = None
    repeats: int = 0
    gflops: float | None = None  # useful work 4 B H N Dk Dv per second; None unless the result is right
    peak_bytes: int | None = None
    error: float | None = None  # max |o - o64| / the magnitude of the summed terms (naive.relative_error)

    @property
    def useful_flops(self) -> float:
        return 4.0 * self.batch * self.heads * self.n * self.dk * self.dv

    def as_dict(self) -> dict:
        return asdict(self)


def make_inputs(cfg: SweepConfig, n: int, batch: int) -> AttentionInputs:
    """Seeded random q, k, v of the configured shape, dtype and device, validated like a public call."""
    g = torch.Generator(device=cfg.device).manual_seed(cfg.seed + 7919 * n + batch)
    gen_dtype = torch.float64 if cfg.dtype == torch.float64 else torch.float32

    def randn(d: int) -> torch.Tensor:
        t = torch.randn(batch, cfg.heads, n, d, generator=g, device=cfg.device, dtype=gen_dtype)
        return t.to(cfg.dtype)

    q, k, v = randn(cfg.dk), randn(cfg.dk), randn(cfg.dv)
    return validate(q, k, v, None, cfg.resolved_log_decay())


def fp64_sums(q, k, v, log_decay, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The output and the magnitude of the terms each element sums, as the naive reference's `o` and `o_abs`
    (leetdecoding.methods.naive), at a cost that fits benchmark sizes: the chunked method in fp64 on the inputs
    and on |q|, |k|, |v| with |scale| (every decay is positive, so those are the sums of absolute terms).
    tests/test_naive.py checks both against the token-by-token loop."""
    chunked = REGISTRY["chunked"]
    out = []
    for take, s in ((torch.Tensor.double, scale), (lambda t: t.double().abs(), abs(scale))):
        x = validate(take(q), take(k), take(v), None, log_decay.double(), s)
        out.append(chunked.forward(x, **dispatch.options_for(chunked, x))[0])
    return out[0], out[1]


def auto_pick(x: AttentionInputs) -> str:
    try:
        return dispatch.choose(x).method.name
    except MethodRefusedError:
        return "none"


def skip_reasons(method: Method, x: AttentionInputs, options: dict) -> list[str]:
    """The dispatcher's refusals for this method, its memory guard applied at every size."""
    return dispatch.reasons_for(method, x, options, {}, check_from=0)[0]


def predicted_seconds(method: Method, n: int, previous: tuple[int, float] | None, calls: int) -> float | None:
    """Time of a whole case, from the same method's last measured (N_prev, t_prev): t_prev (N/N_prev)^e."""
    if previous is None or previous[0] == 0:  # nothing to scale from (N = 0 measures only overhead)
        return None
    n_prev, t_prev = previous
    return calls * t_prev * (n / n_prev) ** method.time_exponent


class SweepCase:
    """One (N, batch): shared inputs, the "auto" pick, and the fp64 answer with its magnitude (`fp64_sums`),
    computed on first use."""

    def __init__(self, cfg: SweepConfig, n: int, batch: int):
        self.x = make_inputs(cfg, n, batch)
        self.auto = auto_pick(self.x)
        self._o64: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def o64(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._o64 is None:
            x = self.x
            self._o64 = fp64_sums(x.q, x.k, x.v, x.log_decay, x.scale)
        return self._o64


def case_skip_reasons(
    cfg: SweepConfig, method: Method, case: SweepCase, previous: tuple[int, float] | None
) -> list[str]:
    """Why this case is not run: refusals, memory, or a predicted time over the budget."""
    reasons = skip_reasons(method, case.x, dispatch.options_for(method, case.x))
    guess = predicted_seconds(method, case.x.seq_len, previous, cfg.calls_per_case)
    if not reasons and guess is not None and guess > cfg.time_budget:
        calls = cfg.calls_per_case
        reasons.append(f"predicted {guess:.1f} s for {calls} calls > budget {cfg.time_budget:g} s")
    return reasons


def run_case(cfg: SweepConfig, method: Method, case: SweepCase, result: Result) -> Result:
    """Measure one case: first call for memory and correctness, then the timed repeats."""
    x = case.x
    options = dispatch.options_for(method, x)

    def call():
        return method.forward(x, **options)

    t0 = time.perf_counter()
    (o, _), result.peak_bytes = measure_peak(call, cfg.device)
    first = time.perf_counter() - t0
    result.error = relative_error(o, *case.o64)
    del o
    budget_left = max(cfg.time_budget - first, 0.0)
    stats = time_call(call, cfg.repeats, max(cfg.warmup - 1, 0), cfg.device, budget_left)
    result.median_s, result.min_s, result.max_s = stats.median, stats.min, stats.max
    result.iqr_s, result.repeats = stats.iqr, stats.repeats
    limit = error_limit(cfg.dtype)
    if result.error > limit:
        result.status = "wrong"
        result.reason = f"error {result.error:.2e} > {limit:.0e}"
    else:
        result.status = "ok"
        result.gflops = result.useful_flops / stats.median / 1e9
    return result


def run_sweep(
    cfg: SweepConfig,
    on_start: Callable[[str, int, int], None] | None = None,
    on_done: Callable[[Result], None] | None = None,
) -> list[Result]:
    """Benchmark every (batch, N, method) of `cfg`, in increasing N so that the time budget can predict.

    `on_start(method, n, batch)` and `on_done(result)` report progress.
    """
    unknown = [m for m in cfg.methods if m not in REGISTRY]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; known: {', '.join(REGISTRY)}.")
    results: list[Result] = []
    last: dict[tuple[str, int], tuple[int, float]] = {}  # (method, batch) -> (N, seconds per call)
    for batch in cfg.batches:
        for n in sorted(cfg.lengths):
            case = SweepCase(cfg, n, batch)
            for name in cfg.methods:
                if on_start:
                    on_start(name, n, batch)
                r = Result(
                    name, n, batch, cfg.heads, cfg.dk, cfg.dv, str(cfg.dtype).replace("torch.", ""),
                    cfg.device, "skip", auto=case.auto,
                )
                reasons = case_skip_reasons(cfg, REGISTRY[name], case, last.get((name, batch)))
                if reasons:
                    r.reason = "; ".join(reasons)
                else:
                    try:
                        run_case(cfg, REGISTRY[name], case, r)
                        last[(name, batch)] = (n, r.median_s)
                    except Exception as e:  # e.g. out of memory: report it and go on with the sweep
                        r.status, r.reason = "error", f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                results.append(r)
                if on_done:
                    on_done(r)
            del case
    return results
