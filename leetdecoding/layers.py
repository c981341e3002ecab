"""The core of a decaying linear-attention layer, shared by `leetdecoding.nn` and the model integrations.

A MiniMax-style layer is out_proj(sigmoid(output_gate(x)) * norm(attention(q, k, v))) with q, k, v = act(qkv_proj(x))
laid out per head as [q | k | v]. The projections, norm and gate are the caller's modules; what every such layer does
the same way is here, once:

    q, k, v = split_heads(qkv, heads, head_dim, act, attention_mask=mask)     # (B, H, N, D) views
    o, state = attend(q, k, v, state, log_decay=log_decay, keep_state=True)   # o (B, N, H * D)
    y = gated_output(o, x, norm, output_gate, out_proj)

A gated layer (fla's SimpleGLA convention) replaces the per-head decay by one per token and head:
`log_decay = gate_log_decay(gk_proj(x), normaliser, attention_mask)` (B, H, N), which `attend` takes as it is.

`attend` picks the path from the cached state: a prefill (no state) and a continuation (a state, several tokens) go
through `leetdecoding.attention`, one token after a state through `leetdecoding.decode_step`; both choose their
method through the dispatcher, so a caller learns which one ran with `leetdecoding.record_choices()`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from .api import attention, decode_step
from .inputs import check_state_dtype, compute_dtype_for


def zero_padding(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x with the positions where `mask` (0/1 or bool, broadcasting against x) is 0 set to exactly 0. Not x * mask:
    a NaN or inf in a padded position would survive it (0 x NaN = NaN) and spread through the state."""
    return x.masked_fill(mask == 0, 0.0)


def padding_mask(attention_mask: torch.Tensor | None, b: int, n: int) -> torch.Tensor | None:
    """attention_mask as (B, N) for the N tokens of this call: (B, N) as it is, or (B, past + N) as transformers
    passes it while generating (its last N columns).

    Raises:
        ValueError: not 2-D, another batch size, or fewer than N columns.
    """
    if attention_mask is None:
        return None
    if attention_mask.ndim != 2 or attention_mask.shape[0] != b or attention_mask.shape[1] < n:
        raise ValueError(
            f"attention_mask must have shape (B, N) = ({b}, {n}) (or (B, past + N), whose last N columns are used); "
            f"got {tuple(attention_mask.shape)}."
        )
    return attention_mask[:, -n:] if n else attention_mask[:, :0]


def split_heads(
    qkv: torch.Tensor,
    heads: int,
    head_dim: int,
    act: Callable[[torch.Tensor], torch.Tensor],
    *,
    activate_v: bool = True,
    attention_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v (B, H, N, D) as strided views (no copy) of a projection qkv (B, N, H * 3 * D), laid out per head as
    [q | k | v] (MiniMax's layout).

    `act` is applied to q and k, and to v when `activate_v` (MiniMax does). attention_mask (B, N) of 0/1 zeroes the
    q, k, v of padded tokens after the activation (whose value at 0 need not be 0), as transformers'
    apply_mask_to_padding_states does, but by selection so that NaN in padding stays out.
    """
    b, n, _ = qkv.shape
    qkv = qkv.reshape(b, n, heads, 3, head_dim)
    if activate_v:
        qkv = act(qkv)
    else:
        qkv = torch.cat((act(qkv[:, :, :, :2]), qkv[:, :, :, 2:]), dim=3)
    attention_mask = padding_mask(attention_mask, b, n)
    if attention_mask is not None:
        qkv = zero_padding(qkv, attention_mask[:, :, None, None, None])
    q, k, v = qkv.permute(3, 0, 2, 1, 4).unbind(0)
    return q, k, v


def gate_log_decay(logits: torch.Tensor, normaliser: float, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token log decays (B, H, N) from gate logits (B, N, H): logsigmoid(logits) / normaliser, fla's gated
    layers' convention (`gate_logit_normalizer`), in the state dtype (fp32, fp64 for fp64 logits) so that a
    half-precision model's decays keep fp32 digits. Every value is <= 0; a normaliser > 1 keeps lambda near 1.

    attention_mask (B, N) of 0/1: a padded token gets log decay 0 (lambda = 1), so that with its k, v zeroed it
    leaves the state exactly as it was (and a NaN in its hidden state never reaches the decay)."""
    g = F.logsigmoid(logits.to(compute_dtype_for(logits.dtype))) / normaliser
    attention_mask = padding_mask(attention_mask, *logits.shape[:2])
    if attention_mask is not None:
        g = zero_padding(g, attention_mask[:, :, None])
    return g.transpose(1, 2)  # a (B, H, N) view: the methods take strided decays


def _needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: torch.Tensor | None,
    *,
    log_decay: torch.Tensor,  # (H,) per head, or (B, H, N) per token (see gate_log_decay)
    scale: float = 1.0,
    method: str | Sequence[str] = "auto",
    keep_state: bool = True,
    state_name: str = "the cached state",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention of q, k (B, H, N, Dk), v (B, H, N, Dv) after `state` (None: from zeros). Returns o (B, N, H * Dv)
    in the input dtype and the new state (None when `keep_state` is False and no state was given).

    One token after a state is a decode step (`decode_step`, its own methods chosen by the dispatcher, with the
    token's own (B, H) decay when the decay is per token); the state is updated in place when no gradient is
    needed, so a cache holds one buffer per layer. Anything else is `attention` with `method` (a prefill, or
    several new tokens continuing from the state).

    Raises:
        TypeError: `state` is not in the state dtype (fp32, fp64 for fp64 inputs); `state_name` names it. Never cast:
            a state in another dtype has already lost the accuracy an fp32 state keeps.
        TypeError / ValueError / MethodRefusedError: as `attention` and `decode_step`.
    """
    b, h, n, dv = v.shape
    if state is not None:
        check_state_dtype(state_name, state, q.dtype)
    if state is not None and n == 1:
        in_place = not _needs_grad(q, k, v, state, log_decay)
        if log_decay.ndim == 3:  # per token: the decay of this step's one token
            log_decay = log_decay[:, :, 0]
        o, state = decode_step(
            q[:, :, 0],
            k[:, :, 0],
            v[:, :, 0],
            state,
            log_decay=log_decay,
            scale=scale,
            out_state=state if in_place else None,
        )
        return o.reshape(b, 1, h * dv), state
    keep_state = keep_state or state is not None
    result = attention(
        q, k, v, log_decay=log_decay, scale=scale, method=method, initial_state=state, output_final_state=keep_state
    )
    o, state = (result.output, result.final_state) if keep_state else (result, None)
    return o.transpose(1, 2).reshape(b, n, h * dv), state


def gated_output(
    o: torch.Tensor,
    hidden_states: torch.Tensor,
    norm: Callable[[torch.Tensor], torch.Tensor] | None,
    output_gate: Callable[[torch.Tensor], torch.Tensor] | None,
    out_proj: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """out_proj(sigmoid(output_gate(hidden_states)) * norm(o)); a norm or gate that is None is left out."""
    if norm is not None:
        o = norm(o)
    if output_gate is not None:
        o = torch.sigmoid(output_gate(hidden_states)) * o
    return out_proj(o)
