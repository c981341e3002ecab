"""The public operations as torch.library custom ops: what `torch.compile(fullgraph=True)`, CUDA graphs and
`torch.export` see of a call.

An eager call runs its Python directly (leetdecoding.api). While torch.compile or torch.export traces, the public
functions call these ops instead, so that the validation and the dispatcher, which read values (the decay's range,
the offsets), run when the op runs, eagerly and with every check, never inside a traced graph. Each op has a fake
(meta) implementation that gives the shapes and dtypes of its results, and a backward.

    leetdecoding::attention        (q, k, v, decay?, log_decay?, numbers?, scale, initial_state?, output_final_state,
                                    cu_seqlens?, offsets?, checkpoints?, method) -> (o, final_state, checkpoints)
    leetdecoding::attention_backward  the gradients of the above, by differentiating the call again
    leetdecoding::decode_step      (q, k, v, state, decay?, log_decay?, numbers?, scale, method) -> (o, new_state)
    leetdecoding::decode_step_backward  its gradients
    leetdecoding::decode_step_     the same, writing the new state into `state` (in place) and returning o

`method` is the public argument as one string: a name, "auto", or names joined by commas (auto among them).
A result that was not asked for (the final state, the checkpoints) is an empty tensor here (ops return tensors
only); the public functions return None or leave it out, as in eager mode.

The backward recomputes the forward with autograd on and differentiates it (the methods' own backwards run
inside): one extra forward per backward, the price of an opaque op.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from . import eager
from .amp import autocast_off
from .inputs import compute_dtype_for

_ATTENTION_INPUTS = ("q", "k", "v", "decay", "log_decay", "initial_state")


def _decays(decay, log_decay, numbers: list[float] | None):
    """The decay arguments of the public call: a number travels in `numbers` as [decay, log_decay] with NaN for
    the one not given (a tensor made per call would be a new tensor to check each time, a read back on a GPU)."""
    if numbers is None:
        return decay, log_decay
    d, g = numbers
    return (decay if d != d else d), (log_decay if g != g else g)


def _method(method: str) -> str | list[str]:
    return method.split(",") if "," in method else method


def _unaliased(result: Tensor, inputs: Sequence[Tensor | None]) -> Tensor:
    """`result` contiguous (as the fake implementations promise), and copied if it shares memory with an input:
    an op's outputs must not alias its inputs."""
    for t in inputs:
        if isinstance(t, Tensor) and t.numel() and result.numel():
            if t.untyped_storage().data_ptr() == result.untyped_storage().data_ptr():
                return result.clone(memory_format=torch.contiguous_format)
    return result.contiguous()


def _empty(like: Tensor, dtype: torch.dtype) -> Tensor:
    return like.new_empty((0,), dtype=dtype)


@torch.library.custom_op("leetdecoding::attention", mutates_args=())
def attention_op(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    decay: Tensor | None,
    log_decay: Tensor | None,
    numbers: list[float] | None,
    scale: float,
    initial_state: Tensor | None,
    output_final_state: bool,
    cu_seqlens: Tensor | None,
    offsets: list[int] | None,
    checkpoints: list[int] | None,
    method: str,
) -> tuple[Tensor, Tensor, Tensor]:
    decay, log_decay = _decays(decay, log_decay, numbers)
    with autocast_off(q.device.type):
        o, state, saved = eager.attention(
            q, k, v, decay, log_decay, scale, _method(method), initial_state, output_final_state, cu_seqlens,
            checkpoints, offsets,
        )  # fmt: skip
    cd = compute_dtype_for(q.dtype)
    inputs = (q, k, v, decay, log_decay, initial_state)
    state = _unaliased(state, inputs) if state is not None else _empty(q, cd)
    saved = _unaliased(saved, inputs) if saved is not None else _empty(q, cd)
    return _unaliased(o, inputs), state, saved


