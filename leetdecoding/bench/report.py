"""Tables for the command line: methods available here, check results, benchmark results.

rich's tables when rich is installed (the [cli] / [bench] extras), the same tables in plain text otherwise
(`bench.plain`). `fitted` sizes a table's columns to the terminal so that no word is split.
"""

from __future__ import annotations

from ..methods import REGISTRY
from ..methods.decode import DECODE_REGISTRY
from . import plain
from .check import CheckResult

try:
    from rich.table import Table
except ImportError:  # a plain `pip install`: no extras
    from .plain import Table

STATUS_STYLE = {"PASS": "green", "FAIL": "bold red", "SKIP": "yellow"}


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def availability(name: str, device: str) -> str:
    """"available here", or why the method (an attention or decode method) cannot run on `device` here."""
    m = REGISTRY[name] if name in REGISTRY else DECODE_REGISTRY[name]
    missing = m.unavailable_reason()
    if missing:
        return missing
    if device not in m.devices:
        return f"runs on {'/'.join(m.devices)}, not {device}"
    return "available here"


def _method_cells(m: dict, device: str) -> dict[str, str]:
    here = availability(m["name"], device)
    return {
        "method": m["name"], "for": m["operation"], "backend": m["backend"], "devices": ", ".join(m["devices"]),
        "dtypes": ", ".join(m["dtypes"]), "time": m["time"], "memory": m["memory"], "grad": _yes(m["grad"]),
        "here": f"[green]{here}[/]" if here == "available here" else f"[yellow]{here}[/]",
    }


def _table(title: str, columns: tuple[str, ...], rows: list[dict[str, str]]) -> Table:
    t = Table(title=title)
    for col in columns:
        t.add_column(col)
    for r in rows:
        t.add_row(*(r[c] for c in columns))
    return t


ALL_COLUMNS = ("method", "for", "backend", "devices", "dtypes", "time", "memory", "grad", "here")
# Where the whole table cannot fit without splitting words (80 columns): what each method costs, then whether it
# can run here, each under the method's name.
NARROW_COLUMNS = (("method", "devices", "dtypes", "time", "memory"), ("method", "for", "backend", "grad", "here"))


def methods_tables(methods: list[dict], device: str, width: int = 400) -> list[Table]:
    """One row per method of `leetdecoding.list_methods()`: one table, or two where one is wider than `width`."""
    rows = [_method_cells(m, device) for m in methods]
    title = f"methods (device: {device})"
    if min_width(ALL_COLUMNS, rows) <= width:
        return [fitted(_table(title, ALL_COLUMNS, rows), width)]
    costs, here = NARROW_COLUMNS
    return [fitted(_table(f"{title}: cost", costs, rows), width), fitted(_table(title, here, rows), width)]


def min_width(columns: tuple[str, ...], rows: list[dict[str, str]]) -> int:
    """The narrowest a table of these columns prints without splitting a word."""
    cells = [list(columns)] + [[plain.strip_markup(r[c]) for c in columns] for r in rows]
    return plain.frame_width(plain.column_words(cells, len(columns)))


def fitted(table: Table, width: int) -> Table:
    """`table`, its columns sized within `width` (never below their longest word, so that no word is split);
    a plain table does this when it is printed."""
    if isinstance(table, plain.Table):
        return table
    columns = table.columns
    cells = [[str(c.header) for c in columns]]
    cells += [list(row) for row in zip(*([plain.strip_markup(str(x)) for x in c.cells] for c in columns))]
    for column, w in zip(columns, plain.fit_widths(cells, len(columns), width)):
        column.width = max(w, 1)
    return table


def key_value_table(title: str, items: dict[str, str]) -> Table:
    t = Table(title=title, show_header=False)
    t.add_column("key", style="bold")
    t.add_column("value")
    for k, v in items.items():
        t.add_row(k, str(v))
    return t


