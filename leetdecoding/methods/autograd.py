"""What every custom backward of the package shares: the double backward.

A custom `torch.autograd.Function` computes its backward from what its forward saved, without a graph. Under
`create_graph=True` autograd differentiates that backward as it is, and every saved tensor computed in the forward
(a chunk's start state, the final state) counts as a constant: the second derivatives come out silently wrong.
So each custom backward either differentiates a plain differentiable forward again when a graph is asked for
(`twice_differentiable_grads`, the torch methods), or returns gradients whose own backward raises a clear error
(`refuse_double_backward`, the Triton kernels).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..amp import backward_without_autocast


def twice_differentiable_grads(
    forward: Callable[..., Sequence[torch.Tensor]],
    inputs: Sequence[torch.Tensor | None],
    needs_grad: Sequence[bool],
    grad_outputs: Sequence[torch.Tensor],
) -> list[torch.Tensor | None]:
    """Gradients of `forward(*inputs)` towards the inputs that need them, with a graph (create_graph=True), by
    autograd through a recomputation: the double backward is then exact. None for the other inputs."""
    # a view per input: one edge each, so that an input passed twice (q is k) gets each use's own gradient
    wanted = [t.view_as(t) if need and t is not None else t for t, need in zip(inputs, needs_grad)]
    with torch.enable_grad():
        outputs = forward(*wanted)
    return _input_grads(outputs, wanted, needs_grad, grad_outputs, create_graph=True)


def _input_grads(outputs, inputs, needs_grad, grad_outputs, **options) -> list[torch.Tensor | None]:
    """torch.autograd.grad of `outputs` towards the inputs that need a gradient (zeros where one is unused), None
    for the others; outputs that do not require grad are left out."""
    targets = [i for i, (t, need) in enumerate(zip(inputs, needs_grad)) if need and t is not None]
    pairs = [(o, g) for o, g in zip(outputs, grad_outputs) if o.requires_grad]
    grads = torch.autograd.grad(
        [o for o, _ in pairs], [inputs[i] for i in targets], [g for _, g in pairs], allow_unused=True, **options
    )
    result: list[torch.Tensor | None] = [None] * len(inputs)
    for i, g in zip(targets, grads):
        result[i] = g if g is not None else torch.zeros_like(inputs[i])
    return result


class _DoubleBackwardRefused(torch.autograd.Function):
    """Passes gradients through; differentiating them again raises `message`."""

    @staticmethod
    def forward(ctx, message: str, count: int, *tensors):
        ctx.message = message
        return tuple(t.clone() for t in tensors[:count])

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(ctx.message)


def refuse_double_backward(
    method: str, grads: Sequence[torch.Tensor | None], inputs: Sequence[torch.Tensor | None]
) -> list[torch.Tensor | None]:
    """The gradients `grads` of a backward that has no graph of its own (a kernel). Outside create_graph=True
    they are returned as they are; under it they are tied to `inputs` (the forward's inputs and the incoming
    gradients) through a node whose backward raises a RuntimeError that says what to use instead."""
    if not torch.is_grad_enabled():
        return list(grads)
    message = (
        f"double backward (a gradient of a gradient, create_graph=True) is not supported by method {method!r}: "
        "its backward is a kernel without a graph. Use method='chunked' (or 'vanilla', 'recursion', 'recurrent'), "
        "whose second derivatives are exact."
    )
    present = [g for g in grads if g is not None]
    linked = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    passed = iter(_DoubleBackwardRefused.apply(message, len(present), *present, *linked))
    return [next(passed) if g is not None else None for g in grads]


class PlainAutogradFence(torch.autograd.Function):
    """Runs `run(*inputs)` (a method whose gradient is plain autograd) with its graph kept inside one node, so that
    its backward computes in the call's own environment (autocast off) wherever backward() is called: plain
    autograd nodes would run under the caller's autocast and compute an fp32 call's gradient in bf16. The graph is
    the one autograd would keep anyway; under create_graph=True the backward differentiates `run` again."""

    @staticmethod
    def forward(ctx, run, *inputs):
        leaves = tuple(None if t is None else t.detach().requires_grad_(t.requires_grad) for t in inputs)
        with torch.enable_grad():
            outputs = run(*leaves)
        ctx.run, ctx.leaves, ctx.outputs = run, leaves, outputs
        ctx.save_for_backward(*inputs)
        return tuple(o.detach() for o in outputs)

    @staticmethod
    @backward_without_autocast
    def backward(ctx, *grads):
        needs = ctx.needs_input_grad[1:]
        if torch.is_grad_enabled():  # create_graph=True: a graph of the gradients themselves
            return (None, *twice_differentiable_grads(ctx.run, ctx.saved_tensors, needs, grads))
        # retain_graph: the outer graph may be walked again (retain_graph there); the inner graph goes with ctx
        return (None, *_input_grads(ctx.outputs, ctx.leaves, needs, grads, retain_graph=True))


class RecurrenceFunction(torch.autograd.Function):
    """The recurrence with its own backward, for a decay per head (methods.recurrent) or per token
    (methods.gated): `kernels` = (fwd, bwd), fwd(q, k, v, log_decay, scale, initial_state, save, in_place=True)
    -> (o, final state, saved states), bwd(q, k, v, log_decay, scale, saved, do, d_final, initial_state) ->
    (dq, dk, dv, d log_decay, d initial_state). Under create_graph=True the backward differentiates fwd again
    (in_place=False, a state per token), so that second derivatives are exact."""

    @staticmethod
    def forward(ctx, q, k, v, log_decay, initial_state, scale, kernels):
        o, final, saved = kernels[0](q, k, v, log_decay, scale, initial_state, True)
        ctx.save_for_backward(q, k, v, log_decay, initial_state, *saved)
        ctx.scale, ctx.kernels = scale, kernels
        return o, final

    @staticmethod
    @backward_without_autocast
    def backward(ctx, do, d_final):
        q, k, v, log_decay, initial_state, *saved = ctx.saved_tensors
        fwd, bwd = ctx.kernels
        inputs = (q, k, v, log_decay, initial_state)
        if torch.is_grad_enabled():  # create_graph=True: through the forward again, so that the graph is exact

            def forward(q, k, v, log_decay, initial_state):
                return fwd(q, k, v, log_decay, ctx.scale, initial_state, False, in_place=False)[:2]

            return *twice_differentiable_grads(forward, inputs, ctx.needs_input_grad[:5], (do, d_final)), None, None
        dq, dk, dv, dg, ds0 = bwd(q, k, v, log_decay, ctx.scale, saved, do, d_final, initial_state)
        return dq, dk, dv, dg, ds0 if ctx.needs_input_grad[4] else None, None, None
