"""The time-against-N plot of a sweep: log-log, one colour per method, one line style per batch size."""

from __future__ import annotations

import os
from pathlib import Path

from .sweep import Result

LINE_STYLES = ["-", "--", ":", "-."]


def plot_time_vs_n(results: list[Result], path: str | os.PathLike, title: str = "") -> Path:
    """Write a PNG of the median time of every measured case; skipped and wrong cases are left out."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # no pyplot: no global backend state
    from matplotlib.figure import Figure

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    methods = list(dict.fromkeys(r.method for r in results))
    batches = sorted({r.batch for r in results})
    fig = Figure(figsize=(7, 5))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for i, method in enumerate(methods):
        for j, batch in enumerate(batches):
            pts = sorted((r.n, r.median_s * 1e3) for r in results
                         if r.method == method and r.batch == batch and r.status == "ok")
            if not pts:
                continue
            label = method if len(batches) == 1 else f"{method} B={batch}"
            ns, ms = zip(*pts, strict=True)
            style = LINE_STYLES[j % len(LINE_STYLES)]
            ax.plot(ns, ms, marker="o", color=f"C{i}", linestyle=style, label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length N")
    ax.set_ylabel("median time per call (ms)")
    ax.set_title(title or "leetdecoding: time against N")
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path
