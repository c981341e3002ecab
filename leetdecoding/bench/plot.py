"""The plot of a sweep: time and peak memory against N, log-log, one colour per method, one line style per batch.

Measured points carry IQR error bars; a noisy one (timing.TimingStats.noisy) is circled. A point that was not
measured, or whose answer was wrong, is a marker on the bottom edge of the time panel at its N, in its method's
colour, its shape saying why (refused, over the memory or the time budget, wrong, failed), with a legend entry
for each reason. `marks(results)` is the same data without matplotlib.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .sweep import Result
from .timing import NOISY_IQR_FRACTION, NOISY_MEDIAN_OVER_MIN

LINE_STYLES = ["-", "--", ":", "-."]
# Why a point has no time, and its marker: matplotlib marker codes.
UNMEASURED_MARKERS = {
    "refused": "s",
    "over memory budget": "^",
    "over time budget": ">",
    "wrong answer": "X",
    "failed": "*",
}


@dataclass
class Mark:
    """One point of the plot: `kind` is "measured" or a key of UNMEASURED_MARKERS, with the reason."""

    method: str
    batch: int
    n: int
    kind: str
    reason: str = ""
    noisy: bool = False
    median_ms: float | None = None
    low_ms: float | None = None  # error bar below and above the median (IQR / 2, never below the minimum)
    high_ms: float | None = None
    peak_mib: float | None = None


def kind_of(r: Result) -> str:
    if r.status == "ok":
        return "measured"
    if r.status == "wrong":
        return "wrong answer"
    if r.status == "error":
        return "failed"
    if r.reason.startswith("predicted "):  # sweep.case_skip_reasons
        return "over time budget"
    if r.reason.startswith("needs about "):  # the dispatcher's memory guard
        return "over memory budget"
    return "refused"


def marks(results: list[Result]) -> list[Mark]:
    out = []
    for r in results:
        m = Mark(r.method, r.batch, r.n, kind_of(r), r.reason, r.noisy)
        if r.peak_bytes is not None:
            m.peak_mib = r.peak_bytes / 2**20
        if m.kind == "measured":
            m.median_ms = r.median_s * 1e3
            m.low_ms = min(r.iqr_s / 2, r.median_s - r.min_s) * 1e3
            m.high_ms = r.iqr_s / 2 * 1e3
        out.append(m)
    return out


def _series(points: list[Mark], method: str, batch: int) -> list[Mark]:
    return sorted((p for p in points if p.method == method and p.batch == batch), key=lambda p: p.n)


def _draw_measured(axes, points: list[Mark], methods: list[str], batches: list[int]) -> None:
    time_ax, memory_ax = axes
    for i, method in enumerate(methods):
        for j, batch in enumerate(batches):
            style = {"color": f"C{i}", "linestyle": LINE_STYLES[j % len(LINE_STYLES)], "marker": "o"}
            label = method if len(batches) == 1 else f"{method} B={batch}"
            timed = [p for p in _series(points, method, batch) if p.kind == "measured"]
            if timed:
                time_ax.errorbar([p.n for p in timed], [p.median_ms for p in timed], capsize=3, label=label,
                                 yerr=[[p.low_ms for p in timed], [p.high_ms for p in timed]], **style)  # fmt: skip
            sized = [p for p in _series(points, method, batch) if p.peak_mib and p.kind != "failed"]
            if sized:
                memory_ax.plot([p.n for p in sized], [p.peak_mib for p in sized], label=label, **style)
    noisy = [p for p in points if p.noisy and p.kind == "measured"]
    if noisy:
        time_ax.scatter([p.n for p in noisy], [p.median_ms for p in noisy], s=160, facecolors="none",
                        edgecolors="red", zorder=3,
                        label=f"noisy: IQR > {NOISY_IQR_FRACTION:.0%} of median or median > "
                              f"{NOISY_MEDIAN_OVER_MIN:g}x min")  # fmt: skip


def _draw_unmeasured(ax, points: list[Mark], methods: list[str]) -> None:
    """A marker per point without a time, on the bottom edge (x in data, y in axes coordinates), one row per
    method so that methods refused at the same N do not hide each other."""
    transform = ax.get_xaxis_transform()
    for kind, marker in UNMEASURED_MARKERS.items():
        shown = [p for p in points if p.kind == kind]
        for p in shown:
            i = methods.index(p.method)
            y = 0.03 + 0.04 * i
            ax.scatter([p.n], [y], marker=marker, color=f"C{i}", s=50, transform=transform, clip_on=False, zorder=3)
            ax.annotate(f"{p.method}: {kind}", (p.n, y), xycoords=transform, xytext=(6, -3),
                        textcoords="offset points", fontsize=7, color=f"C{i}")  # fmt: skip
        if shown:  # one legend entry per reason, in black: the colour is the method's
            ax.scatter([], [], marker=marker, color="black", label=f"{kind} (edge marker)")


def plot_time_vs_n(results: list[Result], path: str | os.PathLike, title: str = "") -> Path:
    """Write a PNG with the time and the peak memory panels."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # no pyplot: no global backend state
    from matplotlib.figure import Figure

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    points = marks(results)
    methods = list(dict.fromkeys(r.method for r in results))
    batches = sorted({r.batch for r in results})
    fig = Figure(figsize=(13, 5.5))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    _draw_measured(axes, points, methods, batches)
    _draw_unmeasured(axes[0], points, methods)
    decode = any(r.mode == "decode" for r in results)
    labels = (("median ms per decode step" if decode else "median ms per call") + " (bars: IQR)", "peak MiB")
    drawn = (any(p.kind == "measured" for p in points), any(p.peak_mib for p in points if p.kind != "failed"))
    lengths = [r.n for r in results if r.n > 0] or [1]
    for ax, ylabel, has_data in zip(axes, labels, drawn, strict=True):
        ax.set_xscale("log", base=2)
        ax.set_xlim(min(lengths) / 1.5, max(lengths) * 1.5)  # fixed: edge markers alone do not set the limits
        if has_data:
            ax.set_yscale("log")
        else:
            ax.text(0.5, 0.5, "nothing measured", ha="center", transform=ax.transAxes)
        ax.set_xlabel("prefill length N before the step" if decode else "sequence length N")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    axes[0].set_title("time")
    axes[1].set_title("peak memory (measured calls)")
    fig.suptitle(title or "leetdecoding: time and memory against N")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path
