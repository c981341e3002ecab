"""The command line: `leetdecoding info | check | bench | tune`.

    leetdecoding info                   versions, device, and every method with why it can or cannot run here
    leetdecoding check [--quick]        every method against the fp64 reference; exit status 1 on a failure
    leetdecoding bench [options]        time / memory sweep over N and batch: table, CSV, JSON, plot, history
    leetdecoding tune [options]         measure this machine and write the table that "auto" uses

Every command but `bench` works after a plain install, printing plain-text tables without rich; `bench` needs rich
and matplotlib (`pip install 'leetdecoding-attention[bench]'`) and says so in one line. rich and matplotlib are
imported only when a command runs.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from . import __version__, extras
from .cli_help import DefaultsParser
from .inputs import dtype_name

if TYPE_CHECKING:
    from rich.console import Console

    from .bench import SweepConfig

DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}
# what a command needs beyond a plain install, from the extra of its name; checked before it starts (not after a
# sweep's minutes)
REQUIRES = {"bench": ("rich", "matplotlib")}


class UsageError(Exception):
    """A command-line value that parses but makes no sense here; reported like an argparse error."""


def _int_list(text: str) -> list[int]:
    try:
        values = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _float_list(text: str) -> list[float]:
    try:
        values = [float(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError(f"expected at least one number, got {text!r}")
    return values


def _name_list(text: str) -> list[str]:
    """Attention or decode method names (bench checks them against its --mode)."""
    from .methods import REGISTRY
    from .methods.decode import DECODE_REGISTRY

    known = [*REGISTRY, *DECODE_REGISTRY]
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown methods {unknown or text!r}; known: {', '.join(known)}")
    return names


def _at_least(kind: type, low: float, strict: bool):
    """An argparse type: `kind(text)`, which must be > low (strict) or >= low."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__}, got {text!r}") from None
        if value < low or (strict and value == low):
            raise argparse.ArgumentTypeError(f"expected {'>' if strict else '>='} {low:g}, got {text!r}")
        return value

    return parse


def _positive(kind: type):
    return _at_least(kind, 0, strict=True)


def _console() -> Console:
    """rich's console, or without rich (a plain install) one that prints the same tables in plain text."""
    try:
        from rich.console import Console
    except ImportError:
        from .bench.plain import Console

        return Console()
    console = Console()
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(width=400)  # a log file or a pipe: do not wrap the tables at 80 columns
    return console


def _device(name: str | None) -> str:
    from .bench.machine import default_device

    device = name or default_device()
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: CUDA is not available to torch here")
    return device


# ----- info -----


