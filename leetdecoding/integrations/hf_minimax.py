"""transformers' MiniMax lightning attention, computed by leetdecoding: exact, faster, fp32 state.

    from leetdecoding.integrations import hf_minimax
    print(hf_minimax.patch(model))     # every MiniMaxLightningAttention of this model instance
    out = model.generate(ids, cache=hf_minimax.LeetMiniMaxCache())   # the cache is optional, see below
    hf_minimax.unpatch(model)          # the original forwards back, exactly

`MiniMaxLightningAttention` is leetdecoding's operator with lambda_h = exp(-slope_rate_h) and scale 1. The patched
forward keeps the module's own projections, activation, padding mask, norm and output gate, and replaces the
attention in between: a prefill by `leetdecoding.attention` (method "auto": vanilla up to 128 tokens, chunked
beyond), one or many new tokens after a cached state by `attention(initial_state=...)`, one token by `decode_step`.
The state it stores in the cache is fp32 (fp64 for fp64 models) whatever the model dtype, and a state it reads
from the cache must be in that dtype (TypeError otherwise, as for `attention`'s initial_state: never cast silently).

Only instances change: `module.forward` is set on each layer, and an attribute `_leetdecoding_patch` records the
original. No parameter or buffer is added, renamed or removed, so `state_dict`, `load_state_dict` and
`save_pretrained` see the same model.

Caches: transformers' `MiniMaxCache` works as it does unpatched (prefill, decode, beam search). Pass a
`LeetMiniMaxCache` to also get exact multi-token continuation when layer 0 is a linear-attention layer, and beam
search that reorders the linear states (see `hf_minimax_cache`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.minimax.modeling_minimax import MiniMaxLightningAttention

import leetdecoding as ld
from leetdecoding.amp import autocast_off
from leetdecoding.decay import log_decay_from
from leetdecoding.inputs import check_state_dtype
from leetdecoding.methods.recurrent import step, step_decay
from leetdecoding.nn import zero_padding

from .hf_minimax_cache import LeetMiniMaxCache

__all__ = ["patch", "unpatch", "report", "is_patched", "PatchReport", "LayerReport", "LeetMiniMaxCache"]

_ATTR = "_leetdecoding_patch"
_EXPLAIN_MEMO_SIZE = 64  # distinct call shapes whose method name is remembered per layer


@dataclass
class _Patch:
    """What `patch` keeps on a layer: the forward to restore, the chosen method, the decay, the calls made."""

    method: str
    original: object  # the instance attribute `forward` before patching, or None when there was none
    calls: dict[str, dict[str, int]] = field(default_factory=dict)
    _methods: dict = field(default_factory=dict)

    @staticmethod
    def log_decay(module) -> torch.Tensor:
        """-slope_rate as (H,), from the buffer's values at this call (leetdecoding remembers what it derives
        from them by value)."""
        return _neg_slope(module.slope_rate)

    def count(self, path: str, method: str) -> None:
        per_path = self.calls.setdefault(path, {})
        per_path[method] = per_path.get(method, 0) + 1

    def method_for(self, path: str, q, k, v, log_decay, state) -> str:
        """The method leetdecoding uses for this call (remembered per shape, as "auto" depends on the shape)."""
        key = (path, tuple(q.shape), q.dtype, q.device)
        name = self._methods.get(key)
        if name is None:
            name = ld.explain(
                q, k, v, log_decay=log_decay, method=self.method, initial_state=state, output_final_state=True
            ).method
            if len(self._methods) >= _EXPLAIN_MEMO_SIZE:
                self._methods.pop(next(iter(self._methods)))
            self._methods[key] = name
        return name


def _neg_slope(slope: torch.Tensor) -> torch.Tensor:
    """log lambda (H,) of MiniMax's slope_rate buffer (H, 1, 1): lambda = exp(-slope)."""
    return -slope.detach().reshape(-1)


