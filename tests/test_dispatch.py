"""The dispatcher: priority, refusals that explain themselves, the memory guard, forcing a method."""

from __future__ import annotations

import pytest
import torch

import leetdecoding as ld
from leetdecoding import dispatch
from leetdecoding.methods import REGISTRY
from leetdecoding.methods.decode import DECODE_REGISTRY
from leetdecoding.methods.naive import reference

from .reference import assert_close
from .runnable import RUNNABLE_ON_CPU


def qkv(b=1, h=2, n=100, d=16):
    return tuple(torch.randn(b, h, n, d) for _ in range(3))


def test_auto_picks_by_length_and_says_why():
    short = ld.explain(*qkv(n=dispatch.VANILLA_MAX_N))
    long = ld.explain(*qkv(n=dispatch.VANILLA_MAX_N + 1))
    assert short.method == "vanilla" and "one matmul" in short.reason
    assert long.method == "chunked" and long.options["chunk_size"] == dispatch.CHUNK_SIZE_SMALL_HEAD
    text = repr(long)
    assert text.startswith(f"inputs: q (1, 2, {dispatch.VANILLA_MAX_N + 1}, 16)") and "chosen: chunked" in text
    assert sorted(long.others) == sorted(n for n in RUNNABLE_ON_CPU if n != "chunked")


def test_vanilla_at_a_million_tokens_is_refused_before_allocating():
    x = torch.zeros(1, 1, 1, 1).expand(1, 1, 1_000_000, 1)  # a view: nothing large is allocated
    with pytest.raises(ld.MethodRefusedError, match=r"method 'vanilla' cannot run .*needs about [0-9.]+ TiB"):
        ld.attention(x, x, x, method="vanilla")
    assert ld.explain(x, x, x).method == "chunked"
    assert "TiB" in " ".join(ld.explain(x, x, x).refusals["vanilla"])


def test_auto_skips_a_method_that_does_not_fit(monkeypatch):
    q, k, v = qkv(b=4, h=8, n=dispatch.VANILLA_MAX_N)
    x = ld.inputs.validate(q, k, v)
    vanilla_need = dispatch.estimate_bytes(REGISTRY["vanilla"], x, {})
    chunked_need = dispatch.estimate_bytes(REGISTRY["chunked"], x, dispatch.options_for(REGISTRY["chunked"], x))
    assert chunked_need < vanilla_need
    monkeypatch.setattr(dispatch, "MEMORY_CHECK_MIN_BYTES", 0)
    monkeypatch.setattr(dispatch, "available_memory", lambda device: int((chunked_need + vanilla_need) / 2 / 0.8))
    e = ld.explain(q, k, v)
    assert e.method == "chunked"
    assert "needs about" in e.refusals["vanilla"][0]
    ref = reference(q, k, v, 1.0)
    assert_close("auto after the refusal", ld.attention(q, k, v), ref.o, ref.o_abs, torch.float32)


def test_nothing_fits_lists_every_method(monkeypatch):
    monkeypatch.setattr(dispatch, "MEMORY_CHECK_MIN_BYTES", 0)
    monkeypatch.setattr(dispatch, "available_memory", lambda device: 0)
    with pytest.raises(ld.MethodRefusedError) as err:
        ld.attention(*qkv())
    for name in REGISTRY:  # every method is named, with its reasons
        assert f"  {name}: " in str(err.value)
    for name in RUNNABLE_ON_CPU:
        assert f"  {name}: needs about" in str(err.value)
    assert ld.explain(*qkv()).method is None


def test_environment_forces_the_default(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_METHOD, "fleet")
    assert ld.explain(*qkv()).method == "fleet" and "LEETDECODING_METHOD" in ld.explain(*qkv()).reason
    assert ld.explain(*qkv(), method="recurrent").method == "recurrent"  # an explicit method wins
    monkeypatch.setenv(dispatch.ENV_METHOD, "nope")
    with pytest.raises(ValueError, match="LEETDECODING_METHOD='nope' is not a method"):
        ld.attention(*qkv())


def test_forced_method_goes_through_the_same_check(monkeypatch):
    monkeypatch.setattr(REGISTRY["recursion"], "dtypes", (torch.float64,))
    with pytest.raises(ld.MethodRefusedError, match=r"'recursion' cannot run .*supports float64, not float32"):
        ld.attention(*qkv(), method="recursion")
    assert "recursion" in ld.explain(*qkv(n=300)).refusals


def test_list_methods_declares_capabilities():
    rows = {r["name"]: r for r in ld.list_methods()}
    assert set(rows) == set(REGISTRY) | set(DECODE_REGISTRY)
    assert {n for n, r in rows.items() if r["operation"] == "decode_step"} == set(DECODE_REGISTRY)
    assert rows["vanilla"]["time"] == "O(N^2 (Dk+Dv))" and rows["recurrent"]["memory"] == "O(Dk Dv)"
    assert rows["chunked"]["options"] == ["chunk_size", "span_bytes"] and rows["vanilla"]["options"] == []
    for r in rows.values():
        assert r["backend"] in ("torch", "triton")
        if r["backend"] == "torch":
            assert r["available"] and set(r["dtypes"]) == {"float64", "float32", "float16", "bfloat16"}
