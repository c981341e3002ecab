"""Public functions: validate the inputs once, normalise the decay, let the dispatcher choose, run."""

from __future__ import annotations

import inspect
from collections import namedtuple
from collections.abc import Sequence

import torch

from . import dispatch, eager
from .amp import without_autocast
from .custom_ops import attention_op, decode_step_inplace_op, decode_step_op
from .explanation import Explanation
from .inputs import validate
from .methods import REGISTRY
from .methods.decode import DECODE_REGISTRY

# More than one result of `attention` comes as a named tuple in the documented order; one type per set of fields,
# so that `o, state = attention(..., output_final_state=True)` unpacks as a plain tuple does.
_RESULT_FIELDS = (("output", "final_state"), ("output", "checkpoints"), ("output", "final_state", "checkpoints"))
_RESULTS = {fields: namedtuple("AttentionResult", fields) for fields in _RESULT_FIELDS}


def _results(o: torch.Tensor, state: torch.Tensor | None, checkpoints: torch.Tensor | None):
    """o alone, or the named tuple of o and the extras asked for."""
    named = {"output": o, "final_state": state, "checkpoints": checkpoints}
    fields = tuple(f for f, value in named.items() if value is not None)
    return o if len(fields) == 1 else _RESULTS[fields](*(named[f] for f in fields))


@without_autocast
def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    decay: float | torch.Tensor | None = None,
    *,
    log_decay: float | torch.Tensor | None = None,
    scale: float = 1.0,
    method: str | Sequence[str] = "auto",
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    state_checkpoints: Sequence[int] | torch.Tensor | None = None,
    cu_seqlens_cpu: Sequence[int] | torch.Tensor | None = None,
):
    """Exponentially decaying causal linear attention.

    o_t = scale * q_t S_t with S_t = lambda_h S_{t-1} + k_t^T v_t and S_{-1} = initial_state (zeros if None)
    (the recurrence of the LeetDecoding paper, arXiv 2501.02573, eq. 1, with a decay lambda_h per head).

    Args:
        q, k: (B, H, N, Dk); v: (B, H, N, Dv); fp64, fp32, fp16 or bf16, one dtype and device; strided views are
            fine.
        decay: lambda in (0, 1], a float or an (H,) tensor; or pass `log_decay` = log lambda <= 0 (see
            `leetdecoding.decay` for named conventions). Neither means lambda = 1.
        scale: multiplies every output (a finite float).
        method: "auto", a name from `list_methods()`, or a list of names (auto's first choice among them).
        initial_state: (B, H, Dk, Dv) (or (S, H, Dk, Dv) with `cu_seqlens`) in the state dtype: fp32, fp64 for
            fp64 inputs. Another dtype is a TypeError, never cast.
        output_final_state: also return the state after the last token.
        cu_seqlens: packed variable-length batches as in flash-attn's varlen API: q, k, v of shape
            (1, H, T_total, D) and (S + 1,) int32/int64 offsets; each sequence is independent.
        state_checkpoints: increasing positions p; the state after the first p tokens is returned for each
            (positions in the packed stream with `cu_seqlens`, each belonging to the sequence of token p - 1).
            Resuming from a checkpoint with `initial_state` and running the rest equals the full call.
        cu_seqlens_cpu: the offsets of `cu_seqlens` on the host (a list of ints or a CPU tensor), as fla takes them:
            with it a call on GPU tensors reads nothing back from the device (it may replace `cu_seqlens`).

    Returns:
        o (B, H, N, Dv) in the input dtype when nothing else is asked for. Otherwise a named tuple
        `AttentionResult` in this order: `output`; `final_state` (B, H, Dk, Dv) (S, H, Dk, Dv with `cu_seqlens`)
        in the state dtype, if `output_final_state`; `checkpoints` (K, B, H, Dk, Dv) (K, H, Dk, Dv with
        `cu_seqlens`), if `state_checkpoints` is given. It unpacks as a tuple: `o, state = attention(...)`.

    Raises:
        TypeError: an argument of the wrong type or dtype (the message names it, the expected and the given).
        ValueError: a wrong shape, a decay outside (0, 1] (log_decay > 0), non-increasing offsets or
            checkpoints, a non-finite scale.
        MethodRefusedError (a ValueError): the method asked for (or every method, for "auto") cannot run these
            inputs; the message lists each method's reasons (see `explain`).

    Inside `torch.autocast` the call computes exactly as outside it, in the dtype of the inputs it is given
    (see `leetdecoding.amp`). `record_choices()` tells which method ran. Under `torch.compile` / `torch.export`
    the call is one custom op (leetdecoding.custom_ops): its checks and the choice run when the op runs.
    """
    if torch.compiler.is_compiling():
        return _traced_attention(
            q, k, v, decay, log_decay, scale, method, initial_state, output_final_state, cu_seqlens, state_checkpoints,
            cu_seqlens_cpu,
        )  # fmt: skip
    return _results(*eager.attention(
        q, k, v, decay, log_decay, scale, method, initial_state, output_final_state, cu_seqlens, state_checkpoints,
        cu_seqlens_cpu,
    ))  # fmt: skip


