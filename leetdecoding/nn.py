"""A multi-head decaying linear-attention layer with a state cache for prefill + decode.

The layout and parameter names follow transformers' MiniMaxLightningAttention (qkv_proj, output_gate, norm,
out_proj), so such a layer's weights load directly:

    layer = DecayingLinearAttention(hidden_size=1024, num_heads=8, layer_idx=3, num_layers=12)
    layer.load_state_dict(minimax_layer.state_dict())      # MiniMax's derived decay buffers are recognised
    cache = LinearAttentionCache()
    y = layer(prompt, cache=cache)                          # prefill: the state goes into the cache
    y = layer(next_token, cache=cache)                      # decode: continues from it

`decay_gate=True` gives a data-dependent decay per head and token instead (fla's gated layers' convention).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import decay as _decay
from .layers import attend, gate_log_decay, gated_output, split_heads, zero_padding  # noqa: F401 (zero_padding: its old home)

ACTIVATIONS = {
    "silu": F.silu,
    "relu": F.relu,
    "elu1": lambda x: F.elu(x) + 1.0,
    "identity": lambda x: x,
}
# buffers of MiniMaxLightningAttention that are derived from slope_rate and have no counterpart here
_MINIMAX_DERIVED = ("query_decay", "key_decay", "diagonal_decay")


class LinearAttentionCache:
    """One state (B, H, Dk, Dv) per layer, fp32 (fp64 for fp64 models), for a batch of sequences.

    A state must be in that dtype (the rule of `attention`'s initial_state): one in another dtype is refused with
    a TypeError, never cast. `seen_tokens` counts the tokens the cache has seen, as transformers' caches do: the
    tokens of the first layer (the lowest layer index), prefill and decode alike; `get_seq_length(layer_idx)`
    counts one layer's.
    """

    def __init__(self) -> None:
        self.states: dict[int, torch.Tensor] = {}
        self.tokens: dict[int, int] = {}  # per layer: tokens whose state this cache holds

    def get(self, layer_idx: int) -> torch.Tensor | None:
        return self.states.get(layer_idx)

    def update(self, layer_idx: int, state: torch.Tensor, new_tokens: int = 0) -> None:
        """Store the state of layer `layer_idx` after `new_tokens` more tokens (the layer passes its length)."""
        self.states[layer_idx] = state
        self.tokens[layer_idx] = self.tokens.get(layer_idx, 0) + new_tokens

    def get_seq_length(self, layer_idx: int | None = None) -> int:
        """Tokens seen by layer `layer_idx` (by default the first layer), 0 before its first forward."""
        if layer_idx is None:
            layer_idx = min(self.tokens, default=None)
        return self.tokens.get(layer_idx, 0)

    @property
    def seen_tokens(self) -> int:
        return self.get_seq_length()

    @property
    def batch_size(self) -> int | None:
        return next((s.shape[0] for s in self.states.values()), None)

    def select(self, indices: torch.Tensor) -> None:
        """Keep (or reorder, or duplicate) batch rows: beam search's reorder by `beam_idx`."""
        for i, s in self.states.items():
            self.states[i] = s.index_select(0, indices.to(s.device))

    reorder = select

    def repeat_interleave(self, repeats: int) -> None:
        """Expand every sequence into `repeats` consecutive copies (beams start from one prompt)."""
        for i, s in self.states.items():
            self.states[i] = s.repeat_interleave(repeats, dim=0)

    def reset(self) -> None:
        self.states.clear()
        self.tokens.clear()


class DecayingLinearAttention(nn.Module):
    """o = out_proj(sigmoid(output_gate(x)) * norm(attention(q, k, v))) with q, k, v = act(qkv_proj(x)).

    Decay: `log_decay` (H,) if given, else MiniMax's per-layer slopes for (layer_idx, num_layers); any converter
    of `leetdecoding.decay` gives a valid `log_decay`; `learnable_decay=True` makes it a parameter. `activate_v=True`
    applies the activation to v as MiniMax does; False applies it to q and k only.

    Data-dependent decay (`decay_gate=True`, fla's SimpleGLA convention): the decay is computed from the input,
    one value per head and token, log lambda_t = logsigmoid(gk_proj(x_t)) / gate_logit_normalizer, with
    `gk_proj` = Linear(hidden_size, num_heads, bias=True) (fla's name and shape) in place of the per-head decay:
    such a layer has no `log_decay` (None) and takes no `log_decay` / `learnable_decay`. A larger normaliser keeps
    lambda nearer 1 (fla's default 16: lambda = 2^(-1/16) ~ 0.958 at a zero logit). It is not the output
    gate `use_gate` (sigmoid(output_gate(x)) on the attention's output), which works as before with either decay.

    `group` (a ProcessGroup, a 1-D DeviceMesh; also per call) trains sequence-parallel: each rank passes its slice
    of the sequence and the attention runs through `leetdecoding.distributed.attention` (exact; see its gradient
    convention: a learnable decay's gradient is a per-rank partial sum, reduced as for any replicated parameter).

    Raises:
        ValueError: an unknown `activation`, a `log_decay` > 0 or not of shape (num_heads,), `log_decay` or
            `learnable_decay` with `decay_gate`, a `gate_logit_normalizer` that is not a positive finite number.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        head_dim: int | None = None,
        *,
        log_decay: torch.Tensor | None = None,
        layer_idx: int = 0,
        num_layers: int = 1,
        activation: str = "silu",
        activate_v: bool = True,
        use_norm: bool = True,
        use_gate: bool = True,
        bias: bool = False,
        scale: float = 1.0,
        norm_eps: float = 1e-6,
        learnable_decay: bool = False,
        decay_gate: bool = False,
        gate_logit_normalizer: float = 16.0,
        method: str = "auto",
        group=None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}; got {activation!r}.")
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.head_dim = head_dim or hidden_size // num_heads
        self.layer_idx = layer_idx
        self.activation = activation
        self.activate_v = activate_v
        self.scale = scale
        self.method = method
        self.group = group
        inner = self.num_heads * self.head_dim
        kw = {"device": device, "dtype": dtype}
        self.qkv_proj = nn.Linear(hidden_size, 3 * inner, bias=bias, **kw)
        self.output_gate = nn.Linear(hidden_size, inner, bias=bias, **kw) if use_gate else None
        self.norm = nn.RMSNorm(inner, eps=norm_eps, **kw) if use_norm else None
        self.out_proj = nn.Linear(inner, hidden_size, bias=bias, **kw)
        self.gate_logit_normalizer = gate_logit_normalizer
        self.gk_proj = None
        if decay_gate:
            _check_gate_arguments(log_decay, learnable_decay, gate_logit_normalizer)
            self.gk_proj = nn.Linear(hidden_size, num_heads, bias=True, **kw)
            self.register_buffer("log_decay", None)  # the decay comes from gk_proj
        else:
            self._init_head_decay(log_decay, layer_idx, num_layers, learnable_decay, device)
        self._register_load_state_dict_pre_hook(_from_minimax_buffers, with_module=True)

    def _init_head_decay(self, log_decay, layer_idx, num_layers, learnable_decay, device) -> None:
        """The per-head decay: the buffer (or parameter) `log_decay` (H,), MiniMax's slopes by default."""
        if log_decay is None:
            log_decay = _decay.minimax(self.num_heads, layer_idx, num_layers)
        device = torch.device(device or "cpu")
        log_decay = _decay.canonical_log_decay(None, log_decay, self.num_heads, device, torch.float32)
        if learnable_decay:  # trained in log space; clamped to <= 0 where it is used
            self.log_decay = nn.Parameter(log_decay.clone())
        else:
            self.register_buffer("log_decay", log_decay.clone())

    def forward(
        self,
        hidden_states: torch.Tensor,
        cache: LinearAttentionCache | None = None,
        attention_mask: torch.Tensor | None = None,
        group=None,
    ) -> torch.Tensor:
        """hidden_states (B, N, hidden). With a cache: continue from its state for this layer (or start one) and
        store the new state; one token after a cached state is a `decode_step` that updates the state in place
        when no gradient is needed (with `decay_gate`, the token's own decay). attention_mask (B, N) of 0/1 zeroes
        padded tokens' q, k, v as MiniMax does (and gives them no decay with `decay_gate`). `group` (default: the
        layer's) makes hidden_states this rank's slice of a sequence spread over the group's ranks in order
        (sequence parallel, without a cache).
        The core is `leetdecoding.layers`; `leetdecoding.record_choices()` around a call tells the methods used.

        Raises:
            TypeError: the cache's state for this layer is not fp32 (fp64 for an fp64 layer); never cast.
            TypeError / ValueError / MethodRefusedError: as `leetdecoding.attention` and `decode_step`.
        """
        q, k, v = split_heads(
            self.qkv_proj(hidden_states),
            self.num_heads,
            self.head_dim,
            ACTIVATIONS[self.activation],
            activate_v=self.activate_v,
            attention_mask=attention_mask,
        )
        log_decay = self._log_decay(hidden_states, attention_mask)
        group = group if group is not None else self.group
        if group is not None:
            norm = self._norm if self.norm is not None else None
            o = _sequence_parallel(q, k, v, log_decay, self.scale, self.method, group, cache)
            return gated_output(o, hidden_states, norm, self.output_gate, self.out_proj)
        o, state = attend(
            q,
            k,
            v,
            cache.get(self.layer_idx) if cache is not None else None,
            log_decay=log_decay,
            scale=self.scale,
            method=self.method,
            keep_state=cache is not None,
            state_name=f"the cache's state of layer {self.layer_idx}",
        )
        if cache is not None:
            cache.update(self.layer_idx, state, hidden_states.shape[1])
        norm = self._norm if self.norm is not None else None
        return gated_output(o, hidden_states, norm, self.output_gate, self.out_proj)

    def _log_decay(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """(H,) per head, or (B, H, N) per token from the decay gate."""
        if self.gk_proj is not None:
            return gate_log_decay(self.gk_proj(hidden_states), self.gate_logit_normalizer, attention_mask)
        return self.log_decay.clamp(max=0.0) if self.log_decay.requires_grad else self.log_decay

    def _norm(self, o: torch.Tensor) -> torch.Tensor:
        """self.norm, computed in fp32 for half-precision models as MiniMax does."""
        if o.element_size() >= 4:
            return self.norm(o)
        w = self.norm.weight.float()
        return F.rms_norm(o.float(), self.norm.normalized_shape, w, self.norm.eps).to(o.dtype)


def _check_gate_arguments(log_decay, learnable_decay: bool, normaliser) -> None:
    """A gated layer has no per-head decay to give or learn, and a normaliser that divides a log decay."""
    if log_decay is not None or learnable_decay:
        name = "log_decay" if log_decay is not None else "learnable_decay"
        raise ValueError(
            f"{name} sets a per-head decay, which a layer with decay_gate=True does not have (its decay comes from "
            "gk_proj); drop one of them."
        )
    if isinstance(normaliser, bool) or not isinstance(normaliser, (int, float)) or not 0 < normaliser < float("inf"):
        raise ValueError(f"gate_logit_normalizer must be a positive finite number; got {normaliser!r}.")


def _sequence_parallel(q, k, v, log_decay, scale, method, group, cache) -> torch.Tensor:
    if cache is not None:
        raise ValueError("cache cannot be used with group (sequence parallel); pass one or the other.")
    from .distributed import layer_attention  # torch.distributed is imported only where it is used

    return layer_attention(q, k, v, log_decay=log_decay, scale=scale, method=method, group=group)


def _from_minimax_buffers(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors):
    """Accept a MiniMaxLightningAttention state dict: slope_rate (H, 1, 1) becomes log_decay = -slope_rate,
    and the buffers derived from it are dropped."""
    slope = state_dict.pop(prefix + "slope_rate", None)
    if slope is not None:
        state_dict[prefix + "log_decay"] = -slope.reshape(-1).to(torch.float32)
    for name in _MINIMAX_DERIVED:
        state_dict.pop(prefix + name, None)
