"""`LeetMiniMaxCache`: transformers' MiniMaxCache with three of its defects fixed, for patched or unpatched models.

Pass it where transformers takes a cache: `model(ids, cache=LeetMiniMaxCache(), use_cache=True)` or
`model.generate(ids, cache=LeetMiniMaxCache())`. MiniMaxCache itself is left untouched.

What it fixes (transformers 5.x):
- When layer 0 is a linear-attention layer, MiniMaxCache reports 0 seen tokens and sizes the full-attention mask
  from that empty layer, so a multi-token continuation from a cache gets wrong positions and masks in the
  full-attention layers. Here the length and mask sizes come from the first full-attention layer that holds keys.
- Beam search reorders a cache with `reorder_cache`, which MiniMaxCache does not override: its linear-attention
  states keep the old beam order. Here they are reordered with the keys and values.
- `batch_repeat_interleave` / `batch_select_indices` index the list of linear states by every layer index and
  fail when the last layers are full attention. Here each kind of layer is handled from its own list.
- A model whose layers are all linear attention holds no keys, and MiniMaxCache reports 0 tokens whatever it has
  seen. Here the patched forward counts the tokens of each linear layer, and the length falls back to that count.
"""

from __future__ import annotations

import torch

from ._minimax_classes import MiniMaxCache


class LeetMiniMaxCache(MiniMaxCache):
    """A MiniMaxCache that counts seen tokens on a full-attention layer and keeps linear states in beam order."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.linear_tokens: dict[int, int] = {}  # per linear layer: tokens seen (counted by the patched forward)

    def _length_layer(self, layer_idx: int) -> int | None:
        """The layer whose keys give the sequence length: `layer_idx` if it holds keys, else the first that does."""
        if layer_idx < len(self.layers) and self.layers[layer_idx].is_initialized:
            return layer_idx
        return next((i for i, layer in enumerate(self.layers) if layer.is_initialized), None)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        i = self._length_layer(layer_idx)
        if i is not None:
            return self.layers[i].get_seq_length()
        counts = self.linear_tokens  # no layer holds keys: what the linear layers have seen
        return counts.get(layer_idx, counts[min(counts)] if counts else 0)

    def add_linear_tokens(self, layer_idx: int, n: int) -> None:
        """Count `n` more tokens through linear-attention layer `layer_idx` (called by the patched forward)."""
        self.linear_tokens[layer_idx] = self.linear_tokens.get(layer_idx, 0) + n

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        i = self._length_layer(layer_idx)
        return (query_length, 0) if i is None else self.layers[i].get_mask_sizes(query_length)

    def get_linear_cache(self, layer_idx: int):
        """The state of linear-attention layer `layer_idx`, or None before its first forward (or after `reset`)."""
        state = self.linear_cache[layer_idx] if layer_idx < len(self.linear_cache) else None
        return state if isinstance(state, torch.Tensor) else None

    def _states(self):
        return [(i, s) for i, s in enumerate(self.linear_cache) if isinstance(s, torch.Tensor)]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        for i, s in self._states():
            self.linear_cache[i] = s.index_select(0, beam_idx.to(s.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        for layer in self.layers:
            layer.batch_repeat_interleave(repeats)
        for i, s in self._states():
            self.linear_cache[i] = s.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        for layer in self.layers:
            layer.batch_select_indices(indices)
        for i, s in self._states():
            self.linear_cache[i] = s[indices.to(s.device) if isinstance(indices, torch.Tensor) else indices, ...]

    def reset(self) -> None:
        """Forget every key, value and linear state (the next forward is a prefill)."""
        super().reset()
        self.linear_cache = [[] for _ in self.linear_cache]
        self.linear_tokens = {}
