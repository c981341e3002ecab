"""The parts of `leetdecoding bench` that need nothing of the command line's parsing (leetdecoding.cli keeps the
arguments and their checks): the machine header, the sweep with a progress bar, the summary lines, the files.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from pathlib import Path

import torch

from . import machine
from .cases import SweepConfig
from .export import append_history, write_csv, write_json
from .sweep import Result, run_sweep
from .timing import NOISY_IQR_FRACTION, NOISY_MEDIAN_OVER_MIN

MODES = {
    "forward": "forward (prefill)",
    "backward": "forward + backward (gradients of q, k, v checked too)",
    "decode": "decode: one ld.decode_step after a prefill of N tokens, state updated in place; tok/s = B / ms",
}
HISTORY_CONTEXT = ("date", "leetdecoding", "torch", "python", "device_name", "torch_threads")


def runnable(registry: dict, device: str) -> list[str]:
    """The default sweep: every method that can run on this device here (`info` says why the others cannot)."""
    kind = torch.device(device).type
    return [n for n, m in registry.items() if m.unavailable_reason() is None and kind in m.devices]


def machine_info(cfg: SweepConfig, say: Callable[[str], None]) -> dict:
    """Versions, device, threads and the torch.mm throughput, each said as it is known."""
    from ..device import device_name

    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **machine.versions(),
        "device": cfg.device,
        "device_name": device_name(cfg.device),
        "torch_threads": torch.get_num_threads(),
    }
    say(f"machine: {info['device_name']} ({cfg.device}), {info['torch_threads']} torch threads, "
        f"torch {info['torch']}, leetdecoding {info['leetdecoding']}")  # fmt: skip
    info["mm_gflops"] = machine.matmul_gflops(cfg.device)
    say(f"torch.mm fp32 2048x2048: {info['mm_gflops']:.1f} GFLOP/s (the 'of mm' column is a fraction of it)")
    return info


def run_with_progress(cfg: SweepConfig, console, show: bool) -> list[Result]:
    """`run_sweep` with rich's progress bar when `show` and rich is installed."""
    try:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    except ImportError:
        return run_sweep(cfg)
    total = len(cfg.method_names()) * len(cfg.lengths) * len(cfg.batches)
    columns = (TextColumn("{task.description:<28}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True, disable=not show) as progress:
        task = progress.add_task("bench", total=total)
        return run_sweep(
            cfg,
            on_start=lambda m, n, b: progress.update(task, description=f"{m} N={n} B={b}"),
            on_done=lambda r: progress.advance(task),
        )


def table_title(cfg: SweepConfig, dtype: str) -> str:
    return (f"{MODES[cfg.mode]}; {dtype} on {cfg.device}: H={cfg.heads}, Dk={cfg.dk}, Dv={cfg.dv}; median "
            f"of {cfg.repeats} samples after {cfg.warmup} warm-up; IQR as % of the median; error = max |o - o64| "
            "/ the magnitude of the summed terms")  # fmt: skip


def plot_title(cfg: SweepConfig, dtype: str, info: dict) -> str:
    """The shapes and the machine."""
    batches = ",".join(map(str, cfg.batches))
    return (f"leetdecoding bench --mode {cfg.mode}: {dtype}, B={batches}, H={cfg.heads}, Dk={cfg.dk}, Dv={cfg.dv}"
            f"\n{info['device_name']} ({cfg.device}), {info['torch_threads']} torch threads, torch {info['torch']}")


def spread_summary(results: list[Result]) -> str:
    """One line on how far the timings can be trusted."""
    timed = [r for r in results if r.median_s is not None]
    noisy = sum(r.noisy for r in timed)
    again = sum(r.rounds > 1 for r in timed)
    rule = f"IQR > {NOISY_IQR_FRACTION:.0%} of the median or median > {NOISY_MEDIAN_OVER_MIN:g}x the minimum"
    line = f"timing: {len(timed)} point(s) timed, {again} re-measured because their spread was large ({rule})"
    if noisy:
        return line + f"; [bold yellow]{noisy} still noisy[/] (marked ~): a busy machine, their medians are rough"
    return line + "; none noisy"


def write_outputs(args, cfg: SweepConfig, results: list[Result], rows: list[dict], info: dict) -> list[Path]:
    """results.csv, results.json, the plot and the history (paths from the command line's `args`)."""
    from .plot import plot_time_vs_n

    out = Path(args.out)
    config = {k: v for k, v in vars(cfg).items() if k != "log_decay"}
    config["dtype"] = args.dtype
    config["decay"] = torch.exp(cfg.resolved_log_decay()).tolist()
    written = [
        write_csv(args.csv or out / "results.csv", rows),
        write_json(args.json or out / "results.json", rows, info, config),
        plot_time_vs_n(results, args.plot or out / "time_vs_n.png", plot_title(cfg, args.dtype, info)),
    ]
    if not args.no_history:
        context = {k: info[k] for k in HISTORY_CONTEXT}
        written.append(append_history(args.history or out / "history.csv", rows, context))
    return written