@attention_op.register_fake
def _(q, k, v, decay, log_decay, numbers, scale, initial_state, output_final_state, cu_seqlens, offsets, checkpoints,
      method):  # fmt: skip
    b, h, n, dk = q.shape
    dv = v.shape[3]
    cd = compute_dtype_for(q.dtype)
    packed = cu_seqlens is not None or offsets is not None
    rows = (cu_seqlens.shape[0] if cu_seqlens is not None else len(offsets)) - 1 if packed else b
    o = q.new_empty((b, h, n, dv))
    state = q.new_empty((rows, h, dk, dv), dtype=cd) if output_final_state else q.new_empty((0,), dtype=cd)
    if checkpoints is None:
        saved = q.new_empty((0,), dtype=cd)
    else:
        saved = q.new_empty((len(checkpoints), *((h,) if packed else (b, h)), dk, dv), dtype=cd)
    return o, state, saved


def _attention_setup(ctx, inputs, output) -> None:
    q, k, v, decay, log_decay, numbers, scale, initial_state, output_final_state, cu_seqlens, offsets, checkpoints = (
        inputs[:12]
    )
    ctx.save_for_backward(q, k, v, decay, log_decay, initial_state, cu_seqlens)
    ctx.args = (numbers, scale, output_final_state, offsets, checkpoints, inputs[12])


def _attention_backward(ctx, do, d_state, d_checkpoints):
    q, k, v, decay, log_decay, initial_state, cu_seqlens = ctx.saved_tensors
    numbers, scale, output_final_state, offsets, checkpoints, method = ctx.args
    needs = list(ctx.needs_input_grad[:5]) + [ctx.needs_input_grad[7]]
    grads = attention_backward_op(
        do, d_state, d_checkpoints, q, k, v, decay, log_decay, numbers, scale, initial_state, output_final_state,
        cu_seqlens, offsets, checkpoints, method, needs,
    )  # fmt: skip
    dq, dk, dv, d_decay, d_log_decay, d_initial = (g if need else None for g, need in zip(grads, needs))
    return dq, dk, dv, d_decay, d_log_decay, None, None, d_initial, None, None, None, None, None


attention_op.register_autograd(_attention_backward, setup_context=_attention_setup)


def _autograd_on():
    """Autograd recording inside an op's implementation, which runs below the autograd dispatch keys (excluded
    there): the keys are taken out of the thread's exclude set for the block. torch has no public guard for this."""
    from torch._C import DispatchKey

    exclude = torch._C._dispatch_tls_local_exclude_set()
    for key in (DispatchKey.AutogradFunctionality, DispatchKey.AutogradOther, DispatchKey.AutogradNestedTensor):
        exclude = exclude.remove(key)
    return torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude)


def _regrad(run, inputs: Sequence[Tensor | None], needs: Sequence[bool], grad_outputs) -> tuple[Tensor, ...]:
    """The gradients of run(*inputs) for the inputs that `needs`, by the eager call's own autograd: `run` returns
    its outputs, `grad_outputs` their gradients (None: not used). Inputs that need none get an empty tensor."""
    inputs = [t.detach().requires_grad_(need) if t is not None else None for t, need in zip(inputs, needs)]
    wrt = [t for t in inputs if t is not None and t.requires_grad]
    with _autograd_on(), torch.enable_grad():
        pairs = [(out, g) for out, g in zip(run(*inputs), grad_outputs)
                 if g is not None and out is not None and out.requires_grad]  # fmt: skip
        found = (
            torch.autograd.grad([p[0] for p in pairs], wrt, [p[1] for p in pairs], allow_unused=True)
            if pairs and wrt else [None] * len(wrt)
        )
    found = iter(found)
    grads = []
    for t in inputs:
        g = next(found) if t is not None and t.requires_grad else None
        if g is None:
            g = torch.zeros_like(t) if t is not None and t.requires_grad else grad_outputs[0].new_empty(0)
        grads.append(g.contiguous())  # the fake implementations promise contiguous results
    return tuple(grads)


