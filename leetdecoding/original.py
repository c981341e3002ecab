"""The original LeetDecoding call, `causal_linear_decoder`, with its semantics and method names.

One decay convention everywhere: with `is_mask_weight`, lambda = exp(-gamma) when `is_need_exp`, else
lambda = gamma. The original mixed the two between branches; here every branch is the same call.
"""

from __future__ import annotations

import logging

import torch

from .api import attention
from .decay import check_not_meta
from .dispatch import MethodRefusedError
from .methods import REGISTRY

log = logging.getLogger("leetdecoding")

# original name -> method here
ALIASES = {
    "vanilla": "vanilla",
    "lightningAttention2": "chunked",
    "lightningAttention2_torch": "chunked",
    "lightningAttention2_optimized": "chunked",
    "block-based": "chunked",
    "FleetAttention": "fleet",
    "FleetAttention_torch": "fleet",
    "causal_dot_product": "recurrent",
    "causal_dot_product_torch": "recurrent",
    "recursion": "recursion",
}
# names of the original's GPU kernels: their Triton method here where it can run, else the same algorithm in PyTorch
GPU_KERNELS = {
    "lightningAttention2": "triton_chunked",
    "lightningAttention2_optimized": "triton_chunked",
    "FleetAttention": "triton_fleet",
    "causal_dot_product": "triton_recurrent",
}
_logged: set[str] = set()


def causal_linear_decoder(q, k, v, is_mask_weight=False, gamma=None, is_need_exp=True, attn_method=None):
    """The original entry point. q, k: (B, H, N, Dk); v: (B, H, N, Dv); returns o (B, H, N, Dv).

    is_mask_weight=False: plain causal linear attention (lambda = 1). With is_mask_weight=True, gamma (H,) gives
    lambda = exp(-gamma) when is_need_exp (gamma >= 0), else lambda = gamma (in (0, 1]). gamma is a real tensor
    (its dtype and device are converted as `attention` converts a decay); errors about it name gamma.
    attn_method: None (choose automatically), one of the original names (ALIASES) or a method name of this library.
    """
    _check_flag("is_mask_weight", is_mask_weight)
    _check_flag("is_need_exp", is_need_exp)
    if gamma is not None and not is_mask_weight:
        raise ValueError("gamma is given but is_mask_weight=False; pass is_mask_weight=True to use the decay gamma.")
    if is_mask_weight and gamma is None:
        raise ValueError("is_mask_weight=True needs gamma, a tensor of shape (H,); got gamma=None.")
    method = _method_name(attn_method, q)
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
            f"attn_method={attn_method!r} (method {method!r} here) cannot run these inputs: {e} "
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


def _method_name(attn_method, q) -> str:
    if attn_method is None:
        return "auto"
    if not isinstance(attn_method, str):
        raise TypeError(f"attn_method must be a string or None; got {type(attn_method).__name__}.")
    if attn_method != "auto" and attn_method not in ALIASES and attn_method not in REGISTRY:
        raise ValueError(
            f"attn_method must be None, 'auto', an original name ({', '.join(ALIASES)}) or a method of this "
            f"library ({', '.join(REGISTRY)}); got unknown method {attn_method!r}."
        )
    if attn_method in GPU_KERNELS:
        kernel = REGISTRY[GPU_KERNELS[attn_method]]
        on_gpu = isinstance(q, torch.Tensor) and q.device.type == "cuda"
        if on_gpu and kernel.unavailable_reason() is None:
            return kernel.name
        if attn_method not in _logged:
            _logged.add(attn_method)
            why = "the inputs are not on a CUDA device" if not on_gpu else kernel.unavailable_reason()
            log.warning(
                "attn_method=%r runs as the PyTorch method %r (the same algorithm): %s.",
                attn_method,
                ALIASES[attn_method],
                why,
            )
    return ALIASES.get(attn_method, attn_method)
