"""The fp64 answers a benchmark checks against, at a cost that fits benchmark sizes: the output and the gradients,
each with the magnitude of the terms it sums (the scale of leetdecoding.methods.naive's `relative_error`).

Both run the torch chunked method in fp64 on the inputs and on |q|, |k|, |v| (and |do|) with |scale|: every decay
is positive, so the second run sums the absolute values of the first one's terms. tests/test_naive.py checks them
against the token-by-token loop and the closed form.
"""

from __future__ import annotations

import torch

from .. import api, dispatch
from ..inputs import validate
from ..methods import REGISTRY


def _exact_and_absolute(scale: float):
    """(take, scale) for the plain run and the run on absolute values."""
    return ((torch.Tensor.double, scale), (lambda t: t.double().abs(), abs(scale)))


def fp64_sums(q, k, v, log_decay, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The output and the magnitude of the terms each element sums, as the naive reference's `o` and `o_abs`."""
    chunked = REGISTRY["chunked"]
    out = []
    for take, s in _exact_and_absolute(scale):
        x = validate(take(q), take(k), take(v), None, log_decay.double(), s)
        out.append(chunked.forward(x, **dispatch.options_for(chunked, x))[0])
    return out[0], out[1]


def fp64_gradients(q, k, v, log_decay, scale, do) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(gradient, magnitude of the terms it sums) for q, k and v: the gradients of the output against `do`. The
    naive closed form would need an (H, N, N) matrix at N = 16384."""
    sums = []
    for take, s in _exact_and_absolute(scale):
        leaves = [take(t.detach()).requires_grad_() for t in (q, k, v)]
        o = api.attention(*leaves, log_decay=log_decay.detach().double(), scale=s, method="chunked")
        sums.append(torch.autograd.grad(o, leaves, take(do)))
    return list(zip(*sums))