def cmd_info(args: argparse.Namespace) -> int:
    import leetdecoding as ld

    from .bench import machine
    from .bench.report import fitted, key_value_table, methods_tables

    console = _console()
    device = machine.default_device()
    console.print(fitted(key_value_table("versions", machine.versions()), console.width))
    hw = {"cpu": machine.cpu_summary()}
    hw["cuda"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "not available"
    hw["tuning"] = _tuning_summary(device)
    console.print(fitted(key_value_table("device", hw), console.width))
    for table in methods_tables(ld.list_methods(), device, console.width):
        console.print(table)
    return 0


def _tuning_summary(device: str) -> str:
    from . import tuning

    path = tuning.table_path()
    if path is None:
        return f"off ({tuning.ENV}=off): the dispatcher's defaults"
    lines = []
    for name, dtype in DTYPES.items():
        values, _ = tuning.lookup(device, dtype)
        if values:
            shown = ", ".join(f"{k}={v}" for k, v in values.items() if k != "measured")
            lines.append(f"{name}: {shown} (measured {values.get('measured', '?')})")
    if not lines:
        return f"no entry for this {device} in {path}: the dispatcher's defaults (leetdecoding tune)"
    return "\n".join([str(path), *lines])


# ----- check -----


def cmd_check(args: argparse.Namespace) -> int:
    from .bench.check import run_check
    from .bench.report import check_table, fitted
    from .methods.naive import TOLERANCE

    console = _console()
    device = _device(args.device)
    results = run_check(device, quick=args.quick)
    console.print(fitted(check_table(results, device), console.width))
    counts = {s: sum(r.status == s for r in results) for s in ("PASS", "FAIL", "SKIP")}
    tolerances = ", ".join(f"{dtype_name(d)} {t:g}" for d, t in TOLERANCE.items())
    console.print(f"tolerances (error / magnitude of the summed terms): {tolerances}")
    console.print(f"{counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped")
    return 1 if counts["FAIL"] else 0


# ----- bench -----


def _sweep_config(args: argparse.Namespace) -> SweepConfig:
    import leetdecoding as ld

    from .bench import SweepConfig
    from .bench.command import runnable
    from .methods import REGISTRY
    from .methods.decode import DECODE_REGISTRY

    registry = DECODE_REGISTRY if args.mode == "decode" else REGISTRY
    wrong = [m for m in args.methods or [] if m not in registry]
    if wrong:
        raise UsageError(f"--methods {','.join(wrong)}: not {args.mode} methods; known: {', '.join(registry)}")

    if args.per_token and args.mode == "decode":
        raise UsageError("--per-token: the decode mode times steps with a decay per head; use forward or backward")
    log_decay = None  # the sweep's default: MiniMax layer 0 of 12
    if args.decay is not None:
        if len(args.decay) not in (1, args.heads):
            raise UsageError(f"--decay takes 1 or --heads ({args.heads}) values; got {len(args.decay)}")
        try:
            log_decay = ld.decay.from_decay(torch.tensor(args.decay, dtype=torch.float64))
        except ValueError as e:
            raise UsageError(f"--decay: {e}") from None
        log_decay = log_decay.expand(args.heads).contiguous()
    return SweepConfig(
        device=_device(args.device),
        dtype=DTYPES[args.dtype],
        methods=args.methods or runnable(registry, _device(args.device)),
        lengths=sorted(set(args.n)),
        batches=sorted(set(args.batch)),
        heads=args.heads,
        dk=args.dk,
        dv=args.dv or args.dk,
        repeats=args.repeats,
        warmup=args.warmup,
        time_budget=args.time_budget,
        log_decay=log_decay,
        mode=args.mode,
        max_rounds=args.max_rounds,
        per_token=args.per_token,
    )


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import command
    from .bench.export import result_row
    from .bench.report import bench_table

    console = _console()
    cfg = _sweep_config(args)
    info = command.machine_info(cfg, console.print)
    results = command.run_with_progress(cfg, console, not args.no_progress and console.is_terminal)
    rows = [result_row(r, info["mm_gflops"]) for r in results]
    console.print(bench_table(rows, command.table_title(cfg, args.dtype)))
    console.print(command.spread_summary(results))
    for path in command.write_outputs(args, cfg, results, rows, info):
        console.print(f"wrote {path}")
    bad = [r for r in results if r.status in ("wrong", "error")]
    if bad:
        console.print(f"[bold red]{len(bad)} case(s) wrong or failed[/]")
    return 1 if bad else 0


# ----- tune -----


def cmd_tune(args: argparse.Namespace) -> int:
    from . import tuning
    from .bench.report import fitted, tune_tables
    from .bench.tune import Plan, measure
    from .dispatch import TUNABLE

    console = _console()
    device = _device(args.device)
    dtype = DTYPES[args.dtype]
    if dtype == torch.float64:
        raise UsageError("--dtype float64 is the reference dtype; tune float32, float16 or bfloat16")
    path = Path(args.out).expanduser() if args.out else tuning.table_path()
    if path is None and not args.dry_run:
        raise UsageError(f"{tuning.ENV}=off: pass --out PATH or --dry-run")
    key = tuning.device_key(device)
    console.print(f"tuning {key}, {args.dtype}: H={args.heads}, D={args.dim}, median of {args.rounds} interleaved")
    plan = Plan.quick() if args.quick else Plan()
    values, rows = measure(device, dtype, args.heads, args.dim, args.rounds, plan, progress=console.print)

    for table in tune_tables(rows, values, TUNABLE):
        console.print(fitted(table, console.width))
    if args.dry_run:
        console.print("--dry-run: nothing written")
        return 0
    written = tuning.save(device, dtype, values, path)
    if written == tuning.table_path():
        console.print(f"written to {written}; auto uses it for {key}, {args.dtype} ({tuning.ENV}=off ignores it)")
    else:
        console.print(f"written to {written}; auto reads {tuning.table_path()}: set {tuning.ENV}={written} to use it")
    return 0


# ----- parser -----


def build_parser() -> argparse.ArgumentParser:
    p = DefaultsParser(prog="leetdecoding", description="Exponentially decaying causal linear attention.")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__} ({extras.DISTRIBUTION})")
    sub = p.add_subparsers(
        dest="command", required=True, metavar="{info,check,bench,tune}", parser_class=DefaultsParser
    )

    info = sub.add_parser("info", help="versions, device, and which methods can run here")
    info.set_defaults(func=cmd_info)

    check = sub.add_parser("check", help="every method against the fp64 reference (exit 1 on a failure)")
    check.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda if available, else cpu")
    check.add_argument("--quick", action="store_true", help="fewer lengths (N = 1, 65)")
    check.set_defaults(func=cmd_check)

    from .bench.command import MODES

    b = sub.add_parser("bench", help="time and memory sweep over N and batch (exit 1 if a result is wrong)")
    b.add_argument("--mode", choices=list(MODES), default="forward",
                   help="forward; backward = forward + backward; decode = ms per token and tokens/s")
    b.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda if available, else cpu")
    b.add_argument("--dtype", choices=list(DTYPES), default="float32", help="dtype of q, k, v")
    b.add_argument("--methods", type=_name_list,
                   help="comma list (default: every method of the mode that can run here; decode: decode methods)")
    b.add_argument("--n", type=_int_list, default="256,1024,4096,16384",
                   help="comma list of lengths (decode: of the prefill before the timed steps)")
    b.add_argument("--batch", type=_int_list, default="1", help="comma list of batch sizes")
    b.add_argument("--heads", type=_positive(int), default=8, help="heads H")
    b.add_argument("--dk", type=_positive(int), default=128, help="head dim of q and k")
    b.add_argument("--dv", type=_positive(int), help="default: --dk")
    b.add_argument("--repeats", type=_positive(int), default=5,
                   help="timed samples per case (a sample is one call, or several for a fast call)")
    b.add_argument("--max-rounds", type=_positive(int), default=3,
                   help="measurements of a noisy case: again with twice the calls per sample, within --time-budget")
    b.add_argument("--warmup", type=_at_least(int, 0, strict=False), default=1,
                   help="untimed calls first (the first, or one extra, measures memory and error)")
    b.add_argument("--time-budget", type=_positive(float), default=10.0,
                   help="seconds per case, re-measurements included; a case predicted to take longer is skipped")
    b.add_argument("--decay", type=_float_list, help="lambda per head, comma list (default: MiniMax 0 of 12)")
    b.add_argument("--per-token", action="store_true",
                   help="a decay per token: each head's lambda times a seeded factor in [0.5, 1] per token")
    b.add_argument("--out", default="bench-results", help="folder for results.csv/json, plot, history.csv")
    b.add_argument("--csv", help="results CSV (default: OUT/results.csv)")
    b.add_argument("--json", help="results JSON (default: OUT/results.json)")
    b.add_argument("--plot", help="time and memory against N, PNG (default: OUT/time_vs_n.png)")
    b.add_argument("--history", help="history CSV to append to (default: OUT/history.csv)")
    b.add_argument("--no-history", action="store_true", help="do not append to the history CSV")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    b.set_defaults(func=cmd_bench)

    t = sub.add_parser("tune", help="measure this machine and write the table that auto uses")
    t.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda if available, else cpu")
    t.add_argument("--dtype", choices=[d for d in DTYPES if d != "float64"], default="float32")
    t.add_argument("--heads", type=_positive(int), default=8)
    t.add_argument("--dim", type=_positive(int), default=128, help="head dim of the large-head measurements")
    t.add_argument("--rounds", type=_positive(int), default=5, help="timed calls per contender, interleaved")
    t.add_argument("--quick", action="store_true", help="shorter sequences, the same candidates (for a first look)")
    t.add_argument("--out", help="table to write (default: $LEETDECODING_TUNING or ~/.cache/leetdecoding/tuning.json)")
    t.add_argument("--dry-run", action="store_true", help="measure and print; write nothing")
    t.set_defaults(func=cmd_tune)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    absent = extras.missing(REQUIRES.get(args.command, ()))
    if absent:  # one line, not a traceback
        hint = extras.install_hint(args.command)  # the extra named after the command
        parser.exit(2, f"leetdecoding {args.command}: needs {' and '.join(absent)}: {hint}\n")
    try:
        return args.func(args)
    except UsageError as e:
        parser.exit(2, f"leetdecoding {args.command}: error: {e}\n")


if __name__ == "__main__":
    sys.exit(main())
