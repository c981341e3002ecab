"""The original LeetDecoding call, `causal_linear_decoder`, with its semantics and method names.

One decay convention everywhere: with `is_mask_weight`, lambda = exp(-gamma) when `is_need_exp`, else
lambda = gamma. The original mixed the two between branches; here every branch is the same call.
"""

from __future__ import annotations

import torch

from .api import attention
from .choice import MethodRefusedError
from .decay import check_not_meta
from .methods import REGISTRY

# original name -> the methods here that compute its algorithm: the dispatcher runs the first of them, in its
# order, that can run the inputs (the Triton kernel of a GPU name on CUDA, else the same algorithm in PyTorch;
# `leetdecoding.record_choices` tells which ran, `explain(..., method=ALIASES[name])` why).
ALIASES = {
    "vanilla": ("vanilla",),
    "lightningAttention2": ("triton_chunked", "chunked"),
    "lightningAttention2_torch": ("chunked",),
    "lightningAttention2_optimized": ("triton_chunked", "chunked"),
    "block-based": ("chunked",),
    "FleetAttention": ("triton_fleet", "fleet"),
    "FleetAttention_torch": ("fleet",),
    "causal_dot_product": ("triton_recurrent", "recurrent"),
    "causal_dot_product_torch": ("recurrent",),
    "recursion": ("recursion",),
}


def causal_linear_decoder(q, k, v, is_mask_weight=False, gamma=None, is_need_exp=True, attn_method=None):
    """The original entry point. q, k: (B, H, N, Dk); v: (B, H, N, Dv); returns o (B, H, N, Dv).

    is_mask_weight=False: plain causal linear attention (lambda = 1). With is_mask_weight=True, gamma (H,) gives
    lambda = exp(-gamma) when is_need_exp (gamma >= 0), else lambda = gamma (in (0, 1]). gamma is a real tensor
    (its dtype and device are converted as `attention` converts a decay); errors about it name gamma.
    attn_method: None (choose automatically), one of the original names (ALIASES) or a method name of this library.

    Raises:
        TypeError: a flag that is not a bool, gamma not a real tensor, attn_method not a string.
        ValueError: gamma given without is_mask_weight (or missing with it), gamma outside its convention's range
            or of the wrong shape, an unknown attn_method; MethodRefusedError when the method cannot run the
            inputs (its message says why and how to choose one that can).
    """
    _check_flag("is_mask_weight", is_mask_weight)
    _check_flag("is_need_exp", is_need_exp)
    if gamma is not None and not is_mask_weight:
        raise ValueError("gamma is given but is_mask_weight=False; pass is_mask_weight=True to use the decay gamma.")
    if is_mask_weight and gamma is None:
        raise ValueError("is_mask_weight=True needs gamma, a tensor of shape (H,); got gamma=None.")
    method = _method_name(attn_method)
    decay = {}
    if is_mask_weight:
        heads = q.shape[1] if isinstance(q, torch.Tensor) and q.ndim == 4 else None
        _check_gamma(gamma, heads, is_need_exp)
        if not gamma.is_floating_point():  # an integer rate: negated as a float (-uint8 would wrap around)
            gamma = gamma.double()
        decay = {"log_decay": -gamma} if is_need_exp else {"decay": gamma}
    try:
        return attention(q, k, v, method=method, **decay)
    except MethodRefusedError as e:
        if attn_method is None or attn_method == "auto":
            raise
        raise MethodRefusedError(
            f"attn_method={attn_method!r} (here {' or '.join(method) if isinstance(method, tuple) else method}) "
            f"cannot run these inputs: {e} "
            "Pass attn_method=None to choose one that can."
        ) from None


def _check_flag(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool (True or False); got {type(value).__name__} {value!r}.")


def _check_gamma(gamma, heads: int | None, is_need_exp: bool) -> None:
    """Check gamma in the caller's convention, so that no error names the decay it is converted to."""
    convention = "lambda = exp(-gamma)" if is_need_exp else "lambda = gamma"
    if not isinstance(gamma, torch.Tensor):
        raise TypeError(
            f"gamma must be a tensor of shape ({heads},) (one value per head, {convention}); got "
            f"{type(gamma).__name__}. Hint: torch.tensor(values) or torch.full(({heads},), value)."
        )
    if gamma.dtype == torch.bool or gamma.is_complex():
        raise TypeError(f"gamma must be a real tensor ({convention}); got {gamma.dtype}. Hint: gamma.float().")
    check_not_meta("gamma", gamma)
    if gamma.ndim != 1 or (heads is not None and gamma.shape[0] != heads):
        raise ValueError(f"gamma must be a tensor of shape ({heads},) (one value per head); got {tuple(gamma.shape)}.")
    g = gamma.detach().double()
    if is_need_exp:
        bad = ~torch.isfinite(g) | (g < 0)
        rule = "with is_need_exp=True, lambda = exp(-gamma) needs gamma >= 0 and finite"
        hint = "gamma = 0 is no decay; pass is_need_exp=False if gamma holds lambda itself."
    else:
        bad = ~torch.isfinite(g) | (g <= 0) | (g > 1)
        rule = "with is_need_exp=False, lambda = gamma must be in (0, 1]"
        hint = "pass is_need_exp=True if gamma holds a rate s with lambda = exp(-s)."
    if bool(bad.any()):
        values = ", ".join(f"{x:.6g}" for x in g[bad].tolist()[:4])
        raise ValueError(f"{rule}; got gamma = {values}. Hint: {hint}")


def _method_name(attn_method) -> str | tuple[str, ...]:
    if attn_method is None:
        return "auto"
    if not isinstance(attn_method, str):
        raise TypeError(f"attn_method must be a string or None; got {type(attn_method).__name__}.")
    if attn_method != "auto" and attn_method not in ALIASES and attn_method not in REGISTRY:
        raise ValueError(
            f"attn_method must be None, 'auto', an original name ({', '.join(ALIASES)}) or a method of this "
            f"library ({', '.join(REGISTRY)}); got unknown method {attn_method!r}."
        )
    return ALIASES.get(attn_method, attn_method)
