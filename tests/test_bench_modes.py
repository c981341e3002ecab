"""`leetdecoding bench`'s modes (forward, backward, decode), its spread and noise flags, and its plot data, on tiny
shapes on CPU. Timing values are never asserted, only their relations (min <= median, tokens/s = B / ms)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from leetdecoding import dispatch
from leetdecoding.bench import SweepConfig, run_sweep, timing
from leetdecoding.bench.cases import DECODE_CHECK_TOKENS, DecodeCase
from leetdecoding.bench.export import HISTORY_COLUMNS, append_history
from leetdecoding.bench.plot import marks
from leetdecoding.cli import main
from leetdecoding.methods.decode import DECODE_REGISTRY
from leetdecoding.methods.naive import TOLERANCE, reference

TINY = ["bench", "--device", "cpu", "--heads", "2", "--dk", "16", "--repeats", "3", "--no-progress", "--no-history"]
MODE_METHODS = {"forward": "chunked,recurrent", "backward": "chunked,recurrent", "decode": "recurrent_step"}


def read_csv(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


def tiny_config(**kw) -> SweepConfig:
    return SweepConfig(**{"lengths": [24], "heads": 2, "dk": 8, "dv": 12, "repeats": 3, **kw})


@pytest.mark.parametrize("mode", list(MODE_METHODS))
def test_each_mode_checks_then_reports_min_median_iqr(mode, tmp_path):
    argv = [*TINY, "--mode", mode, "--n", "16,40", "--batch", "1,2", "--methods", MODE_METHODS[mode]]
    assert main([*argv, "--out", str(tmp_path)]) == 0
    rows = read_csv(tmp_path / "results.csv")
    methods = MODE_METHODS[mode].split(",")
    assert sorted((r["method"], int(r["n"]), int(r["batch"])) for r in rows) == sorted(
        (m, n, b) for m in methods for n in (16, 40) for b in (1, 2)
    )
    for r in rows:
        assert r["mode"] == mode and r["status"] == "ok", r
        assert float(r["error"]) <= TOLERANCE[torch.float32]
        assert 0 < float(r["min_ms"]) <= float(r["median_ms"]) <= float(r["max_ms"])
        assert float(r["iqr_ms"]) >= 0 and r["noisy"] in ("True", "False")
        assert int(r["repeats"]) >= 1 and int(r["rounds"]) >= 1 and int(r["calls_per_sample"]) >= 1
        if mode == "decode":  # B tokens per step
            assert float(r["tokens_per_s"]) == pytest.approx(int(r["batch"]) / (float(r["median_ms"]) / 1e3), 1e-5)
        else:
            assert r["tokens_per_s"] == ""
    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc["config"]["mode"] == mode
    assert all({"min_ms", "median_ms", "iqr_ms", "noisy"} <= set(r) for r in doc["results"])
    assert (tmp_path / "time_vs_n.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_decode_follows_the_reference_with_the_state_updated_in_place():
    cfg = tiny_config(dtype=torch.float64)
    n, method = 10, DECODE_REGISTRY["recurrent_step"]
    case = DecodeCase(cfg, n, batch=2)
    call = case.call(method)
    first = call()
    assert first[1] is case.state  # out_state=state: the step writes the buffer it was given
    assert case.error(method, first) <= TOLERANCE[torch.float64]
    x = case.x  # every check token has been decoded in place from the prefill: the state is the reference's
    ref = reference(x.q, x.k, x.v, x.log_decay.exp())
    assert x.seq_len == n + DECODE_CHECK_TOKENS
    assert torch.allclose(case.state, ref.state, rtol=0, atol=1e-12 * ref.state_abs.max().item())


def test_a_wrong_decode_step_is_marked_wrong(monkeypatch):
    method = DECODE_REGISTRY["recurrent_step"]
    right = method.step

    def slightly_wrong(d):
        o, state = right(d)
        return o * (1 + 1e-3), state

    monkeypatch.setattr(method, "step", slightly_wrong)
    (r,) = run_sweep(tiny_config(mode="decode", methods=["recurrent_step"]))
    assert r.status == "wrong" and r.error > TOLERANCE[torch.float32]
    assert r.gflops is None and r.tokens_per_s is None


def test_backward_checks_the_gradients(monkeypatch):
    (r,) = run_sweep(tiny_config(mode="backward", methods=["chunked"]))
    assert r.status == "ok" and r.error <= TOLERANCE[torch.float32]
    # the fp64 gradients of another output gradient: the same forward, every gradient wrong
    from leetdecoding.bench import cases

    real = cases.fp64_gradients
    monkeypatch.setattr(cases, "fp64_gradients", lambda q, k, v, g, s, do: real(q, k, v, g, s, 2 * do))
    (r,) = run_sweep(tiny_config(mode="backward", methods=["chunked"]))
    assert r.status == "wrong"


def spread_samples(values):
    """A replacement for timing.sample returning `values` in turn (seconds per call), then the last forever."""
    it = iter(values)
    last = [values[-1]]

    def sample(fn, calls, device):
        last[0] = next(it, last[0])
        return last[0]

    return sample


def test_a_noisy_point_is_measured_again_and_flagged(monkeypatch, tmp_path, capsys):
    noisy = [1e-3, 1e-3, 9e-3] * 10  # median 1 ms, IQR 4 ms: noisy in every round
    monkeypatch.setattr(timing, "sample", spread_samples(noisy))
    argv = [*TINY, "--n", "16", "--methods", "chunked", "--max-rounds", "3", "--out", str(tmp_path)]
    assert main(argv) == 0
    (row,) = read_csv(tmp_path / "results.csv")
    assert row["noisy"] == "True" and row["rounds"] == "3"
    assert float(row["iqr_ms"]) == pytest.approx(4.0) and float(row["median_ms"]) == pytest.approx(1.0)
    assert int(row["calls_per_sample"]) >= 4  # twice the calls per sample in each new round
    out = capsys.readouterr().out
    assert "noisy" in out and "~1.00 " in out and "1 still noisy" in out
    (r,) = run_sweep(tiny_config(methods=["chunked"], max_rounds=3))
    (mark,) = marks([r])
    assert mark.noisy and mark.kind == "measured"


def test_a_point_stable_when_measured_again_is_not_flagged(monkeypatch):
    monkeypatch.setattr(timing, "sample", spread_samples([1e-3, 5e-3, 1e-3, 2e-3, 2e-3, 2e-3]))
    (r,) = run_sweep(tiny_config(methods=["chunked"]))
    assert not r.noisy and r.rounds == 2 and r.median_s == 2e-3 and r.iqr_s == 0.0


def test_a_noisy_point_stops_at_the_time_budget(monkeypatch):
    monkeypatch.setattr(timing, "sample", spread_samples([1.0, 1.0, 9.0] * 10))  # seconds: 6 s for the next round
    (r,) = run_sweep(tiny_config(methods=["chunked"], time_budget=5.0))
    assert r.noisy and r.rounds == 1 and r.repeats == 3  # reported as it is, flagged


def test_median_far_above_the_minimum_is_noisy():
    assert timing.TimingStats([1.9e-3, 128e-3, 128e-3, 128e-3, 128e-3]).noisy  # the first make bench's point
    assert not timing.TimingStats([1e-3, 1.02e-3, 1.01e-3]).noisy


def test_refused_and_over_budget_points_carry_their_reason_into_the_plot(monkeypatch, tmp_path):
    monkeypatch.setattr(dispatch, "available_memory", lambda device: int(2.5e6))  # vanilla needs 6 MB at 256
    results = run_sweep(tiny_config(methods=["vanilla", "chunked"], lengths=[256], dk=16, dv=16))
    by_method = {r.method: r for r in results}
    assert by_method["vanilla"].status == "skip" and by_method["vanilla"].reason.startswith("needs about")
    assert by_method["chunked"].status == "ok"
    results += run_sweep(tiny_config(mode="backward", methods=["fleet"]))  # fleet has no gradients
    results += run_sweep(tiny_config(methods=["recurrent"], lengths=[16, 32], time_budget=1e-9))
    kinds = {(m.method, m.n): (m.kind, m.reason) for m in marks(results)}
    assert kinds[("vanilla", 256)] == ("over memory budget", by_method["vanilla"].reason)
    assert kinds[("chunked", 256)][0] == "measured"
    assert kinds[("fleet", 24)][0] == "refused" and "gradient" in kinds[("fleet", 24)][1]
    assert kinds[("recurrent", 32)][0] == "over time budget" and kinds[("recurrent", 32)][1].startswith("predicted")

    from leetdecoding.bench.plot import plot_time_vs_n

    path = plot_time_vs_n(results, tmp_path / "p.png", "title")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_rejects_a_method_of_another_mode(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "--mode", "decode", "--methods", "chunked"])
    assert e.value.code == 2
    assert "--methods chunked" in capsys.readouterr().err


def test_bench_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for default in ("(default: forward)", "(default: 256,1024,4096,16384)", "(default: 5)", "(default: 10.0)"):
        assert default in out, default


def test_history_written_by_an_older_version_is_rewritten_with_todays_columns(tmp_path):
    path = tmp_path / "history.csv"
    path.write_text("date,method,n,median_ms\n2026-01-01,chunked,256,1.5\n")
    append_history(path, [{"mode": "decode", "method": "recurrent_step", "n": 16}], {"date": "2026-02-02"})
    rows = read_csv(path)
    assert list(rows[0]) == HISTORY_COLUMNS
    assert (rows[0]["method"], rows[0]["median_ms"], rows[0]["mode"]) == ("chunked", "1.5", "")
    assert (rows[1]["method"], rows[1]["mode"], rows[1]["date"]) == ("recurrent_step", "decode", "2026-02-02")
