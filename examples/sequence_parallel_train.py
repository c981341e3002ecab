"""Train a tiny language model sequence-parallel and check that its loss curve is the single-process one.

    torchrun --nproc_per_node 2 examples/sequence_parallel_train.py          # gloo on CPU
    python examples/sequence_parallel_train.py                               # one process: the reference curve

One sequence of N tokens is split between the ranks (rank r holds a contiguous slice; the split need not be even).
Every layer's attention runs through `leetdecoding.distributed.attention` (the layers get the group), so the
forward and backward are those of the whole sequence. The parameters are replicated: their gradients are per-rank
partial sums, all-reduced before each step as DDP would. Each rank also trains the same model in one process on
the whole sequence and the script fails unless the two loss curves agree to fp32 rounding.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch import nn

from leetdecoding.nn import DecayingLinearAttention


class TinyLM(nn.Module):
    def __init__(self, vocab: int, hidden: int, heads: int, layers: int, group=None):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.layers = nn.ModuleList(
            DecayingLinearAttention(hidden, heads, layer_idx=i, num_layers=layers, learnable_decay=True, group=group)
            for i in range(layers)
        )
        self.head = nn.Linear(hidden, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for layer in self.layers:
            x = x + layer(x)
        return self.head(x)


def train(model: TinyLM, inputs, targets, total: int, steps: int, lr: float, group=None) -> list[float]:
    """SGD on the summed cross-entropy / total tokens (summed over the ranks: the mean over the whole sequence)."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    curve = []
    for _ in range(steps):
        opt.zero_grad()
        logits = model(inputs)
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum") / total
        loss.backward()
        if group is not None:  # replicated parameters: sum the per-rank partial gradients (what DDP does)
            for p in model.parameters():
                dist.all_reduce(p.grad, group=group)
            loss = loss.detach().clone()
            dist.all_reduce(loss, group=group)
        opt.step()
        curve.append(loss.item())
    return curve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--lr", type=float, default=0.5)
    args = parser.parse_args()
    torch.manual_seed(0)
    vocab, hidden, heads, layers = 64, 32, 4, 2
    stream = torch.randint(vocab, (1, args.tokens + 1))
    inputs, targets = stream[:, :-1], stream[:, 1:]
    state = TinyLM(vocab, hidden, heads, layers).state_dict()

    reference = TinyLM(vocab, hidden, heads, layers)
    reference.load_state_dict(state)
    single = train(reference, inputs, targets, args.tokens, args.steps, args.lr)
    if "WORLD_SIZE" not in os.environ:
        print("one process:", " ".join(f"{x:.6f}" for x in single))
        return

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    # an uneven split: the first rank holds a third more than the others
    cuts = torch.linspace(0, args.tokens, world + 1).round().long().tolist()
    cuts[1:-1] = [min(c + args.tokens // (3 * world), args.tokens) for c in cuts[1:-1]]
    a, b = cuts[rank], cuts[rank + 1]
    model = TinyLM(vocab, hidden, heads, layers, group=dist.group.WORLD)
    model.load_state_dict(state)
    parallel = train(model, inputs[:, a:b], targets[:, a:b], args.tokens, args.steps, args.lr, dist.group.WORLD)
    worst = max(abs(p - s) / s for p, s in zip(parallel, single))
    if rank == 0:
        print(f"{world} ranks, tokens per rank {[cuts[r + 1] - cuts[r] for r in range(world)]}")
        print("sequence parallel:", " ".join(f"{x:.6f}" for x in parallel))
        print("one process:      ", " ".join(f"{x:.6f}" for x in single))
        print(f"largest relative difference {worst:.2e}")
    dist.destroy_process_group()
    if not worst <= 1e-5:
        raise SystemExit(f"rank {rank}: the loss curves differ by {worst:.2e} (relative)")


if __name__ == "__main__":
    main()
