"""leetdecoding: exponentially decaying causal linear attention, every method behind one validated call.

    import leetdecoding as ld
    o = ld.attention(q, k, v, decay=0.99)                       # q, k: (B, H, N, Dk); v: (B, H, N, Dv)
    o, state = ld.attention(q, k, v, log_decay=ld.decay.minimax(8, 0, 12), output_final_state=True)
    print(ld.explain(q, k, v))                                   # which method "auto" picks, and why
"""

from . import decay
from .api import attention, decode_step, explain, explain_decode, list_methods
from .choice import MethodRefusedError, record_choices
from .original import causal_linear_decoder

__version__ = "0.2.0"

__all__ = [
    "attention",
    "decode_step",
    "explain",
    "explain_decode",
    "record_choices",
    "list_methods",
    "causal_linear_decoder",
    "decay",
    "MethodRefusedError",
    "__version__",
]
