"""The decay math the methods share: factors lambda^e, decay matrices, states a block of tokens leaves.

Every factor is exp(non-positive): lambda^(-j) is never formed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..decay import finite_log
from ..inputs import AttentionInputs
from ..memo import ValueMemo


def head_log_decay(x: AttentionInputs) -> torch.Tensor:
    """log lambda shaped (1, H, 1, 1) to broadcast over (B, H, N, D)."""
    return x.log_decay.view(1, -1, 1, 1)


def decay_factor(log_decay: torch.Tensor, exponent: torch.Tensor | int = 1) -> torch.Tensor:
    """lambda^e = exp(e log lambda) for exponents e >= 0 (an int, or a tensor broadcasting against log_decay),
    in log_decay's dtype, with factors below the dtype's smallest normal number set to exactly 0.

    fp32 is computed in fp64, the product e log lambda included: rounded to fp32 first, an exponent of -44
    (lambda = 0.5, e = 63) is off by 2.6e-6, and exp turns that into a relative error of 2.6e-6, larger than the
    fp32 tolerance, in a factor that can be the whole of an output element (o_t = lambda^t when only token 0
    matches q_t). The factors are small tables; torch's multi-threaded fp32 exp was also measured on this
    project's CPU machine to return values off by 1.5e-4 now and then, where fp64 stayed exact.
    Only what the dtype cannot hold as a normal number is flushed: a subnormal factor makes the CPU's arithmetic
    many times slower and has lost precision anyway, while a larger factor, however small, can still be the
    whole of an output element. log lambda is the canonical, finite one (`decay.finite_log`), so an exponent 0
    gives exactly 1, never -inf * 0 = NaN.
    """
    wide = log_decay.double() if log_decay.dtype == torch.float32 else log_decay
    if isinstance(exponent, torch.Tensor):
        exponent = exponent.to(wide.dtype)
    f = torch.exp(wide * exponent)
    f = torch.where(f < torch.finfo(log_decay.dtype).tiny, torch.zeros_like(f), f)
    return f.to(log_decay.dtype)


def decay_powers(log_decay: torch.Tensor, exponents: torch.Tensor, ndim: int = 4) -> torch.Tensor:
    """lambda^e for non-negative exponents e (n,), shaped (1, H, 1.., n, 1) with `ndim` dims."""
    mid = (1,) * (ndim - 4)
    return decay_factor(log_decay.view(1, -1, *mid, 1, 1), exponents.view(1, 1, *mid, -1, 1))


# Decay matrices up to this size are remembered by the decay's values (vanilla's mask at short N, the tables of
# chunked, recursion's leaves, fleet's scan blocks): building one in fp64 took 0.64 ms of a 1.46 ms vanilla call
# at H=8, N=128. Larger ones are rebuilt: they are a small part of their call, and too large to keep.
DECAY_MATRIX_MEMO_BYTES = 2 << 20
_DECAY_MATRICES = ValueMemo(size=8)


def causal_decay_matrix(log_decay: torch.Tensor, n: int) -> torch.Tensor:
    """D[h, t, s] = lambda_h^(t - s) for s <= t, else 0; shaped (1, H, n, n). Shared between calls with the same
    decay values (see leetdecoding.memo): read it, never modify it in place."""
    if log_decay.numel() * n * n * log_decay.element_size() > DECAY_MATRIX_MEMO_BYTES:
        return _causal_decay_matrix(log_decay, n)
    return _DECAY_MATRICES.derive(log_decay, (n,), lambda ld: _causal_decay_matrix(ld, n))


def _causal_decay_matrix(log_decay: torch.Tensor, n: int) -> torch.Tensor:
    idx = torch.arange(n, device=log_decay.device, dtype=torch.float64)
    diff = idx[:, None] - idx[None, :]
    d = decay_factor(log_decay.view(1, -1, 1, 1), diff.clamp(min=0))
    return d.masked_fill(diff < 0, 0.0)


def positions(n: int, x: AttentionInputs, start: int = 0) -> torch.Tensor:
    return torch.arange(start, start + n, device=x.device, dtype=torch.float64)  # exact past 2^24 tokens


def state_contribution(k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor) -> torch.Tensor:
    """sum_s lambda^(n-1-s) k_s^T v_s over the n rows of k (B, H, ..., n, Dk) and v: the state a block leaves."""
    n = k.shape[-2]
    e = torch.arange(n - 1, -1, -1, device=k.device, dtype=torch.float64)
    return (k * decay_powers(log_decay, e, k.ndim)).transpose(-1, -2) @ v


def final_state(x: AttentionInputs, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """State after the whole sequence: lambda^N S_init + sum_s lambda^(N-1-s) k_s^T v_s (compute dtype)."""
    s = state_contribution(k, v, x.log_decay)
    if x.initial_state is not None:
        s = s + decay_factor(head_log_decay(x), x.seq_len) * x.initial_state
    return s


def initial_state_output(x: AttentionInputs, q: torch.Tensor, start: int = 0) -> torch.Tensor:
    """lambda^(t+1) q_t S_init for the rows t = start .. start + n - 1 of q (B, H, n, Dk)."""
    return (q * decay_powers(x.log_decay, positions(q.shape[2], x, start + 1))) @ x.initial_state


SCAN_BLOCK = 16  # tokens per block of discounted_cumsum; each level up covers SCAN_BLOCK times more


def _apply_decay_matrix(d: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """d @ x for a decay matrix d (1, H, n, n) and x (B, H, ..., n, F).

    A broadcasting `@` copies d for every batch row, group and block: n values per token beside x's F. Where
    that copy would outweigh x (F < n), one matmul per head over every other axis instead (an einsum, which copies
    x once); elsewhere the broadcasting matmul, measured faster there.
    """
    if x.shape[-1] < d.shape[-1]:
        return torch.einsum("hts,bh...sf->bh...tf", d[0], x)
    return d.view(1, d.shape[1], *(1,) * (x.ndim - 4), *d.shape[2:]) @ x


def discounted_cumsum(x: torch.Tensor, log_decay: torch.Tensor, initial: torch.Tensor | None = None) -> torch.Tensor:
    """y_t = lambda_h y_{t-1} + x_t along dim -2 of x (B, H, ..., N, F); y_{-1} = initial (B, H, ..., F) or 0."""
    n = x.shape[-2]
    if n <= SCAN_BLOCK:
        y = _apply_decay_matrix(causal_decay_matrix(log_decay, n), x)
        if initial is not None:
            steps = torch.arange(1, n + 1, device=x.device, dtype=x.dtype)
            y = y + decay_powers(log_decay, steps, x.ndim) * initial.unsqueeze(-2)
        return y
    nb = math.ceil(n / SCAN_BLOCK)
    xb = F.pad(x, (0, 0, 0, nb * SCAN_BLOCK - n)).unflatten(-2, (nb, SCAN_BLOCK))
    y = _apply_decay_matrix(causal_decay_matrix(log_decay, SCAN_BLOCK), xb)
    # value at the end of each block, then the same scan one level up with lambda^SCAN_BLOCK
    # (clamped: lambda^SCAN_BLOCK of a tiny lambda overflows its log to -inf, which the next level multiplies by 0)
    ends = discounted_cumsum(y[..., -1, :], finite_log(log_decay * SCAN_BLOCK), initial)
    before = ends[..., :-1, :]
    if initial is not None:
        before = torch.cat((initial.unsqueeze(-2), before), dim=-2)
    else:
        before = F.pad(before, (0, 0, 1, 0))
    steps = torch.arange(1, SCAN_BLOCK + 1, device=x.device, dtype=x.dtype)
    y = y + decay_powers(log_decay, steps, xb.ndim) * before.unsqueeze(-2)
    return y.flatten(-3, -2)[..., :n, :]
