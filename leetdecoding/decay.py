"""Decay conventions and converters.

The operator's decay is lambda_h in (0, 1] per head. Internally there is one canonical form, log lambda <= 0,
in fp32 (fp64 for fp64 inputs). The converters below return that canonical form, shape (H,), for the
conventions users meet; pass the result as `log_decay=`.

    ld.attention(q, k, v, log_decay=ld.decay.minimax(num_heads=8, layer_idx=3, num_layers=12))
"""

from __future__ import annotations

import math

import torch

from .memo import TensorMemo

__all__ = [
    "canonical_log_decay",
    "from_decay",
    "from_rate",
    "to_decay",
    "alibi_slopes",
    "alibi",
    "minimax_rates",
    "minimax",
    "retnet",
    "lightning",
]


def check_not_meta(name: str, t: torch.Tensor) -> None:
    """Refuse a tensor on the meta device: it has a shape but no values, and every argument here is read."""
    if t.is_meta:
        raise ValueError(
            f"{name} is on the meta device, which holds no values; got a meta tensor of shape {tuple(t.shape)}. "
            f"Hint: create {name} with its values on a real device (cpu or cuda)."
        )


def _as_float_tensor(name: str, x, dtype: torch.dtype | None = None) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        if x.dtype == torch.bool or x.is_complex():
            raise TypeError(f"{name} must be a real tensor; got {x.dtype}.")
        check_not_meta(name, x)
        return x.to(dtype) if dtype is not None else x.to(torch.float64)
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise TypeError(f"{name} must be a float or a (H,) tensor; got {type(x).__name__} {x!r}.")
    return torch.tensor(float(x), dtype=dtype or torch.float64)


def _describe_bad(t: torch.Tensor, bad: torch.Tensor) -> str:
    idx = bad.nonzero().flatten().tolist()[:4]
    vals = [t.flatten()[i].item() for i in idx] if t.ndim else [t.item()]
    return ", ".join(f"{v:.6g}" for v in vals)


_VALIDATED = TensorMemo()


def canonical_log_decay(decay, log_decay, heads: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Validate `decay` / `log_decay` and return log lambda of shape (heads,) in `dtype` on `device`.

    Accepts a float, a 0-d tensor or a (H,) tensor. Any real tensor dtype is accepted (the dtype of the decay
    is the one thing converted silently); a decay tensor on another device is moved to the inputs' device.
    """
    raw = decay if decay is not None else log_decay
    if not isinstance(raw, torch.Tensor) or decay is not None and log_decay is not None:
        return _canonical(decay, log_decay, heads, device, dtype)
    key = (decay is None, heads, device, dtype)
    return _VALIDATED.get(raw, key, lambda: _canonical(decay, log_decay, heads, device, dtype))


def _canonical(decay, log_decay, heads: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    if decay is not None and log_decay is not None:
        raise ValueError("pass either decay (lambda in (0, 1]) or log_decay (log lambda <= 0), not both.")
    if decay is None and log_decay is None:
        return torch.zeros(heads, dtype=dtype, device=device)
    name = "decay" if decay is not None else "log_decay"
    raw = decay if decay is not None else log_decay
    t = _as_float_tensor(name, raw)
    if t.ndim == 1 and t.shape[0] != heads or t.ndim > 1:
        raise ValueError(
            f"{name} must be a float or a tensor of shape ({heads},) (one value per head); got shape "
            f"{tuple(t.shape)}. Hint: MiniMax's slope buffer is (H, 1, 1): pass slope.reshape(-1)."
        )
    finite = torch.isfinite(t)
    if not bool(finite.all()):
        raise ValueError(f"{name} must be finite; got {_describe_bad(t, ~finite)}.")
    if decay is not None:
        bad = (t <= 0) | (t > 1)
        if bool(bad.any()):
            raise ValueError(
                f"decay must be in (0, 1] (lambda = 1 is no decay); got {_describe_bad(t, bad)}. "
                "Hint: for a rate s with lambda = exp(-s), pass log_decay=-s or use leetdecoding.decay.from_rate."
            )
        log = torch.log(t)
    else:
        bad = t > 0
        if bool(bad.any()):
            raise ValueError(
                f"log_decay must be <= 0 (it is log lambda with lambda in (0, 1]); got {_describe_bad(t, bad)}. "
                "Hint: for a positive rate s, pass log_decay=-s."
            )
        log = t
    return log.to(device=device, dtype=dtype).expand(heads).contiguous()


def from_decay(decay) -> torch.Tensor:
    """lambda in (0, 1] -> log lambda, fp32."""
    return canonical_log_decay(decay, None, _heads(decay), torch.device("cpu"), torch.float32)


def from_rate(rate) -> torch.Tensor:
    """A rate s >= 0 with lambda = exp(-s) (LeetDecoding's `is_need_exp`, MiniMax slopes) -> log lambda = -s."""
    s = _as_float_tensor("rate", rate)
    if not bool(torch.isfinite(s).all()) or bool((s < 0).any()):
        raise ValueError(f"rate must be finite and >= 0 (lambda = exp(-rate)); got {s.flatten().tolist()[:4]}.")
    return (-s).reshape(-1).to(torch.float32)


def to_decay(log_decay: torch.Tensor) -> torch.Tensor:
    """log lambda -> lambda."""
    return torch.exp(log_decay)


def _heads(x) -> int:
    return x.numel() if isinstance(x, torch.Tensor) and x.ndim else 1


def _check_heads(num_heads) -> int:
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"num_heads must be a positive int; got {num_heads!r}.")
    return num_heads


def _check_layer(layer_idx, num_layers) -> None:
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"num_layers must be a positive int; got {num_layers!r}.")
    if isinstance(layer_idx, bool) or not isinstance(layer_idx, int) or not 0 <= layer_idx < num_layers:
        raise ValueError(f"layer_idx must be an int in [0, {num_layers}); got {layer_idx!r}.")


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """The ALiBi-style slopes of LeetDecoding's / TransNormerLLM's `_build_slope_tensor`, shape (H,), fp32.

    For a power of two n the slopes are 2^(-8/n * (h+1)); otherwise the closest lower power of two's slopes
    followed by every other slope of twice that power.
    """
    n = _check_heads(num_heads)

    def power_of_2(m: int) -> list[float]:
        start = 2.0 ** (-(2.0 ** -(math.log2(m) - 3)))
        return [start ** (i + 1) for i in range(m)]

    def slopes(m: int) -> list[float]:
        if math.log2(m).is_integer():
            return power_of_2(m)
        p = 2 ** math.floor(math.log2(m))
        return power_of_2(p) + slopes(2 * p)[0::2][: m - p]

    return torch.tensor(slopes(n), dtype=torch.float32)


