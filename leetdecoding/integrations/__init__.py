"""Drop-in patches for third-party models. Each integration is its own module, imported only when used, so that
`import leetdecoding` never imports transformers.

    from leetdecoding.integrations import hf_minimax
    hf_minimax.patch(model)        # transformers MiniMaxForCausalLM / MiniMaxModel: lightning attention layers
    hf_minimax.unpatch(model)      # the original forwards back

Patches change model instances only (never a class or a process-wide global), keep parameter and buffer names,
and are undone exactly by `unpatch`.
"""

__all__ = ["hf_minimax"]
