"""Per-token decays (data-dependent gates, fla's `g`): one log decay per token and head.

    S_t = lambda_t S_{t-1} + k_t^T v_t,   S_{-1} = initial_state,   o_t = scale q_t S_t

so lambda_0 multiplies the initial state (fla's convention, Mamba-2's SSD, gated RetNet). A constant decay is the
special case lambda_t = lambda_h and keeps its own faster path.

Every factor the methods form is exp(G_t - G_s) with G the cumulative sum of the log decays *within a chunk* (or a
sequence, for the quadratic form), s <= t: the exponent is never positive, and no global cumulative sum (whose
differences cancel when it reaches -1e6 in fp32) is formed. The sums are taken in fp64.
"""

from __future__ import annotations

import torch

from . import decay as _decay

# A log decay below `negligible(dtype)` makes every factor across it smaller than exp(-30) (fp32) or exp(-40) (fp64):
# below a thousandth of the dtype's tolerance relative to the magnitude of the terms an output sums, so it counts as
# a reset, exactly 0. The cumulative sums leave such tokens out (each factor is then a difference of sums of ordinary
# log decays, or 0): a -inf never enters a sum (inf - inf = NaN), and no large value takes the digits of the sums
# after it (sums of -700s lose 1e-16 x their size in every factor's exponent).
NEGLIGIBLE = {torch.float64: -40.0, torch.float32: -30.0}


def negligible(dtype: torch.dtype) -> float:
    return NEGLIGIBLE.get(dtype, NEGLIGIBLE[torch.float32])


def is_per_token(decay, log_decay) -> bool:
    """The decay argument is a tensor with a time axis (ndim >= 2): a per-token decay."""
    raw = decay if decay is not None else log_decay
    return isinstance(raw, torch.Tensor) and raw.ndim >= 2


def canonical_gates(decay, log_decay, shape: tuple[int, ...], layout: str, device, dtype) -> torch.Tensor:
    """Validate a per-token `decay` (lambda in [0, 1], 0 a reset) or `log_decay` (log lambda <= 0, -inf a reset)
    of exactly `shape` and return log lambda in `dtype` on `device` (-inf as the dtype's most negative number).

    The gradient of `decay` is d lambda = d g / lambda (g = log lambda, computed in fp64): exact wherever the method's
    d g is, which the custom backwards of chunked and recurrent give as sums of the terms that carry lambda_t's
    factor. A lambda of 0, or below exp(negligible(dtype)) (exp(-30) ~ 9e-14 for fp32), is a reset: the methods
    make every factor across it exactly 0 and return d g = 0 there. Where such a `decay` requires grad, the call
    is cut at its resets (leetdecoding.segments._through_reset: lambda_t multiplies the state carried in), so that
    d lambda there is the one-sided derivative <dL/dS_t, S_{t-1}>; not under torch.compile nor in
    leetdecoding.distributed.attention (it passes log decays on), where it stays 0.

    Raises:
        ValueError: both given, a wrong shape (the message names `layout`), NaN, a value out of range.
        TypeError: not a real tensor.
    """
    if decay is not None and log_decay is not None:
        raise ValueError("pass either decay (lambda in [0, 1]) or log_decay (log lambda <= 0), not both.")
    name = "decay" if decay is not None else "log_decay"
    t = _decay._as_float_tensor(name, decay if decay is not None else log_decay)
    if tuple(t.shape) != tuple(shape):
        hint = "MiniMax's slope buffer is (H, 1, 1): pass slope.reshape(-1); fla's (B, T, H) gates g: pass "
        hint += "g.transpose(1, 2)"
        if tuple(t.shape) == (*shape, 1):  # e.g. one token's decay sliced as g[:, :, t : t + 1]
            hint = f"drop the last axis of size 1: pass {name}.squeeze(-1)"
        raise ValueError(
            f"{name} must be a float, a tensor of shape ({shape[1]},) (one value per head) or a per-token one of "
            f"shape {tuple(shape)} {layout}; got shape {tuple(t.shape)}. Hint: {hint}."
        )
    bad = torch.isnan(t) | ((t < 0) | (t > 1) if decay is not None else t > 0)
    if bool(bad.any()):
        rule = "in [0, 1] (0 forgets the state)" if decay is not None else "<= 0 (-inf forgets the state)"
        raise ValueError(f"a per-token {name} must be {rule}; got {_decay._describe_bad(t.flatten(), bad.flatten())}.")
    if decay is not None:  # t is fp64 here; a decay of 0 is -inf, with a gradient of 0 rather than inf * 0 = NaN
        log = torch.where(t > 0, torch.log(t.clamp(min=torch.finfo(t.dtype).tiny)), float("-inf"))
    else:
        log = t
    return _decay.finite_log(log.to(device=device, dtype=dtype))


