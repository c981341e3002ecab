"""The Triton kernels as torch.library operators, so that torch.compile traces a model that calls `attention`
without a graph break at the kernel call, and autograd reaches triton_chunked's backward.

Imports the kernels' modules, which import the helper modules (`common`, `launching`, `prologue`, `tile_math`);
none of those imports this one (the launch wrapper, `launching.launcher`, reads `launching.USE_TRITON_OP`), so
the package has no import cycle.

With torch >= 2.6 on a GPU the operators are `torch.library.triton_op`s: the kernels are launched through
`wrap_triton`, so torch.compile sees the Triton kernels themselves. Under the interpreter (CPU tensors) or on
an older torch they are opaque `torch.library.custom_op`s with a fake (shape-only) implementation.

    leetdecoding_triton::chunked_fwd  (+ autograd through leetdecoding_triton::chunked_bwd)
    leetdecoding_triton::recurrent_fwd
    leetdecoding_triton::fleet_fwd
    leetdecoding_triton::decode_step  (writes the new state into out_state, which may be the state itself)
"""

import contextlib
import inspect

import torch
from torch import Tensor

from ...amp import backward_without_autocast
from ...inputs import compute_dtype_for
from ..autograd import refuse_double_backward
from . import fleet, recurrent
from .chunked_bwd import backward as chunked_backward
from .chunked_fwd import forward as chunked_forward
from .launching import USE_TRITON_OP

OptTensor = Tensor | None  # (a real type, not a string: older torch infers schemas from annotations)