def _cached_state(cache, layer_idx: int, dtype: torch.dtype):
    """This layer's state in `cache` (in the state dtype, else TypeError), or None before the layer's first forward."""
    if cache is None:
        return None
    if not hasattr(cache, "get_linear_cache"):
        raise TypeError(
            "cache must be a transformers MiniMaxCache (or leetdecoding's LeetMiniMaxCache); got "
            f"{type(cache).__name__}."
        )
    state = cache.get_linear_cache(layer_idx)
    if not isinstance(state, torch.Tensor):
        return None
    # never cast (the rule of leetdecoding.attention's initial_state): a state in another dtype comes from a
    # cache that the unpatched model filled, whose bf16 / fp16 state has already lost the fp32 accuracy
    check_state_dtype(f"the cache's linear state of layer {layer_idx}", state, dtype)
    return state


def _attend(self, rec: _Patch, qkv: torch.Tensor, state):
    """Attention after `state` (None: from zeros) of qkv (B, N, H, 3, D). Returns o (B, N, H * D) and the state."""
    b, n, h, _, d = qkv.shape
    if state is not None and n == 1:
        # one token: the recurrence step itself, on inputs this layer made (nothing for the public checks to
        # catch), with lambda kept per layer and the cached state updated in place when autograd allows
        rec.count("decode", "decode_step")
        cd = state.dtype
        q, k, v = (t.to(cd) for t in qkv[:, 0].unbind(2))  # (B, H, D)
        in_place = not (torch.is_grad_enabled() and (qkv.requires_grad or state.requires_grad))
        # validated once per slope values (on a GPU: per buffer and version), then remembered
        log_decay = log_decay_from(self.slope_rate, _neg_slope, h, state.device, cd)
        with autocast_off(state.device.type):  # as in ld.attention: autocast changes nothing in the state
            o, state = step(state, q, k, v, step_decay(log_decay), state if in_place else None)
        return o.to(qkv.dtype).reshape(b, 1, h * d), state
    q, k, v = qkv.permute(3, 0, 2, 1, 4).unbind(0)  # (B, H, N, D) views
    path = "prefill" if state is None else "continue"
    log_decay = rec.log_decay(self)
    method = rec.method_for(path, q, k, v, log_decay, state)
    o, state = ld.attention(
        q, k, v, log_decay=log_decay, method=rec.method, initial_state=state, output_final_state=True
    )
    rec.count(path, method)
    return o.transpose(1, 2).reshape(b, n, h * d), state


def _lightning_forward(
    self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, *, past_key_values=None, **kwargs
):
    """MiniMaxLightningAttention.forward with the attention computed by leetdecoding. Returns (output, state)."""
    rec: _Patch = getattr(self, _ATTR)
    cache = next((c for c in (cache, past_key_values, kwargs.get("past_key_value")) if c is not None), None)
    b, n, _ = hidden_states.shape
    qkv = self.act_fn(self.qkv_proj(hidden_states))
    if attention_mask is not None:  # as transformers' apply_mask_to_padding_states, but NaN in padding stays out
        qkv = zero_padding(qkv, attention_mask[:, :, None])
    qkv = qkv.reshape(b, n, self.num_attention_heads, 3, self.head_dim)  # per head [q | k | v], as MiniMax splits it
    o, state = _attend(self, rec, qkv, _cached_state(cache, self.layer_idx, qkv.dtype))
    o = self.out_proj(F.sigmoid(self.output_gate(hidden_states)) * self.norm(o))
    if cache is not None:
        cache.set_linear_cache(self.layer_idx, state)
        if hasattr(cache, "add_linear_tokens"):  # LeetMiniMaxCache counts tokens in models without keys
            cache.add_linear_tokens(self.layer_idx, n)
    return o, state


@dataclass
class LayerReport:
    """One lightning-attention layer: where it is, its shape, and what leetdecoding did with it."""

    name: str
    layer_idx: int
    heads: int
    head_dim: int
    patched: bool
    method: str | None  # the method asked for at patch time ("auto" lets the dispatcher choose per call)
    calls: dict[str, dict[str, int]]  # "prefill" / "continue" / "decode" -> {method used: number of calls}