class Sums:
    """The exponents of a block of tokens (..., n): G_t = sum of the ordinary log decays up to t (fp64; resets,
    i.e. log decays below `negligible`, left out) and the number of resets up to t. A factor between s <= t is
    exp(G_t - G_s) when no reset lies in (s, t], else 0. `causal` is the (n, n) lower-triangular mask (made once
    per call); `resets` says whether the call holds any reset at all (without one, the reset masks are skipped)."""

    def __init__(self, g: torch.Tensor, causal: torch.Tensor, resets: bool = True, shallow: bool = False):
        self.causal, self.shallow = causal, shallow and not resets
        if resets:
            reset = g < negligible(g.dtype)
            self.G = torch.cumsum(torch.where(reset, 0.0, g.to(torch.float64)), dim=-1)
            self.resets = torch.cumsum(reset.to(torch.int32), dim=-1)
        else:
            self.G = torch.cumsum(g.to(torch.float64), dim=-1)
            self.resets = None

    def within(self, dtype: torch.dtype) -> torch.Tensor:
        """exp(G_t - G_s) for s <= t with no reset in (s, t], else 0: (..., n, n)."""
        if self.shallow:  # exp(G_t) exp(-G_s): 2n exponentials, not n^2 (see SHALLOW); causal is in `dtype`
            return (self._down.to(dtype).unsqueeze(-1) * self._up.to(dtype).unsqueeze(-2)).mul_(self.causal)
        keep = self.causal
        if self.resets is not None:
            keep = keep & (self.resets.unsqueeze(-1) == self.resets.unsqueeze(-2))
        return _exp_where(self.G.unsqueeze(-1) - self.G.unsqueeze(-2), keep, dtype)

    @property
    def _down(self) -> torch.Tensor:  # exp(G), each <= 1
        if not hasattr(self, "_exp_down"):
            self._exp_down = torch.exp(self.G)
        return self._exp_down

    @property
    def _up(self) -> torch.Tensor:  # exp(-G), each <= exp(SHALLOW[dtype])
        if not hasattr(self, "_exp_up"):
            self._exp_up = torch.exp(-self.G)
        return self._exp_up

    def from_start(self, dtype: torch.dtype) -> torch.Tensor:
        """The factor from the block's start state to token t (lambda_0 ... lambda_t): (..., n)."""
        if self.shallow:
            return self._down.to(dtype)
        return _exp_where(self.G, None if self.resets is None else self.resets == 0, dtype)

    def to_end(self, dtype: torch.dtype) -> torch.Tensor:
        """The factor from token s to the block's end (lambda_{s+1} ... lambda_last): (..., n)."""
        if self.shallow:
            return (self._down[..., -1:] * self._up).to(dtype)
        keep = None if self.resets is None else self.resets == self.resets[..., -1:]
        return _exp_where(self.G[..., -1:] - self.G, keep, dtype)

    def raised(self, dtype: torch.dtype) -> torch.Tensor:
        """exp(-G_s) (..., n), for a shallow block only (each <= exp(SHALLOW[dtype]))."""
        return self._up.to(dtype)

    def whole(self, dtype: torch.dtype) -> torch.Tensor:
        """The factor across the whole block: (..., 1)."""
        return self.from_start(dtype)[..., -1:]


# A block whose log decays sum to at least -SHALLOW[dtype] (and holds no reset) forms its factors as
# exp(G_t) exp(-G_s), each exponential taken in fp64 and rounded to the compute dtype, then multiplied there:
# exp(-G_s) <= exp(40) ~ 2e17 stays far from fp32's overflow (3e38; fp64: exp(300) ~ 2e130), also times a key
# (without gradients the factors multiply q and k before their product: keys up to about 1e21 in fp32; the scores
# above the diagonal, whose factors exp(G_t - G_s) exceed 1 and can overflow, are filled with 0, not masked by a
# product, which would turn an inf into NaN), and the product is
# exact to about three roundings of the dtype (2e-7 in fp32, below its 2e-6 tolerance), as exp(G_t - G_s) would
# be to one; 2n exponentials per block instead of n^2, and the products in the dtype of the matmul.
SHALLOW = {torch.float64: 300.0, torch.float32: 40.0}


def causal_mask(n: int, device, dtype=torch.bool) -> torch.Tensor:
    return torch.ones(n, n, dtype=dtype, device=device).tril()


def survey(g: torch.Tensor, size: int) -> tuple[bool, bool]:
    """(resets, shallow) of a call's log decays g (..., N) in blocks of `size` tokens, from one read of the values:
    whether any log decay counts as a reset, and whether every block sums to at least -SHALLOW of g's dtype (g is
    in the compute dtype) with no reset in the call."""
    n = g.shape[-1]
    if n == 0:
        return False, True
    wide = torch.nn.functional.pad(g.detach().to(torch.float64), (0, -n % size))
    lowest, least_sum = torch.stack((wide.min(), wide.unflatten(-1, (-1, size)).sum(-1).min())).tolist()
    resets = lowest < negligible(g.dtype)
    return resets, not resets and least_sum >= -SHALLOW.get(g.dtype, SHALLOW[torch.float32])


def _exp_where(exponent: torch.Tensor, keep: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """exp(exponent) where keep (everywhere for None), else exactly 0 (a gradient of 0 there too), in `dtype`."""
    if keep is not None:
        exponent = exponent.masked_fill(~keep, float("-inf"))
    return torch.exp(exponent).to(dtype)
