"""The tuning table: `leetdecoding tune` writes it, the dispatcher reads it for its device and dtype."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

import leetdecoding as ld
from leetdecoding import dispatch, tuning
from leetdecoding.bench.tune import Plan, covers, measure
from leetdecoding.cli import main
from leetdecoding.methods.naive import reference

from .reference import assert_close


@pytest.fixture
def table(tmp_path, monkeypatch):
    path = tmp_path / "tuning.json"
    monkeypatch.setenv(tuning.ENV, str(path))
    return path


def qkv(n, d=32, dtype=torch.float32):
    g = torch.Generator().manual_seed(n)
    return [torch.randn(1, 2, n, d, generator=g, dtype=torch.float64).to(dtype) for _ in range(3)]


def test_every_tunable_default_is_an_allowed_value():
    assert set(tuning.ALLOWED) == set(dispatch.TUNABLE)
    for name, default in dispatch.TUNABLE.items():
        assert default in tuning.ALLOWED[name], name


def test_off_and_missing_table_mean_defaults(table, monkeypatch):
    assert tuning.lookup("cpu", torch.float32) == ({}, None)  # no file yet
    tuning.save("cpu", torch.float32, {"vanilla_max_n": 512})
    assert tuning.lookup("cpu", torch.float32)[0]["vanilla_max_n"] == 512
    assert tuning.lookup("cpu", torch.float16) == ({}, None)  # another dtype has its own entry
    monkeypatch.setenv(tuning.ENV, "off")
    assert tuning.lookup("cpu", torch.float32) == ({}, None)


def test_save_keeps_other_entries_and_rejects_bad_values(table):
    tuning.save("cpu", torch.float32, {"vanilla_max_n": 64})
    tuning.save("cpu", torch.bfloat16, {"chunk_size_large": 32})
    data = json.loads(table.read_text())
    entry = data["entries"][tuning.device_key("cpu")]
    assert entry["float32"]["vanilla_max_n"] == 64 and entry["bfloat16"]["chunk_size_large"] == 32
    with pytest.raises(ValueError, match="chunk_size_large must be an int in"):
        tuning.save("cpu", torch.float32, {"chunk_size_large": 100})
    with pytest.raises(ValueError, match="unknown value 'chunk'"):
        tuning.save("cpu", torch.float32, {"chunk": 64})


def test_auto_follows_the_table(table):
    """A table saying vanilla up to N = 512 and chunks of 32: auto picks vanilla at N = 300 and says why;
    at N = 600 it runs chunked with C = 32; both agree with the fp64 reference."""
    tuning.save("cpu", torch.float32, {"vanilla_max_n": 512, "chunk_size_small": 32})
    decay = torch.tensor([0.99, 0.5])
    e = ld.explain(*qkv(300), decay)
    assert e.method == "vanilla" and "N=300 <= 512 (measured on this machine" in e.reason and str(table) in e.reason
    e = ld.explain(*qkv(600), decay)
    assert e.method == "chunked" and e.options["chunk_size"] == 32
    for n in (300, 600):
        q, k, v = qkv(n)
        r = reference(q, k, v, decay.double())
        assert_close(f"auto, tuned, N={n}", ld.attention(q, k, v, decay), r.o, r.o_abs, torch.float32)
    # the bf16 entry is absent: bf16 inputs keep the defaults
    e = ld.explain(*qkv(300, dtype=torch.bfloat16), decay)
    assert e.method == "chunked" and f"> {dispatch.VANILLA_MAX_N}:" in e.reason


def test_unreadable_table_warns_once_and_keeps_defaults(table):
    table.write_text("{not json")
    with pytest.warns(UserWarning, match="ignoring the tuning table"):
        assert tuning.lookup("cpu", torch.float32) == ({}, None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same file again: no second warning
        assert tuning.lookup("cpu", torch.float32) == ({}, None)
    bad = {tuning.device_key("cpu"): {"float32": {"vanilla_max_n": -3}}}
    table.write_text(json.dumps({"version": 1, "entries": bad}))
    tuning.forget()  # edited by hand: otherwise picked up within a second
    with pytest.warns(UserWarning, match="vanilla_max_n must be an int"):
        assert ld.explain(*qkv(100), 0.9).method == "vanilla"  # the default 128, not the table's -3


def test_tune_command_writes_what_auto_reads(table, capsys):
    assert main(["tune", "--device", "cpu", "--quick", "--rounds", "1", "--heads", "2", "--dim", "32"]) == 0
    out = capsys.readouterr().out
    assert "what auto will use" in out and str(table) in out.replace("\n", "")
    values, source = tuning.lookup("cpu", torch.float32)
    assert source == table
    # --quick races the same candidates as a full run, at shorter lengths: each covers its default
    assert values["vanilla_max_n"] in (0, 128, 256, 512) and values["chunk_size_small"] in (32, 64, 128, 256)
    assert "chunk_size_large" not in values  # dim 32 is a small head: one chunk size measured


def test_a_race_covers_its_default_only_with_the_values_next_to_it():
    chunks = tuning.ALLOWED["chunk_size_large"]  # 16 .. 256
    assert covers((32, 64, 128, 256), 64, chunks) and covers((32, 64, 128, 256), 128, chunks)
    assert not covers((32, 64), 64, chunks)  # nothing above the default was tried
    assert not covers((32, 64), 128, chunks)  # the default itself was not tried
    assert not covers((64, 128), 64, chunks)  # nothing below
    assert covers((16, 32), 16, chunks) and covers((128, 256), 256, chunks)  # nothing allowed below / above
    assert covers((128, 256, 512), 256, tuning.ALLOWED["vanilla_max_n"])
    assert not covers((16, 64, 256), 256, tuning.ALLOWED["vanilla_max_n"])


def test_a_narrower_race_does_not_override_the_default(table, capsys):
    """The issue's case: chunks 32 and 64 alone (the old --quick) would have written chunk_size_large = 64 as
    measured. Nothing narrower than the default's neighbourhood is recorded, and auto keeps the defaults."""
    narrow = Plan(chunk_n=128, chunks=(32, 64), crossover_n=(16, 64, 256))
    notes = []
    values, rows = measure("cpu", torch.float32, heads=1, dim=128, rounds=1, plan=narrow, progress=notes.append)
    assert values == {}
    assert {r.value for r in rows} == {"chunk_size_small", "chunk_size_large", "vanilla_max_n"}  # raced all
    assert sum("not recorded" in n for n in notes) == 3
    wide = Plan(chunk_n=128, chunks=(32, 64, 128), crossover_n=(16, 64, 256))
    values, _ = measure("cpu", torch.float32, heads=1, dim=128, rounds=1, plan=wide)
    assert set(values) == {"chunk_size_large"} and values["chunk_size_large"] in (32, 64, 128)


