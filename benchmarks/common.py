"""Shared pieces of the benchmark scripts: interleaved timing, the machine header, and transformers' MiniMax
lightning-attention module reduced to its attention core (identity projections), so that what is timed on
its side is its own prefill loop or per-token cache path and nothing else."""

from __future__ import annotations

import argparse
import datetime

import torch
from torch import nn

import leetdecoding as ld
from leetdecoding.bench.machine import matmul_gflops
from leetdecoding.bench.timing import interleaved  # noqa: F401 - the benchmarks import it from here
from leetdecoding.device import device_name


def arguments(doc: str, **defaults) -> argparse.ArgumentParser:
    """A benchmark's command line, described by the first line of its docstring, with one option per keyword
    (`--max-len` for max_len) of its default's type: the shape and repetition options every script takes.
    Options that need a help text or no default are added to the parser returned."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    for name, default in defaults.items():
        p.add_argument("--" + name.replace("_", "-"), type=type(default), default=default)
    return p


def header(title: str, device: str = "cpu") -> float:
    """Print what ran where; return torch.mm's fp32 GFLOP/s measured now."""
    mm = matmul_gflops(device)
    print(f"# {title}")
    print(f"# {datetime.date.today()}  leetdecoding {ld.__version__}  torch {torch.__version__}")
    print(f"# device: {device_name(device)}, {torch.get_num_threads()} torch threads; torch.mm fp32: {mm:.0f} GFLOP/s")
    return mm


class Constant(nn.Module):
    """Stands in for a projection: returns a fixed tensor whatever it is given."""

    def __init__(self, value: torch.Tensor):
        super().__init__()
        self.value = value

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.value


def minimax_core(heads: int, head_dim: int, layer_idx: int = 0, num_layers: int = 12):
    """A transformers MiniMaxLightningAttention whose activation, norm and output projection are identities.

    Feed it with `feed(module, q, k, v)` (q, k, v as (B, H, N, D)); its forward then runs exactly its own
    attention loop on them and returns the attention output as (B, N, H * D).
    """
    from transformers import MiniMaxConfig
    from transformers.models.minimax.modeling_minimax import MiniMaxLightningAttention

    config = MiniMaxConfig(
        hidden_size=heads * head_dim,
        num_attention_heads=heads,
        head_dim=head_dim,
        num_hidden_layers=num_layers,
        layer_types=["linear_attention"] * num_layers,
    )
    module = MiniMaxLightningAttention(config, layer_idx).eval()
    module.act_fn = nn.Identity()
    module.norm = nn.Identity()
    module.out_proj = nn.Identity()
    return module


def feed(module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Set the module's projections to produce q, k, v; return the (B, N, 1) hidden states to call it with.
    With leaves that require grad, q, k, v are packed anew on every call so that each call can be backpropagated."""
    b, h, n, d = q.shape
    if q.requires_grad:
        module.qkv_proj = Packed(q, k, v)
    else:
        qkv = torch.cat([t.transpose(1, 2) for t in (q, k, v)], dim=-1).reshape(b, n, h * 3 * d).contiguous()
        module.qkv_proj = Constant(qkv)
    module.output_gate = Constant(torch.full((b, n, h * d), 40.0, dtype=q.dtype))  # sigmoid(40) == 1.0 in fp32
    return torch.zeros(b, n, 1, dtype=q.dtype)


class Packed(nn.Module):
    """Stands in for qkv_proj: packs q, k, v (B, H, N, D) into MiniMax's (B, N, H * 3D) layout on every call,
    so that gradients flow back to them."""

    def __init__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        super().__init__()
        self.q, self.k, self.v = q, k, v

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        b, h, n, d = self.q.shape
        return torch.cat([t.transpose(1, 2) for t in (self.q, self.k, self.v)], dim=-1).reshape(b, n, h * 3 * d)


def minimax_log_decay(module) -> torch.Tensor:
    """lambda = exp(-slope_rate): the module's own decay as leetdecoding's log_decay (H,)."""
    return -module.slope_rate.reshape(-1)
