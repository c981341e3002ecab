"""The original LeetDecoding call, `causal_linear_decoder`, with its semantics and method names.

One decay convention everywhere: with `is_mask_weight`, lambda = exp(-gamma) when `is_need_exp`, else
lambda = gamma. The original mixed the two between branches; here every branch is the same call.
"""

from __future__ import annotations

import logging

import torch

from .api import attention
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
    lambda = exp(-gamma) when is_need_exp, else lambda = gamma. attn_method: None (choose automatically), one of
    the original names (ALIASES) or a method name of this library.
    """
    if gamma is not None and not is_mask_weight:
        raise ValueError("gamma is given but is_mask_weight=False; pass is_mask_weight=True to use the decay gamma.")
    if is_mask_weight and gamma is None:
        raise ValueError("is_mask_weight=True needs gamma, a tensor of shape (H,); got gamma=None.")
    method = _method_name(attn_method, q)
    if not is_mask_weight:
        return attention(q, k, v, method=method)
    heads = q.shape[1] if isinstance(q, torch.Tensor) and q.ndim == 4 else None
    if not isinstance(gamma, torch.Tensor) or gamma.ndim != 1 or (heads is not None and gamma.shape[0] != heads):
        got = tuple(gamma.shape) if isinstance(gamma, torch.Tensor) else type(gamma).__name__
        raise ValueError(f"gamma must be a tensor of shape ({heads},) (one value per head); got {got}.")
    if is_need_exp:
        if bool((gamma < 0).any()):
            raise ValueError(
                f"with is_need_exp=True, lambda = exp(-gamma) needs gamma >= 0; got {gamma.min().item():.6g}."
            )
        return attention(q, k, v, log_decay=-gamma, method=method)
    return attention(q, k, v, decay=gamma, method=method)


def _method_name(attn_method, q) -> str:
    if attn_method is None:
        return "auto"
    if not isinstance(attn_method, str):
        raise TypeError(f"attn_method must be a string or None; got {type(attn_method).__name__}.")
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
