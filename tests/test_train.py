"""End to end training: a small byte-level language model built from DecayingLinearAttention layers learns real
text (the Python standard library's own source), with the same loss curve under "vanilla" and "auto"."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from leetdecoding.nn import DecayingLinearAttention

STEPS = int(os.environ.get("LEETDECODING_TRAIN_STEPS", "150"))  # set higher for the long version
SEQ, BATCH = 160, 8  # 160 > the dispatcher's vanilla threshold, so "auto" runs the chunked method


def corpus() -> torch.Tensor:
    root = os.path.dirname(os.__file__)
    text = b"".join(open(os.path.join(root, f), "rb").read() for f in ("textwrap.py", "functools.py", "heapq.py"))
    return torch.tensor(list(text), dtype=torch.long)


class TinyLM(nn.Module):
    def __init__(self, method: str, width: int = 64, layers: int = 2):
        super().__init__()
        self.embed = nn.Embedding(256, width)
        self.blocks = nn.ModuleList()
        for i in range(layers):
            self.blocks.append(
                nn.ModuleDict(
                    {
                        "norm1": nn.RMSNorm(width),
                        "attn": DecayingLinearAttention(
                            width, 4, layer_idx=i, num_layers=layers, learnable_decay=True, method=method
                        ),
                        "norm2": nn.RMSNorm(width),
                        "mlp": nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width)),
                    }
                )
            )
        self.head = nn.Linear(width, 256)

    def forward(self, tokens):
        x = self.embed(tokens)
        for b in self.blocks:
            x = x + b["attn"](b["norm1"](x))
            x = x + b["mlp"](b["norm2"](x))
        return self.head(x)


def train(method: str) -> tuple[list[float], TinyLM]:
    data = corpus()
    torch.manual_seed(0)
    model = TinyLM(method)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(STEPS):
        starts = torch.randint(0, len(data) - SEQ - 1, (BATCH,), generator=g)
        batch = torch.stack([data[s : s + SEQ + 1] for s in starts.tolist()])
        logits = model(batch[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, 256), batch[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, model


@pytest.fixture(scope="module")
def runs():
    return {m: train(m) for m in ("vanilla", "auto")}


def test_loss_falls_well_below_start(runs):
    losses = runs["auto"][0]
    first, last = sum(losses[:5]) / 5, sum(losses[-10:]) / 10
    assert first > 4.0  # close to ln(256) = 5.5: nothing learned yet
    assert last < 0.6 * first, f"loss went from {first:.2f} to {last:.2f}"


def test_vanilla_and_auto_train_alike(runs):
    a, b = runs["vanilla"][0], runs["auto"][0]
    worst = max(abs(x - y) / x for x, y in zip(a, b))
    assert worst < 2e-3, f"loss curves differ by {worst:.2e} (relative)"


def test_decay_was_learned(runs):
    model = runs["auto"][1]
    start = TinyLM("auto")
    for b, b0 in zip(model.blocks, start.blocks):
        assert b["attn"].log_decay.grad is not None
        assert not torch.equal(b["attn"].log_decay.detach(), b0["attn"].log_decay.detach())