@torch.library.custom_op("leetdecoding::attention_backward", mutates_args=())
def attention_backward_op(
    do: Tensor, d_state: Tensor | None, d_checkpoints: Tensor | None, q: Tensor, k: Tensor, v: Tensor,
    decay: Tensor | None, log_decay: Tensor | None, numbers: list[float] | None, scale: float,
    initial_state: Tensor | None, output_final_state: bool, cu_seqlens: Tensor | None, offsets: list[int] | None,
    checkpoints: list[int] | None, method: str, needs: list[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    def run(q, k, v, decay, log_decay, initial_state):
        decay, log_decay = _decays(decay, log_decay, numbers)
        return eager.attention(
            q, k, v, decay, log_decay, scale, _method(method), initial_state, output_final_state, cu_seqlens,
            checkpoints, offsets,
        )  # fmt: skip

    with autocast_off(q.device.type):
        return _regrad(run, (q, k, v, decay, log_decay, initial_state), needs, (do, d_state, d_checkpoints))


@attention_backward_op.register_fake
def _(do, d_state, d_checkpoints, q, k, v, decay, log_decay, numbers, scale, initial_state, *rest):
    needs = rest[-1]
    return tuple(t.new_empty(t.shape) if t is not None and need else do.new_empty(0)
                 for t, need in zip((q, k, v, decay, log_decay, initial_state), needs))  # fmt: skip


# ----- decode -----


@torch.library.custom_op("leetdecoding::decode_step", mutates_args=())
def decode_step_op(
    q: Tensor, k: Tensor, v: Tensor, state: Tensor, decay: Tensor | None, log_decay: Tensor | None,
    numbers: list[float] | None, scale: float, method: str,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    decay, log_decay = _decays(decay, log_decay, numbers)
    with autocast_off(q.device.type):
        o, new = eager.decode_step(q, k, v, state, decay, log_decay, scale, None, _method(method))
    inputs = (q, k, v, state, decay, log_decay)
    return _unaliased(o, inputs), _unaliased(new, inputs)


@decode_step_op.register_fake
def _(q, k, v, state, decay, log_decay, numbers, scale, method):
    return q.new_empty((*q.shape[:2], v.shape[2])), state.new_empty(state.shape)


def _decode_setup(ctx, inputs, output) -> None:
    q, k, v, state, decay, log_decay, numbers, scale, method = inputs
    ctx.save_for_backward(q, k, v, state, decay, log_decay)
    ctx.args = (numbers, scale, method)


def _decode_backward(ctx, do, d_state):
    numbers, scale, method = ctx.args
    needs = list(ctx.needs_input_grad[:6])
    grads = decode_backward_op(do, d_state, *ctx.saved_tensors, numbers, scale, method, needs)
    return (*(g if need else None for g, need in zip(grads, needs)), None, None, None)


decode_step_op.register_autograd(_decode_backward, setup_context=_decode_setup)


@torch.library.custom_op("leetdecoding::decode_step_backward", mutates_args=())
def decode_backward_op(
    do: Tensor, d_state: Tensor | None, q: Tensor, k: Tensor, v: Tensor, state: Tensor, decay: Tensor | None,
    log_decay: Tensor | None, numbers: list[float] | None, scale: float, method: str, needs: list[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    def run(q, k, v, state, decay, log_decay):
        decay, log_decay = _decays(decay, log_decay, numbers)
        return eager.decode_step(q, k, v, state, decay, log_decay, scale, None, _method(method))

    with autocast_off(q.device.type):
        return _regrad(run, (q, k, v, state, decay, log_decay), needs, (do, d_state))


@decode_backward_op.register_fake
def _(do, d_state, q, k, v, state, decay, log_decay, numbers, scale, method, needs):
    return tuple(t.new_empty(t.shape) if t is not None and need else do.new_empty(0)
                 for t, need in zip((q, k, v, state, decay, log_decay), needs))  # fmt: skip


@torch.library.custom_op("leetdecoding::decode_step_", mutates_args=("state",))
def decode_step_inplace_op(
    q: Tensor, k: Tensor, v: Tensor, state: Tensor, decay: Tensor | None, log_decay: Tensor | None,
    numbers: list[float] | None, scale: float, method: str,
) -> Tensor:  # fmt: skip
    decay, log_decay = _decays(decay, log_decay, numbers)
    with autocast_off(q.device.type):
        o, _ = eager.decode_step(q, k, v, state, decay, log_decay, scale, state, _method(method))
    return o.contiguous()


@decode_step_inplace_op.register_fake
def _(q, k, v, state, decay, log_decay, numbers, scale, method):
    return q.new_empty((*q.shape[:2], v.shape[2]))