@without_autocast
def decode_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: torch.Tensor,
    decay: float | torch.Tensor | None = None,
    *,
    log_decay: float | torch.Tensor | None = None,
    scale: float = 1.0,
    out_state: torch.Tensor | None = None,
    method: str | Sequence[str] = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token of generation: o = scale * q (lambda S + k^T v) and the new state lambda S + k^T v.

    Args:
        q, k: (B, H, Dk); v: (B, H, Dv); one dtype and device.
        state: (B, H, Dk, Dv) in the state dtype (fp32, fp64 for fp64 inputs); another dtype is a TypeError, never
            cast (the rule of `attention`'s initial_state).
        decay, log_decay, scale: as in `attention`.
        out_state: where the new state goes, same shape and dtype; `out_state=state` updates the state in place,
            so that a server reuses one buffer. Not while an input requires grad.
        method: "auto", a decode method ("recurrent_step", "triton_step"; see `list_methods()`), or a list of them.

    Returns:
        (o (B, H, Dv) in the input dtype, new_state): the new state is `out_state` when given, else a new tensor.

    Raises:
        TypeError / ValueError: as `attention`, naming the argument; ValueError for out_state with gradients.
        MethodRefusedError: no decode method (or not the one asked for) can run this step (see `explain_decode`).
    """
    if torch.compiler.is_compiling():
        return _traced_decode(q, k, v, state, decay, log_decay, scale, out_state, method)
    return eager.decode_step(q, k, v, state, decay, log_decay, scale, out_state, method)


def _arguments(function, args: tuple, kwargs: dict) -> dict:
    """The arguments of a call to `function` by name, defaults filled in (TypeError as Python's for a bad call)."""
    bound = inspect.signature(function).bind(*args, **kwargs)
    bound.apply_defaults()
    return bound.arguments


@without_autocast
def explain(*args, **kwargs) -> Explanation:
    """Which method `attention` would use for these inputs, why, and why each other method is not used.

    Takes `attention`'s arguments and raises its TypeError / ValueError for invalid inputs; a refusal of every
    method is reported, not raised. Prints as a readable report; the fields (`method`, `options`, `reason`,
    `refusals`) are there for code.
    """
    a = _arguments(attention, args, kwargs)
    x = validate(*(a[n] for n in _VALIDATED))
    return dispatch.explain(x, a["method"])


@without_autocast
def explain_decode(*args, **kwargs) -> Explanation:
    """Which decode method `decode_step` would use for this step, why, and why each other one is not used.

    Takes `decode_step`'s arguments and raises its TypeError / ValueError for invalid inputs.
    """
    a = _arguments(decode_step, args, kwargs)
    d = eager.decode_inputs(*(a[n] for n in ("q", "k", "v", "state", "decay", "log_decay", "scale", "out_state")))
    return dispatch.explain_decode(d, a["method"])


# explain and explain_decode take the arguments of the call they explain: help() shows them
explain.__signature__ = inspect.signature(attention).replace(return_annotation=Explanation)
explain_decode.__signature__ = inspect.signature(decode_step).replace(return_annotation=Explanation)
_VALIDATED = ("q", "k", "v", "decay", "log_decay", "scale", "initial_state", "output_final_state", "cu_seqlens",
              "state_checkpoints", "cu_seqlens_cpu")  # fmt: skip


# ----- under torch.compile / torch.export: one custom op per call -----


def _decay_args(decay, log_decay) -> tuple:
    """The decay arguments as the ops take them: tensors as they are, numbers in one list [decay, log_decay] with
    NaN for the one not given (the op converts and checks them as an eager call would)."""
    tensors = tuple(d if isinstance(d, torch.Tensor) else None for d in (decay, log_decay))
    numbers = [float("nan") if d is None or isinstance(d, torch.Tensor) else float(d) for d in (decay, log_decay)]
    return (*tensors, None if numbers[0] != numbers[0] and numbers[1] != numbers[1] else numbers)


def _methods(method) -> str:
    """The method argument as the op's one string (names joined by commas)."""
    return method if isinstance(method, str) else ",".join(method)


def _host_ints(name: str, value) -> list[int] | None:
    if value is None or isinstance(value, (list, tuple)):
        return None if value is None else [int(c) for c in value]
    raise TypeError(
        f"under torch.compile, {name} must be a list of ints (a tensor would be read back while tracing); got "
        f"{type(value).__name__}."
    )


def _traced_attention(
    q, k, v, decay, log_decay, scale, method, initial_state, output_final_state, cu_seqlens, checkpoints, cu_cpu
):
    o, state, saved = attention_op(
        q, k, v, *_decay_args(decay, log_decay), float(scale), initial_state,
        bool(output_final_state), cu_seqlens, _host_ints("cu_seqlens_cpu", cu_cpu),
        _host_ints("state_checkpoints", checkpoints), _methods(method),
    )  # fmt: skip
    return _results(o, state if output_final_state else None, saved if checkpoints is not None else None)


def _traced_decode(q, k, v, state, decay, log_decay, scale, out_state, method):
    decays, scale, method = _decay_args(decay, log_decay), float(scale), _methods(method)
    if out_state is None:
        return decode_step_op(q, k, v, state, *decays, scale, method)
    if out_state is not state:
        out_state.copy_(state)
    return decode_step_inplace_op(q, k, v, out_state, *decays, scale, method), out_state


def list_methods() -> list[dict]:
    """Every method with its operation ("attention" or "decode_step"), backend, devices, dtypes, complexity, grad
    support, options and availability."""
    return [m.info() for m in (*REGISTRY.values(), *DECODE_REGISTRY.values())]