def check_table(results: list[CheckResult], device: str) -> Table:
    t = Table(title=f"every method against the fp64 reference on {device}")
    for col in ("method", "dtype", "worst error / tolerance", "result", "detail"):
        t.add_column(col)
    for r in results:
        worst = "" if r.worst is None else f"{r.worst:.3g}"
        t.add_row(r.method, r.dtype, worst, f"[{STATUS_STYLE[r.status]}]{r.status}[/]", r.detail)
    return t


def _num(value: float | None, fmt: str) -> str:
    return "" if value is None else format(value, fmt)


def _ms(value: float | None) -> str:
    """Milliseconds with about three significant digits and no exponent."""
    if value is None:
        return ""
    digits = 0 if value >= 100 else 1 if value >= 10 else 2 if value >= 1 else 3
    return f"{value:.{digits}f}"


def _note(status: str, reason: str) -> str:
    if status == "ok":
        return ""
    if status == "wrong":
        return f"[bold red]WRONG[/] {reason}"
    if status == "error":
        return f"[red]{reason}[/]"
    return f"[yellow]skip: {reason}[/]"


def _spread_note(r: dict) -> str:
    """Whether the timing can be trusted: noisy after its re-measurements, or stable only after some."""
    if r["median_ms"] is None or not r["rounds"]:
        return ""
    rounds = f"{r['rounds']} round{'s' if r['rounds'] > 1 else ''} of {r['repeats']} x {r['calls_per_sample']} calls"
    if r["noisy"]:
        return f"[bold yellow]noisy[/] ({rounds})"
    return f"re-measured: stable after {rounds}" if r["rounds"] > 1 else ""


def _iqr_percent(r: dict) -> str:
    return "" if r["iqr_ms"] is None or not r["median_ms"] else f"{r['iqr_ms'] / r['median_ms']:.0%}"


def bench_table(rows: list[dict], title: str) -> Table:
    """Rows of `export.result_row`; a new section for each (batch, N). Decode rows give ms and tokens/s per step;
    a noisy median is marked "~" and explained in the note."""
    decode = any(r.get("mode") == "decode" for r in rows)
    rate = ("tok/s", lambda r: _num(r["tokens_per_s"], ".0f")) if decode else (
        "of mm", lambda r: _num(r["mm_fraction"], ".0%"))  # fmt: skip
    t = Table(title=title)
    for col, justify in (
        ("method", "left"), ("N", "right"), ("B", "right"), ("ms/step" if decode else "median ms", "right"),
        ("min ms", "right"), ("IQR", "right"), ("GFLOP/s", "right"), (rate[0], "right"), ("peak MiB", "right"),
        ("error", "right"), ("auto", "left"), ("note", "left"),
    ):
        t.add_column(col, justify=justify, overflow="fold")
    previous = None
    for r in rows:
        if previous is not None and (r["batch"], r["n"]) != previous:
            t.add_section()
        previous = (r["batch"], r["n"])
        measured = r["status"] in ("ok", "wrong")
        peak = "n/a" if r["peak_mib"] is None and measured else _num(r["peak_mib"], ".1f")
        median = ("~" if r["noisy"] else "") + _ms(r["median_ms"])
        note = "; ".join(n for n in (_note(r["status"], r["reason"]), _spread_note(r)) if n)
        t.add_row(
            r["method"], str(r["n"]), str(r["batch"]), median, _ms(r["min_ms"]), _iqr_percent(r),
            _num(r["gflops"], ".1f"), rate[1](r), peak, _num(r["error"], ".1e"), r["auto"], note,
        )
    return t


def tune_tables(rows: list, values: dict[str, int], defaults: dict[str, int]) -> list[Table]:
    """`leetdecoding tune`'s measurements (`bench.tune.Measurement`) and the values it found."""
    t = Table(title="measurements (ms, median)")
    for col in ("value", "case", "contender", "ms"):
        t.add_column(col, justify="right" if col == "ms" else "left")
    for r in rows:
        t.add_row(r.value, r.case, r.contender, f"{r.median_ms:.3f}")
    chosen = Table(title="what auto will use")
    for col in ("value", "default", "measured"):
        chosen.add_column(col)
    for name, value in values.items():
        chosen.add_row(name, str(defaults[name]), str(value))
    return [t, chosen]
