"""The command line and the benchmark engine, run in-process on tiny shapes."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from leetdecoding import dispatch
from leetdecoding.bench import PeakMemory, SweepConfig, run_sweep, time_call
from leetdecoding.cli import main
from leetdecoding.methods import REGISTRY
from leetdecoding.methods.naive import reference, relative_error

from .runnable import RUNNABLE_ON_CPU

TINY_BENCH = ["bench", "--device", "cpu", "--heads", "2", "--dk", "16", "--repeats", "1", "--no-progress"]


def table_rows(text: str) -> list[list[str]]:
    """The cells of every body row of the rich tables in `text`."""
    return [[c.strip() for c in line.split("│")[1:-1]] for line in text.splitlines() if line.startswith("│")]


def read_csv(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


# ----- info and check -----


def test_info_lists_every_method_as_available(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert torch.__version__ in out
    rows = {r[0]: r for r in table_rows(out) if r and r[0] in REGISTRY}
    assert set(rows) == set(REGISTRY)
    for name, row in rows.items():
        assert (row[-1] == "available here") == (name in RUNNABLE_ON_CPU), (name, row)


def test_info_explains_an_unavailable_method(capsys, monkeypatch):
    monkeypatch.setattr(REGISTRY["fleet"], "unavailable_reason", lambda: "needs the frobnicator package")
    assert main(["info"]) == 0
    rows = {r[0]: r for r in table_rows(capsys.readouterr().out) if r and r[0] in REGISTRY}
    assert rows["fleet"][-1] == "needs the frobnicator package"


def test_check_quick_passes_every_method_and_dtype(capsys):
    assert main(["check", "--quick", "--device", "cpu"]) == 0
    rows = [r for r in table_rows(capsys.readouterr().out) if r and r[0] in RUNNABLE_ON_CPU]
    per_head = {(n, str(d).replace("torch.", "")) for n, m in REGISTRY.items() for d in m.dtypes}
    per_token = {(n, f"{d} per-token") for n, d in per_head if REGISTRY[n].per_token_decay}
    assert {(r[0], r[1]) for r in rows} == {(n, d) for n, d in per_head | per_token if n in RUNNABLE_ON_CPU}
    assert all(r[3] == "PASS" for r in rows), [r for r in rows if r[3] != "PASS"]
    assert all(0 <= float(r[2]) <= 1 for r in rows)


def test_check_fails_a_wrong_method(capsys, monkeypatch):
    method = REGISTRY["vanilla"]
    right = method.forward

    def slightly_wrong(x, **options):
        o, state = right(x, **options)
        return o * (1 + 1e-2), state

    monkeypatch.setattr(method, "forward", slightly_wrong)
    assert main(["check", "--quick", "--device", "cpu"]) == 1
    rows = [r for r in table_rows(capsys.readouterr().out) if r and r[0] in REGISTRY]
    assert {r[3] for r in rows if r[0] == "vanilla"} == {"FAIL"}
    assert {r[3] for r in rows if r[0] == "chunked"} == {"PASS"}


def test_check_skips_a_refusing_method_with_its_reason(capsys, monkeypatch):
    monkeypatch.setattr(REGISTRY["recursion"], "unavailable_reason", lambda: "needs the frobnicator package")
    assert main(["check", "--quick", "--device", "cpu"]) == 0
    rows = [r for r in table_rows(capsys.readouterr().out) if r and r[0] == "recursion"]
    assert rows and all(r[3] == "SKIP" and "frobnicator" in r[4] for r in rows)


# ----- bench -----


def test_bench_writes_table_csv_json_plot_and_history(tmp_path, capsys):
    argv = [*TINY_BENCH, "--n", "64,128", "--methods", "chunked,vanilla", "--out", str(tmp_path)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "GFLOP/s" in out and "torch.mm fp32" in out
    rows = read_csv(tmp_path / "results.csv")
    assert sorted((r["method"], int(r["n"])) for r in rows) == [
        ("chunked", 64), ("chunked", 128), ("vanilla", 64), ("vanilla", 128)
    ]
    for r in rows:
        assert r["status"] == "ok", r
        assert float(r["median_ms"]) > 0 and float(r["gflops"]) > 0
        assert float(r["error"]) < 1e-4
        assert r["auto"] in REGISTRY
    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc["machine"]["torch"] == torch.__version__ and doc["machine"]["mm_gflops"] > 0
    assert [(r["method"], r["n"]) for r in doc["results"]] == [(r["method"], int(r["n"])) for r in rows]
    assert all(r["median_ms"] > 0 for r in doc["results"])
    assert (tmp_path / "time_vs_n.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    history = read_csv(tmp_path / "history.csv")
    assert len(history) == 4 and history[0]["torch"] == torch.__version__ and history[0]["date"]

    assert main(argv) == 0  # a second run appends to the history, after one header
    assert len(read_csv(tmp_path / "history.csv")) == 8


def test_bench_explicit_paths(tmp_path):
    names = {"csv": "a.csv", "json": "b.json", "plot": "c.png"}
    paths = {k: tmp_path / "x" / name for k, name in names.items()}
    argv = [*TINY_BENCH, "--n", "32", "--methods", "chunked", "--out", str(tmp_path / "out"), "--no-history"]
    argv += [a for k, p in paths.items() for a in (f"--{k}", str(p))]
    assert main(argv) == 0
    assert all(p.exists() for p in paths.values())
    assert not (tmp_path / "out").exists()


def test_bench_skips_over_the_time_budget(tmp_path, capsys):
    argv = [*TINY_BENCH, "--n", "32,64", "--methods", "recurrent", "--time-budget", "1e-9"]
    argv += ["--out", str(tmp_path)]
    assert main(argv) == 0
    rows = {int(r["n"]): r for r in read_csv(tmp_path / "results.csv")}
    assert rows[32]["status"] == "ok"  # nothing to predict from yet
    assert rows[64]["status"] == "skip"
    assert rows[64]["reason"].startswith("predicted ") and "> budget" in rows[64]["reason"]
    assert "predicted" in capsys.readouterr().out


def test_bench_skips_what_does_not_fit_in_memory(tmp_path, monkeypatch):
    monkeypatch.setattr(dispatch, "available_memory", lambda device: 1 << 10)
    argv = [*TINY_BENCH, "--n", "32", "--methods", "chunked,fleet", "--out", str(tmp_path)]
    assert main(argv) == 0
    rows = read_csv(tmp_path / "results.csv")
    assert len(rows) == 2
    assert all(r["status"] == "skip" and r["reason"].startswith("needs about") for r in rows)


def test_bench_marks_a_wrong_result_and_gives_no_speed(tmp_path, monkeypatch, capsys):
    method = REGISTRY["recursion"]
    right = method.forward
    monkeypatch.setattr(method, "forward", lambda x, **o: (right(x, **o)[0] * 1.001, None))
    argv = [*TINY_BENCH, "--n", "32", "--methods", "chunked,recursion", "--out", str(tmp_path)]
    assert main(argv) == 1
    rows = {r["method"]: r for r in read_csv(tmp_path / "results.csv")}
    assert rows["chunked"]["status"] == "ok"
    assert rows["recursion"]["status"] == "wrong" and rows["recursion"]["gflops"] == ""
    assert "WRONG" in capsys.readouterr().out


def test_bench_rejects_bad_arguments(capsys):
    for argv in (["bench", "--methods", "nope"], ["bench", "--n", "0"], ["bench", "--decay", "1.5,0.9"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2, argv
    assert "nope" in capsys.readouterr().err


# ----- the engine as a library -----


def test_run_sweep_as_a_library():
    cfg = SweepConfig(methods=["chunked", "recurrent"], lengths=[40, 20], heads=2, dk=8, dv=12, repeats=2)
    results = run_sweep(cfg)
    order = [("chunked", 20), ("recurrent", 20), ("chunked", 40), ("recurrent", 40)]
    assert [(r.method, r.n) for r in results] == order
    assert all(r.status == "ok" and r.median_s > 0 and r.repeats == 2 and r.error < 1e-5 for r in results)
    assert all(r.min_s <= r.median_s <= r.max_s for r in results)


def test_time_call_measures_sleeps():
    stats = time_call(lambda: time.sleep(0.01), repeats=3, warmup=1, device="cpu")
    assert stats.repeats == 3 and 0.009 < stats.min <= stats.median <= stats.max < 0.5
    capped = time_call(lambda: time.sleep(0.01), repeats=50, warmup=0, device="cpu", budget_s=0.03)
    assert 1 <= capped.repeats < 10


def test_peak_memory_sees_a_large_allocation():
    with PeakMemory("cpu") as peak:
        t = torch.ones(64 << 18)  # 64 MiB, written so that the pages are resident
        del t
    if peak.bytes is None:
        pytest.skip("no /proc/self/clear_refs here")
    assert 60 << 20 <= peak.bytes < 512 << 20


def test_reference_matches_the_closed_form():
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(2, 2, 2, 7, 3, generator=g, dtype=torch.float64)
    v = torch.randn(2, 2, 7, 4, generator=g, dtype=torch.float64)
    s0 = torch.randn(2, 2, 3, 4, generator=g, dtype=torch.float64)
    lam = torch.tensor([0.9, 0.5], dtype=torch.float64).view(1, 2, 1, 1)
    t = torch.arange(7, dtype=torch.float64)
    d = (t[:, None] - t[None, :]).clamp(min=0)
    mask = torch.where(t[:, None] >= t[None, :], lam ** d, torch.zeros(()))
    want = ((q @ k.transpose(-1, -2)) * mask) @ v + (q * lam ** (t[:, None] + 1)) @ s0
    ref = reference(q, k, v, lam.flatten(), s0, scale=1.0)
    assert relative_error(ref.o, want, ref.o_abs) < 1e-13
    assert relative_error(ref.o * 1.001, want, ref.o_abs) > 1e-4


# ----- the installed entry points -----


def test_python_dash_m_and_console_script():
    env = {**os.environ, "COLUMNS": "200"}
    argv = [sys.executable, "-m", "leetdecoding", "info"]
    done = subprocess.run(argv, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert all(name in done.stdout for name in REGISTRY)
    script = Path(sys.executable).with_name("leetdecoding")
    if not script.exists():
        pytest.skip("console script not installed next to this interpreter")
    done = subprocess.run([str(script), "bench", "--help"], capture_output=True, text=True, env=env)
    assert done.returncode == 0 and "--time-budget" in done.stdout
