"""benchmarks/cpu_peers.py's correctness check: its memory-lean fp64 reference and error measure agree with
leetdecoding.methods.naive, and a case is timed only after its check (a wrong output is never timed)."""

from __future__ import annotations

import pytest
import torch

from benchmarks import cpu_peers
from leetdecoding.methods.naive import reference, relative_error


def test_reference_by_slices_matches_the_recurrence():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 70, 16) for _ in range(3))
    log_decay = torch.tensor([-0.5, -0.01, 0.0])
    o, o_abs = cpu_peers.fp64_reference(q, k, v, log_decay)
    ref = reference(q, k, v, log_decay.double().exp())  # lambda rounded to fp32 would differ by 1e-8
    assert relative_error(o, ref.o, ref.o_abs) < 1e-13
    assert torch.allclose(o_abs, ref.o_abs, rtol=1e-12)
    got = (ref.o + 1e-3 * ref.o_abs * (torch.arange(70, dtype=torch.float64) >= 64)[:, None]).float()
    err = cpu_peers.error_by_position(got, o, o_abs)
    assert err[:64].max() < 1e-6 and err[64:].min() > 0.9e-3
    assert err.max().item() == pytest.approx(relative_error(got, ref.o, ref.o_abs), rel=1e-6)
    assert torch.isinf(cpu_peers.error_by_position(got.fill_(float("nan")), o, o_abs)).all()


def test_run_case_checks_then_times():
    pytest.importorskip("transformers")
    rows = cpu_peers.run_case(1, 2, 100, 16, "fp32", peers=("minimax",), rounds=1, peak=100.0)
    assert [r["status"] for r in rows] == ["ok", "ok"]
    assert all(r["error"] <= r["tolerance"] and r["ms"] > 0 for r in rows)
    assert rows[0]["fastest_peer"] == "transformers MiniMax prefill loop"
