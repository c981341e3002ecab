"""Drop-in patches for third-party models. Each integration is its own module, imported only when used, so that
`import leetdecoding` never imports transformers.

    from leetdecoding.integrations import hf_minimax
    hf_minimax.patch(model)        # transformers MiniMaxForCausalLM / MiniMaxModel: lightning attention layers
    hf_minimax.unpatch(model)      # the original forwards back

Patches change model instances only (never a class or a process-wide global), keep parameter and buffer names,
and are undone exactly by `unpatch`. What every integration shares (the instance record, exact unpatch, the report
of the methods that ran) is `_patch.Integration`; the layer computation they share with `leetdecoding.nn` is
`leetdecoding.layers`. A new integration is one small module: its forward and how it reads its model's decay and
cache.
"""

__all__ = ["hf_minimax"]