def device_of(t: Tensor):
    """Launch on the inputs' GPU (Triton launches on the current device)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def _define(name: str, schema: str, impl, fake, mutates=()):
    qualname = f"leetdecoding_triton::{name}"  # the public ops are leetdecoding:: (custom_ops.py)
    define = torch.library.triton_op if USE_TRITON_OP else torch.library.custom_op
    # an explicit schema where this torch takes one; the annotations of `impl` otherwise
    extra = {"schema": schema} if "schema" in inspect.signature(define).parameters else {}
    op = define(qualname, impl, mutates_args=mutates, **extra)
    if not USE_TRITON_OP:  # a triton_op traces its body with fake tensors instead
        op.register_fake(fake)
    return op


def _state_shape(q, v, wanted: bool, cu_seqlens=None):
    rows = q.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
    return (rows, q.shape[1], q.shape[3], v.shape[3]) if wanted else (0,)


# ----- triton_chunked -----


def _chunked_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    log_decay: Tensor,
    initial_state: OptTensor,
    scale: float,
    output_final_state: bool,
    chunk_size: int,
    precision: str,
    cu_seqlens: OptTensor,
) -> tuple[Tensor, Tensor]:
    with device_of(q):
        return chunked_forward(
            q, k, v, log_decay, initial_state, scale, output_final_state, chunk_size, precision, cu_seqlens
        )


def _chunked_fwd_fake(q, k, v, log_decay, initial_state, scale, output_final_state, chunk_size, precision, cu_seqlens):
    o = q.new_empty((*q.shape[:3], v.shape[3]))
    return o, q.new_empty(_state_shape(q, v, output_final_state, cu_seqlens), dtype=compute_dtype_for(q.dtype))


def _chunked_bwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    log_decay: Tensor,
    initial_state: OptTensor,
    final_state: OptTensor,
    do: Tensor,
    dfinal: OptTensor,
    scale: float,
    precision: str,
    cu_seqlens: OptTensor,
    decay_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    with device_of(q):
        dq, dk, dv, dg, ds0 = chunked_backward(
            q, k, v, log_decay, initial_state, final_state, do, dfinal, scale, precision, cu_seqlens, decay_grad
        )
    return dq, dk, dv, dg, ds0 if ds0 is not None else q.new_empty((0,), dtype=log_decay.dtype)


def _chunked_bwd_fake(
    q, k, v, log_decay, initial_state, final_state, do, dfinal, scale, precision, cu_seqlens, decay_grad
):
    ds0 = torch.empty_like(initial_state) if initial_state is not None else q.new_empty((0,), dtype=log_decay.dtype)
    return (
        q.new_empty(q.shape),
        k.new_empty(k.shape),
        v.new_empty(v.shape),
        torch.empty_like(log_decay),
        ds0,
    )


chunked_fwd = _define(
    "chunked_fwd",
    "(Tensor q, Tensor k, Tensor v, Tensor log_decay, Tensor? initial_state, float scale, "
    "bool output_final_state, int chunk_size, str precision, Tensor? cu_seqlens) -> (Tensor, Tensor)",
    _chunked_fwd,
    _chunked_fwd_fake,
)
chunked_bwd = _define(
    "chunked_bwd",
    "(Tensor q, Tensor k, Tensor v, Tensor log_decay, Tensor? initial_state, Tensor? final_state, Tensor do, "
    "Tensor? dfinal, float scale, str precision, Tensor? cu_seqlens, bool decay_grad) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor)",
    _chunked_bwd,
    _chunked_bwd_fake,
)


def _chunked_setup(ctx, inputs, output):
    q, k, v, log_decay, initial_state, scale, output_final_state, chunk_size, precision, cu_seqlens = inputs
    ctx.scale, ctx.precision, ctx.has_initial = scale, precision, initial_state is not None
    if any(ctx.needs_input_grad[:5]):  # save only when a gradient will be asked for
        final = output[1] if output_final_state else None
        ctx.save_for_backward(q, k, v, log_decay, initial_state, final, cu_seqlens)


@backward_without_autocast
def _chunked_grad(ctx, do, dfinal):
    q, k, v, log_decay, initial_state, final, cu_seqlens = ctx.saved_tensors
    if final is None or dfinal is None or dfinal.numel() == 0:
        dfinal, final = None, None
    decay_grad = ctx.needs_input_grad[3]  # per token: the kernels skip the decay's gradient when not asked for
    with torch.no_grad():  # the kernels have no graph: under create_graph=True, refuse_double_backward says so
        dq, dk, dv, dg, ds0 = chunked_bwd(
            q, k, v, log_decay, initial_state, final, do, dfinal, ctx.scale, ctx.precision, cu_seqlens, decay_grad
        )
    grads = (dq, dk, dv, dg, ds0 if ctx.has_initial else None)
    grads = refuse_double_backward("triton_chunked", grads, (q, k, v, log_decay, initial_state, do, dfinal))
    return *grads, None, None, None, None, None


torch.library.register_autograd("leetdecoding_triton::chunked_fwd", _chunked_grad, setup_context=_chunked_setup)


# ----- triton_recurrent, decode_step, triton_fleet -----


def _recurrent_fwd(
    q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor, initial_state: OptTensor, scale: float, output_final_state: bool
) -> tuple[Tensor, Tensor]:
    with device_of(q):
        return recurrent.forward(q, k, v, log_decay, initial_state, scale, output_final_state)


def _decode_step(
    q: Tensor, k: Tensor, v: Tensor, state: Tensor, log_decay: Tensor, scale: float, out_state: Tensor
) -> Tensor:
    with device_of(q):
        return recurrent.decode(q, k, v, state, log_decay, scale, out_state)


def _decode_step_fake(q, k, v, state, log_decay, scale, out_state):
    return v.new_empty(v.shape)


def _fleet_fwd(
    q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor, initial_state: OptTensor, scale: float, output_final_state: bool
) -> tuple[Tensor, Tensor]:
    with device_of(q):
        return fleet.forward(q, k, v, log_decay, initial_state, scale, output_final_state)


_FWD_SCHEMA = (
    "(Tensor q, Tensor k, Tensor v, Tensor log_decay, Tensor? initial_state, float scale, "
    "bool output_final_state) -> (Tensor, Tensor)"
)


def _fwd_fake(q, k, v, log_decay, initial_state, scale, output_final_state):
    return _chunked_fwd_fake(q, k, v, log_decay, initial_state, scale, output_final_state, 0, "", None)


recurrent_fwd = _define("recurrent_fwd", _FWD_SCHEMA, _recurrent_fwd, _fwd_fake)
fleet_fwd = _define("fleet_fwd", _FWD_SCHEMA, _fleet_fwd, _fwd_fake)
decode_step = _define(
    "decode_step",
    "(Tensor q, Tensor k, Tensor v, Tensor state, Tensor log_decay, float scale, Tensor(a!) out_state) -> Tensor",
    _decode_step,
    _decode_step_fake,
    mutates=("out_state",),
)
