"""Decay conventions and converters.

The operator's decay is lambda_h in (0, 1] per head. Internally there is one canonical form, log lambda <= 0,
in fp32 (fp64 for fp64 inputs). The converters below return that canonical form, shape (H,), for the
conventions users meet; pass the result as `log_decay=`.

    ld.attention(q, k, v, log_decay=ld.decay.minimax(num_heads=8, layer_idx=3, num_layers=12))
"""

from __future__ import annotations

import math
import numbers
import sys

import numpy
import torch

from .memo import CheckedTensors, ValueMemo, tracing

__all__ = [
    "canonical_log_decay",
    "finite_log",
    "from_decay",
    "from_rate",
    "to_decay",
    "alibi_slopes",
    "alibi",
    "minimax_rates",
    "minimax",
    "retnet",
    "transnormer",
    "lightning",
    "fla_lightning",
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
    if isinstance(x, (bool, numpy.bool_)) or not isinstance(x, numbers.Real):
        raise TypeError(
            f"{name} must be a float, an (H,) tensor or a per-token (B, H, N) tensor; got {type(x).__name__} {x!r}."
        )
    return torch.tensor(_as_float(x), dtype=dtype or torch.float64, device="cpu")  # a number: checked on the CPU


def _as_float(x: numbers.Real) -> float:
    """float(x); a Python int beyond the float range stands for the largest float of its sign (a decay that far
    out is then refused by its range check, a log decay that far below 0 is the limit lambda = 0)."""
    try:
        return float(x)
    except OverflowError:
        return sys.float_info.max if x > 0 else -sys.float_info.max


def _describe_bad(t: torch.Tensor, bad: torch.Tensor) -> str:
    idx = bad.nonzero().flatten().tolist()[:4]
    vals = [t.flatten()[i].item() for i in idx] if t.ndim else [t.item()]
    return ", ".join(f"{v:.6g}" for v in vals)


_VALIDATED = ValueMemo(size=64)  # by value: python numbers and small CPU tensors (see leetdecoding.memo)
_CHECKED_ON_DEVICE = CheckedTensors()  # decay tensors on a GPU: the check is remembered, the values read per call


def canonical_log_decay(decay, log_decay, heads: int, device: torch.device, dtype: torch.dtype, derive=None):
    """Validate `decay` / `log_decay` and return log lambda of shape (heads,) in `dtype` on `device`.

    Accepts a float, a 0-d tensor or a (H,) tensor. Any real tensor dtype is accepted (the dtype of the decay
    is the one thing converted silently); a decay tensor on another device is moved to the inputs' device.

    Every call computes from the values the decay holds at that call, however they were written (in place,
    through `.data`, a numpy view, under torch.compile, from another thread). The result may be shared between
    calls with the same values: read it, never modify it in place.

    With `derive`, returns (log lambda, *derive(log lambda)) from one read of the decay's values, both remembered
    together (a decode step needs its factors every token: one read per call, not one per table). `derive` must
    compute on log lambda's device without reading values on the host. Pass a module-level function: it is part of
    the key.
    """

    def canonical(decay, log_decay):
        log = _canonical(decay, log_decay, heads, device, dtype)
        return log if derive is None else (log, *derive(log))  # flat: the memo checks each version

    raw = decay if decay is not None else log_decay
    if decay is not None and log_decay is not None or raw is None or tracing():
        return canonical(decay, log_decay)
    is_decay = decay is not None
    key = (is_decay, heads, device, dtype) + ((derive,) if derive is not None else ())

    def check(t):
        return canonical(t, None) if is_decay else canonical(None, t)

    if type(raw) in (float, int):  # a python number is its own value key
        return _VALIDATED.get(("number", raw, key), lambda: check(raw))
    if not isinstance(raw, torch.Tensor):
        return check(raw)  # a numpy scalar, not remembered; anything else raises the TypeError
    if derive is not None and not (raw.device.type in ("cpu", "meta") or raw.requires_grad):
        log = _from_tensor(raw, key[:-1], _log if is_decay else _same, lambda t: check(t)[0])
        return (log, *derive(log))  # a GPU tensor: checked once per version, converted on the device per call
    return _from_tensor(raw, key, _log if is_decay else _same, check)


def log_decay_from(source: torch.Tensor, to_log_decay, heads: int, device: torch.device, dtype: torch.dtype):
    """canonical_log_decay(None, to_log_decay(source), ...) for a decay kept in another form, e.g. MiniMax's
    slope_rate buffer with log lambda = -slope. Remembered by `source`'s values, or on a GPU checked once per
    `source` tensor and version: `source` keeps its identity from call to call, a tensor derived from it does not.
    `to_log_decay` is part of the key: pass a module-level function, not a new lambda per call."""

    def check(t):
        return _canonical(None, to_log_decay(t), heads, device, dtype)

    return _from_tensor(source, (to_log_decay, heads, device, dtype), to_log_decay, check)


def _log(t: torch.Tensor) -> torch.Tensor:
    return torch.log(t.to(torch.float64))


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


def _from_tensor(source: torch.Tensor, key: tuple, to_log_decay, check) -> torch.Tensor:
    """check(source) (validate and convert), remembered by `source`'s values where they can be read on the host
    (see leetdecoding.memo). On a GPU, reading them would be a host sync per call (per layer and token when
    decoding): there check() runs once per tensor and version, and later calls convert on the device,
    `to_log_decay(source)` placed as check() places it, so a result always holds the current values."""
    if source.device.type in ("cpu", "meta") or source.requires_grad or tracing():
        return _VALIDATED.derive(source, key, check)
    heads, device, dtype = key[1:]
    key = (*key, source.dtype, tuple(source.shape))
    if _CHECKED_ON_DEVICE.passed(source, key):
        return _placed(to_log_decay(source), heads, device, dtype)
    return _CHECKED_ON_DEVICE.check(source, key, lambda: check(source))


def _placed(log: torch.Tensor, heads: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A checked log lambda (a float, or (1,) or (heads,)) as (heads,) in `dtype` on `device`."""
    return finite_log(log.to(device=device, dtype=dtype)).expand(heads).contiguous()


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
            hint = (
                "the converters of leetdecoding.decay (minimax, retnet, from_rate, ...) return log lambda: pass "
                "them as log_decay="
                if bool((t <= 0).all())
                else "for a rate s with lambda = exp(-s), pass log_decay=-s or use leetdecoding.decay.from_rate"
            )
            got = _describe_bad(t, bad)
            raise ValueError(f"decay must be in (0, 1] (lambda = 1 is no decay); got {got}. Hint: {hint}.")
        log = torch.log(t)
    else:
        bad = t > 0
        if bool(bad.any()):
            raise ValueError(
                f"log_decay must be <= 0 (it is log lambda with lambda in (0, 1]); got {_describe_bad(t, bad)}. "
                "Hint: for a positive rate s, pass log_decay=-s."
            )
        log = t
    return _placed(log, heads, device, dtype)


def finite_log(log: torch.Tensor) -> torch.Tensor:
    """log lambda clamped to the dtype's most negative finite number (in place of -inf).

    A log decay below about -88 (fp32) is lambda = 0 to the dtype, and every such value gives the same results,
    but -inf (e.g. -1e300 converted to fp32) turns the exponent of the factor lambda^0 = 1 into -inf * 0 = NaN.
    Clamped, log lambda * e is 0 for e = 0 and at most overflows to -inf (whose exp is 0) for e > 0, so every
    table built from it is exact. The gradient passes through unclamped entries; a clamped entry has lambda = 0,
    where every decay factor's derivative is 0 anyway. Anything derived from log lambda that is used as a log
    decay again (lambda^m at a coarser level of a scan) goes through this function too.
    """
    return log.clamp(min=torch.finfo(log.dtype).min)


def from_decay(decay: float | torch.Tensor) -> torch.Tensor:
    """lambda in (0, 1] (a float or an (H,) tensor) -> log lambda, fp32 (a new tensor: the caller may modify it).

    Raises:
        TypeError: decay is not a real number or tensor. ValueError: a value outside (0, 1] or not finite.
    """
    return _canonical(decay, None, _heads(decay), torch.device("cpu"), torch.float32)


def from_rate(rate: float | torch.Tensor) -> torch.Tensor:
    """A rate s >= 0 with lambda = exp(-s) (LeetDecoding's `is_need_exp`, MiniMax slopes) -> log lambda = -s, fp32.

    Raises:
        TypeError: rate is not a real number or tensor. ValueError: a negative or non-finite rate.
    """
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

    Raises:
        ValueError: num_heads is not a positive int.
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

    Raises:
        ValueError: num_heads or num_layers not a positive int, layer_idx outside [0, num_layers).
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


def retnet(num_heads: int, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """log lambda for RetNet's gammas 1 - 2^(-5-h), h = 0..H-1 (computed with log1p, exact near 1), shape (H,).

    The same gammas as fla's `chunk_retention` (log(1 - 2^(-5-h)), which fla forms in fp32: there 1 - 2^(-5-h)
    rounds to 1, no decay, from h = 20 on; here every head keeps its decay). `dtype`: fp32, or fp64 for fp64 inputs.

    Raises:
        ValueError: num_heads is not a positive int.
    """
    h = torch.arange(_check_heads(num_heads), dtype=torch.float64)
    return torch.log1p(-(2.0 ** (-5.0 - h))).to(dtype)


def transnormer(num_heads: int, layer_idx: int, num_layers: int) -> torch.Tensor:
    """log lambda of TransNormerLLM's (OpenNLPLab) lightning attention layer `layer_idx` of `num_layers`, (H,) fp32:
    -slope_h * (1 - layer_idx / (L - 1) + 1e-5) with the ALiBi-style slopes (`alibi_slopes`), as its
    `TransnormerModel.forward` scales `_build_slope_tensor` per layer (and vLLM / SGLang's MiniMax-Text-01 backends).
    Not fla's `chunk_lightning_attn`, whose decays are linear in h: see `fla_lightning`.

    With one layer (L = 1, where the source formula divides by zero) the factor is 1 + 1e-5.

    Raises:
        ValueError: num_heads or num_layers not a positive int, layer_idx outside [0, num_layers).
    """
    _check_layer(layer_idx, num_layers)
    factor = 1 + 1e-5 if num_layers == 1 else 1 - layer_idx / (num_layers - 1) + 1e-5
    return -alibi_slopes(num_heads) * factor


lightning = transnormer  # the earlier name of TransNormerLLM's convention, kept for existing callers


def fla_lightning(
    num_heads: int, layer_idx: int, num_layers: int, *, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """log lambda of fla's `chunk_lightning_attn` (fla.ops.lightning_attn, unchanged from fla 0.3 on), shape (H,):
    log lambda_h = -(8 / H) (1 - layer_idx / L) h for h = 0..H-1, linear in h, head 0 undecayed. Computed as fla
    computes it (the coefficient in Python floats, times h in `dtype`), so fp32 values equal fla's exactly.

    Raises:
        ValueError: num_heads or num_layers not a positive int, layer_idx outside [0, num_layers).
    """
    h = _check_heads(num_heads)
    _check_layer(layer_idx, num_layers)
    return -(8 / h * (1 - layer_idx / num_layers)) * torch.arange(h, dtype=dtype)