def test_tune_out_elsewhere_says_how_to_use_it(table, tmp_path, capsys):
    other = tmp_path / "elsewhere.json"
    args = ["tune", "--device", "cpu", "--quick", "--rounds", "1", "--heads", "1", "--dim", "16", "--out", str(other)]
    assert main(args) == 0
    out = capsys.readouterr().out.replace("\n", "")
    assert other.exists() and not table.exists() and f"set {tuning.ENV}={other}" in out


def test_a_table_edited_by_hand_is_read_again(table, monkeypatch):
    tuning.save("cpu", torch.float32, {"vanilla_max_n": 512})
    assert tuning.lookup("cpu", torch.float32)[0]["vanilla_max_n"] == 512
    monkeypatch.setattr(tuning, "RECHECK_S", 0.0)  # the next lookup checks the file
    data = json.loads(table.read_text())
    data["entries"][tuning.device_key("cpu")]["float32"]["vanilla_max_n"] = 32
    table.write_text(json.dumps(data) + " ")  # (a different size: seen even within the file system's time step)
    assert tuning.lookup("cpu", torch.float32)[0]["vanilla_max_n"] == 32


def test_tune_dry_run_and_off(table, monkeypatch, capsys):
    args = ["tune", "--device", "cpu", "--quick", "--rounds", "1", "--heads", "1", "--dim", "16", "--dry-run"]
    assert main(args) == 0
    assert "--dry-run: nothing written" in capsys.readouterr().out
    assert not table.exists()
    monkeypatch.setenv(tuning.ENV, "off")
    with pytest.raises(SystemExit) as e:
        main(["tune", "--device", "cpu", "--quick"])
    assert e.value.code == 2 and "pass --out PATH or --dry-run" in capsys.readouterr().err


def test_info_shows_the_table_in_use(table, capsys):
    main(["info"])
    assert "no entry for this cpu" in capsys.readouterr().out
    tuning.save("cpu", torch.float32, {"vanilla_max_n": 512})
    tuning.save("cpu", torch.bfloat16, {"chunk_size_large": 32})
    out = capsys.readouterr().out if main(["info"]) == 0 else ""
    assert "float32: vanilla_max_n=512" in out and "bfloat16: chunk_size_large=32" in out


def test_compiled_calls_trace_without_reading_the_table(table):
    """With a table present, torch.compile(fullgraph=True) still traces `attention` (no file access in the graph;
    compiled code keeps the defaults) and agrees with eager."""
    tuning.save("cpu", torch.float32, {"vanilla_max_n": 512})
    torch._dynamo.reset()
    q, k, v = qkv(300)

    def f(q, k, v):
        return ld.attention(q, k, v, 0.9)

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    r = reference(q, k, v, torch.tensor([0.9, 0.9], dtype=torch.float64))
    assert_close("compiled", compiled(q, k, v), r.o, r.o_abs, torch.float32)
