"""The benchmark engine behind `leetdecoding bench` and `leetdecoding check`, usable from scripts.

    from leetdecoding.bench import SweepConfig, run_sweep, time_call
    results = run_sweep(SweepConfig(methods=["chunked"], lengths=[1024, 4096]))

Tables (rich) and plots (matplotlib) live in `bench.report` and `bench.plot`, imported only when used.
"""

from .memory import PeakMemory, measure_peak
from .sweep import Result, SweepConfig, run_sweep
from .timing import TimingStats, time_call

__all__ = ["PeakMemory", "measure_peak", "Result", "SweepConfig", "run_sweep", "TimingStats", "time_call"]
