"""transformers' MiniMax lightning attention, computed by leetdecoding: exact, with an fp32 state.

    from leetdecoding.integrations import hf_minimax
    print(hf_minimax.patch(model))     # every MiniMaxLightningAttention of this model instance
    out = model.generate(ids, cache=hf_minimax.LeetMiniMaxCache())   # the cache is optional, see below
    print(hf_minimax.report(model))    # per layer: the methods that ran for prefill, continuation and decode
    hf_minimax.unpatch(model)          # the original forwards back, exactly

`MiniMaxLightningAttention` is leetdecoding's operator with lambda_h = exp(-slope_rate_h) and scale 1. The patched
forward keeps the module's own projections, activation, norm and output gate, and computes the rest with the core
that `leetdecoding.nn` uses (`leetdecoding.layers`): q, k, v split per head as MiniMax lays them out ([q | k | v]),
padded tokens zeroed, then a prefill (no cached state) or several new tokens after a cached state by
`leetdecoding.attention` with the method given to `patch` ("auto": the dispatcher chooses per call), and one token
after a cached state by `leetdecoding.decode_step` (its dispatcher chooses: the fused Triton kernel on a GPU, the
torch step elsewhere), which updates the cached state in place when no gradient is needed. The methods that ran are
read with `leetdecoding.record_choices()` and counted per layer in `report`.

The state it stores in the cache is fp32 (fp64 for fp64 models) whatever the model dtype, and a state it reads from
the cache must be in that dtype (TypeError otherwise, as for `attention`'s initial_state: never cast silently).

Only instances change (see `leetdecoding.integrations._patch`): `module.forward` is set on each layer, and an
attribute `_leetdecoding_patch` records the original. No parameter or buffer is added, renamed or removed, so
`state_dict`, `load_state_dict` and `save_pretrained` see the same model.

Caches: transformers' `MiniMaxCache` works as it does unpatched (prefill, decode, beam search). Pass a
`LeetMiniMaxCache` to also get exact multi-token continuation when layer 0 is a linear-attention layer, and beam
search that reorders the linear states (see `hf_minimax_cache`).
"""

from __future__ import annotations

import torch

from leetdecoding.inputs import compute_dtype_for
from leetdecoding.layers import attend, gated_output, split_heads

from ._minimax_classes import MiniMaxLightningAttention
from ._patch import Integration, LayerReport, PatchReport, check_method, record
from .hf_minimax_cache import LeetMiniMaxCache

__all__ = ["patch", "unpatch", "report", "is_patched", "PatchReport", "LayerReport", "LeetMiniMaxCache"]


def _neg_slope(slope: torch.Tensor) -> torch.Tensor:
    """log lambda (H,) of MiniMax's slope_rate buffer (H, 1, 1): lambda = exp(-slope)."""
    return -slope.detach().reshape(-1)


def _cached_state(cache, layer_idx: int) -> torch.Tensor | None:
    """This layer's state in `cache`, or None before the layer's first forward (MiniMaxCache holds [] there).

    Raises:
        TypeError: `cache` is not a MiniMaxCache (it has no linear-attention states).
    """
    if cache is None:
        return None
    if not hasattr(cache, "get_linear_cache"):
        raise TypeError(
            "cache must be a transformers MiniMaxCache (or leetdecoding's LeetMiniMaxCache); got "
            f"{type(cache).__name__}."
        )
    state = cache.get_linear_cache(layer_idx)
    return state if isinstance(state, torch.Tensor) else None


def _lightning_forward(
    self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, *, past_key_values=None, **kwargs
):
    """MiniMaxLightningAttention.forward with the attention computed by leetdecoding. Returns (output, state)."""
    rec = record(self)
    cache = next((c for c in (cache, past_key_values, kwargs.get("past_key_value")) if c is not None), None)
    heads, qkv = self.num_attention_heads, self.qkv_proj(hidden_states)
    q, k, v = split_heads(qkv, heads, self.head_dim, self.act_fn, attention_mask=attention_mask)
    log_decay = rec.log_decay(self.slope_rate, _neg_slope, heads, q.device, compute_dtype_for(q.dtype))
    state = _cached_state(cache, self.layer_idx)
    with rec.counting(continues=state is not None):
        # never cast a cached state: one in another dtype comes from a cache that the unpatched model filled,
        # whose bf16 / fp16 state has already lost the fp32 accuracy
        o, state = attend(
            q,
            k,
            v,
            state,
            log_decay=log_decay,
            method=rec.method,
            state_name=f"the cache's linear state of layer {self.layer_idx}",
        )
    o = gated_output(o, hidden_states, self.norm, self.output_gate, self.out_proj)
    if cache is not None:
        cache.set_linear_cache(self.layer_idx, state)
        if hasattr(cache, "add_linear_tokens"):  # LeetMiniMaxCache counts tokens in models without keys
            cache.add_linear_tokens(self.layer_idx, hidden_states.shape[1])
    return o, state


def _describe(module: MiniMaxLightningAttention) -> tuple[int, int, int]:
    return module.layer_idx, module.num_attention_heads, module.head_dim


_MINIMAX = Integration(
    layer_type=MiniMaxLightningAttention,
    forward=_lightning_forward,
    describe=_describe,
    model="a transformers MiniMax model",
    examples="MiniMaxForCausalLM, MiniMaxModel, ...",
    kind="lightning-attention",
    hint="MiniMax's config marks them with layer_types 'linear_attention'.",
)


def report(model) -> PatchReport:
    """Every MiniMaxLightningAttention of `model`: patched or not, the method asked for, the methods used.

    Raises:
        TypeError: `model` is not an nn.Module.
        ValueError: it has no MiniMaxLightningAttention layer.
    """
    return _MINIMAX.report(model)


def is_patched(model) -> bool:
    """True when every lightning-attention layer of `model` is patched (raises as `report`)."""
    return all(r.patched for r in report(model).layers)


def patch(model, *, method: str = "auto") -> PatchReport:
    """Compute every MiniMaxLightningAttention of this model instance with leetdecoding; returns the report.

    `method` is "auto" (the dispatcher chooses per call) or an attention method name (`leetdecoding.list_methods()`),
    used for prefill and continuation; one-token decode steps always let the dispatcher choose their decode method.
    Patching a patched model only changes the method.

    Raises:
        TypeError: `model` is not an nn.Module, or `method` is not a string.
        ValueError: `model` has no lightning-attention layer, or `method` names no attention method.
    """
    return _MINIMAX.patch(model, check_method(method))


def unpatch(model) -> PatchReport:
    """Give every patched layer its original forward back (layers that were not patched are left alone).

    Unpatch between generations: a cache filled by the patched model holds fp32 states, which transformers'
    own forward does not mix with a bf16 / fp16 model.

    Raises:
        TypeError / ValueError: as `report`; ValueError also when a patched layer's forward was replaced after
            `patch` (nothing is restored then: restore that forward first).
    """
    return _MINIMAX.unpatch(model)
