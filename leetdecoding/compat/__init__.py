"""Entry points with other libraries' names, layouts and conventions, so that their callers port by changing one
import. Each is its own module, imported only when used.

    from leetdecoding.compat import fla     # in place of `from fla.ops.simple_gla import ...` and friends
    o, state = fla.chunk_simple_gla(q, k, v, g=g, output_final_state=True)   # (B, T, H, K) inputs, as in fla
"""

__all__ = ["fla"]
