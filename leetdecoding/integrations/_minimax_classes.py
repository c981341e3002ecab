"""transformers' MiniMax classes for hf_minimax and hf_minimax_cache, or, without transformers (a plain
install), one ImportError that names the extra to install instead of transformers' own traceback."""

from ..extras import needs

try:
    from transformers.models.minimax.modeling_minimax import MiniMaxCache, MiniMaxLightningAttention
except ImportError as e:
    raise needs(
        "leetdecoding.integrations.hf_minimax", "transformers", detail=f"4.53 or later, with MiniMax; {e}"
    ) from None

__all__ = ["MiniMaxCache", "MiniMaxLightningAttention"]