@dataclass
class PatchReport:
    """What `patch`, `unpatch` or `report` found in a model: one entry per MiniMaxLightningAttention."""

    model: str
    layers: list[LayerReport]

    @property
    def patched(self) -> list[str]:
        return [layer.name for layer in self.layers if layer.patched]

    def __str__(self) -> str:
        lines = [f"{self.model}: {len(self.patched)} of {len(self.layers)} lightning-attention layers patched"]
        for r in self.layers:
            used = "; ".join(
                f"{path}: " + ", ".join(f"{m} x{c}" for m, c in per.items()) for path, per in r.calls.items()
            )
            state = f"method={r.method}" if r.patched else "not patched"
            lines.append(f"  {r.name} (layer {r.layer_idx}, {r.heads} heads x {r.head_dim}): {state}"
                         + (f"; used {used}" if used else ""))
        return "\n".join(lines)


def _lightning_layers(model, what: str) -> list[tuple[str, MiniMaxLightningAttention]]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{what} expects a transformers MiniMax model (an nn.Module); got {type(model).__name__}.")
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, MiniMaxLightningAttention)]
    if not found:
        raise ValueError(
            f"{what} expects a transformers MiniMax model (MiniMaxForCausalLM, MiniMaxModel, ...) with at least one "
            f"MiniMaxLightningAttention layer; {type(model).__name__} has none. Hint: MiniMax's config marks them "
            "with layer_types 'linear_attention'."
        )
    return found


def _check_method(method) -> str:
    states = [m["name"] for m in ld.list_methods() if m["state"]]
    if not isinstance(method, str):
        raise TypeError(f"method must be a string, 'auto' or one of {', '.join(states)}; got {type(method).__name__}.")
    if method != "auto" and method not in states:
        raise ValueError(
            f"method must be 'auto' or a method that carries a state ({', '.join(states)}); got {method!r}. "
            "Hint: leetdecoding.list_methods() lists them."
        )
    return method


def _is_ours(module) -> bool:
    fwd = module.__dict__.get("forward")
    return isinstance(fwd, functools.partial) and fwd.func is _lightning_forward and fwd.args[0] is module


def report(model) -> PatchReport:
    """Every MiniMaxLightningAttention of `model`: patched or not, the method asked for, the methods used."""
    layers = []
    for name, m in _lightning_layers(model, "report"):
        rec = m.__dict__.get(_ATTR)
        layers.append(
            LayerReport(
                name=name or type(m).__name__,
                layer_idx=m.layer_idx,
                heads=m.num_attention_heads,
                head_dim=m.head_dim,
                patched=rec is not None,
                method=rec.method if rec is not None else None,
                calls={p: dict(c) for p, c in rec.calls.items()} if rec is not None else {},
            )
        )
    return PatchReport(type(model).__name__, layers)


def is_patched(model) -> bool:
    """True when every lightning-attention layer of `model` is patched."""
    return all(r.patched for r in report(model).layers)


def patch(model, *, method: str = "auto") -> PatchReport:
    """Compute every MiniMaxLightningAttention of this model instance with leetdecoding; returns the report.

    `method` is "auto" (the dispatcher chooses per call) or a method name that supports states. Patching a
    patched model only changes the method. Raises ValueError for a model without lightning-attention layers.
    """
    method = _check_method(method)
    for _name, m in _lightning_layers(model, "patch"):
        rec = m.__dict__.get(_ATTR)
        if rec is not None:
            rec.method, rec._methods = method, {}
            continue
        setattr(m, _ATTR, _Patch(method=method, original=m.__dict__.get("forward")))
        m.forward = functools.partial(_lightning_forward, m)  # a partial, unlike a bound method, pickles
    return report(model)


def unpatch(model) -> PatchReport:
    """Give every patched layer its original forward back (layers that were not patched are left alone).

    Unpatch between generations: a cache filled by the patched model holds fp32 states, which transformers'
    own forward does not mix with a bf16 / fp16 model."""
    layers = _lightning_layers(model, "unpatch")
    for name, m in layers:
        if m.__dict__.get(_ATTR) is not None and not _is_ours(m):
            raise ValueError(
                f"{name}.forward was replaced after patch(); unpatch would discard that change. Restore it first."
            )
    for _name, m in layers:
        rec = m.__dict__.pop(_ATTR, None)
        if rec is None:
            continue
        if rec.original is None:
            del m.forward
        else:
            m.forward = rec.original
    return report(model)
