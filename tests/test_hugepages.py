"""CPU outputs ask for huge pages only inside their own bytes, and only for real tensors of 4 MiB or more."""

from __future__ import annotations

import warnings

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from leetdecoding.methods import hugepages


def recorder(monkeypatch) -> list:
    calls = []
    monkeypatch.setattr(hugepages, "_madvise", lambda: lambda start, length, advice: calls.append((start, length)))
    return calls


def test_advice_covers_whole_huge_pages_inside_the_tensor(monkeypatch):
    calls = recorder(monkeypatch)
    t = hugepages.empty((3, 1000, 1000), torch.float32)  # 12 MB
    t.fill_(2.0)
    assert t.shape == (3, 1000, 1000) and t.dtype == torch.float32 and bool((t == 2.0).all())
    (start, length), = calls
    begin, end = t.data_ptr(), t.data_ptr() + t.numel() * 4
    assert start % hugepages.HUGE_PAGE == 0 and length % hugepages.HUGE_PAGE == 0
    assert begin <= start and start + length <= end and length >= end - begin - 2 * hugepages.HUGE_PAGE


def test_small_and_fake_tensors_are_left_alone(monkeypatch):
    calls = recorder(monkeypatch)
    hugepages.empty((1000, 1000), torch.float32)  # 4 MB, just under 4 MiB
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fake tensor's data pointer warns
        with FakeTensorMode():
            fake = hugepages.empty((8, 16384, 128), torch.float32)
    assert calls == [] and fake.shape == (8, 16384, 128)