def alibi(num_heads: int) -> torch.Tensor:
    """log lambda for lambda = exp(-slope) with the ALiBi-style slopes (LeetDecoding's tests, lightning-attn)."""
    return -alibi_slopes(num_heads)


def minimax_rates(num_heads: int, layer_idx: int, num_layers: int) -> torch.Tensor:
    """The per-layer slope rates of transformers' MiniMaxLightningAttention.get_slope_rate, shape (H,), fp32.

    rate_h = (2^(-8/H))^(h+1) * (1 - layer_idx / (num_layers - 1 + 1e-5) + 1e-5); lambda = exp(-rate).
    """
    h = _check_heads(num_heads)
    _check_layer(layer_idx, num_layers)
    base = 1 / (2 ** (8 / h))
    exponent = torch.arange(h) + 1
    factor = 1 - layer_idx / (num_layers - 1 + 1e-5) + 1e-5
    return (base**exponent * factor).to(torch.float32)


def minimax(num_heads: int, layer_idx: int, num_layers: int) -> torch.Tensor:
    """log lambda of MiniMax-Text-01's lightning attention layer `layer_idx` of `num_layers`."""
    return -minimax_rates(num_heads, layer_idx, num_layers)


def retnet(num_heads: int) -> torch.Tensor:
    """log lambda for RetNet's gammas 1 - 2^(-5-h), h = 0..H-1 (computed with log1p, exact near 1)."""
    h = torch.arange(_check_heads(num_heads), dtype=torch.float64)
    return torch.log1p(-(2.0 ** (-5.0 - h))).to(torch.float32)


def lightning(num_heads: int, layer_idx: int, num_layers: int) -> torch.Tensor:
    """log lambda of TransNormerLLM / fla's lightning attention: -slope * (1 - layer_idx / (L - 1) + 1e-5).

    With one layer (L = 1, where the source formula divides by zero) the factor is 1 + 1e-5.
    """
    _check_layer(layer_idx, num_layers)
    factor = 1 + 1e-5 if num_layers == 1 else 1 - layer_idx / (num_layers - 1) + 1e-5
    return -alibi_slopes(num_heads) * factor
