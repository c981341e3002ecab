"""The validated-inputs record: every check on user input happens here, once, with a clear message.

Methods receive an `AttentionInputs` and trust it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from . import decay as _decay
from .gates import canonical_gates, is_per_token
from .memo import tracing
from .positions import check_checkpoints, check_cu_seqlens

FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def compute_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """Accumulation and state dtype: fp64 for fp64 inputs, fp32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def dtype_name(dtype: torch.dtype) -> str:
    """"float32" for torch.float32: how messages and tables name a dtype."""
    return str(dtype).replace("torch.", "")


@dataclass
class AttentionInputs:
    q: torch.Tensor  # (B, H, N, Dk), possibly a strided view
    k: torch.Tensor  # (B, H, N, Dk)
    v: torch.Tensor  # (B, H, N, Dv)
    # log lambda in compute_dtype on the inputs' device, every entry <= 0: (H,) per head, or (B, H, N) per token
    log_decay: torch.Tensor
    scale: float
    initial_state: torch.Tensor | None  # (B, H, Dk, Dv), or (S, H, Dk, Dv) with cu_seqlens; compute_dtype
    output_final_state: bool
    # Packed sequences (batch 1): sequence i is the tokens [offsets[i], offsets[i+1]). `offsets` is the host list
    # the runner reads; `cu_seqlens` the caller's tensor of the same values, as the API takes it, for kernels.
    offsets: list[int] | None = None
    checkpoints: list[int] | None = None  # also return the state after each of these many tokens
    cu_seqlens: torch.Tensor | None = None
    # A per-token decay given as lambda (decay=) that autograd will differentiate, in compute_dtype:
    # leetdecoding.segments cuts the call at its resets so that lambda's gradient there is its one-sided value
    # <dL/dS_t, S_{t-1}> rather than 0 (a reset's log is -inf or below gates.negligible).
    reset_decay: torch.Tensor | None = None
    # the sizes, read from q and v once
    batch: int = field(init=False)
    heads: int = field(init=False)
    seq_len: int = field(init=False)
    dk: int = field(init=False)
    dv: int = field(init=False)

    def __post_init__(self) -> None:
        self.batch, self.heads, self.seq_len, self.dk = self.q.shape
        self.dv = self.v.shape[3]

    @property
    def num_sequences(self) -> int:
        return self.batch if self.offsets is None else len(self.offsets) - 1

    @property
    def longest(self) -> int:
        """The longest sequence: N, or the longest packed sequence with cu_seqlens."""
        if self.offsets is None:
            return self.seq_len
        return max((b - a for a, b in zip(self.offsets, self.offsets[1:])), default=0)

    @property
    def per_token(self) -> bool:
        """The decay is per token: log_decay is (B, H, N) (leetdecoding.gates), not (H,)."""
        return self.log_decay.ndim == 3

    def segment(self, start: int, end: int, initial_state, output_final_state: bool) -> AttentionInputs:
        """The tokens [start, end) of every batch row as a plain (not packed) problem, a segment in the sense of
        leetdecoding.segments; views, no copies."""
        return AttentionInputs(
            q=self.q[:, :, start:end],
            k=self.k[:, :, start:end],
            v=self.v[:, :, start:end],
            log_decay=self.log_decay[:, :, start:end] if self.per_token else self.log_decay,
            scale=self.scale,
            initial_state=initial_state,
            output_final_state=output_final_state,
        )

    @property
    def dtype(self) -> torch.dtype:
        return self.q.dtype

    @property
    def compute_dtype(self) -> torch.dtype:
        return compute_dtype_for(self.q.dtype)

    @property
    def device(self) -> torch.device:
        return self.q.device

    @property
    def requires_grad(self) -> bool:
        tensors = [self.q, self.k, self.v, self.log_decay]
        if self.initial_state is not None:
            tensors.append(self.initial_state)
        return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)

    def describe(self) -> str:
        s = (
            f"q {tuple(self.q.shape)}, k {tuple(self.k.shape)}, v {tuple(self.v.shape)}, "
            f"{dtype_name(self.dtype)} on {self.device}"
        )
        if self.per_token:
            s += ", per-token decay"
        if self.initial_state is not None:
            s += ", with initial_state"
        if self.offsets is not None:
            s += f", {self.num_sequences} packed sequences (longest {self.longest})"
        return s


def _shape(t: torch.Tensor) -> str:
    return str(tuple(t.shape))


def check_tensor(name: str, t, ndim: int, what: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {what}; got {type(t).__name__}.")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be a floating tensor (float64, float32, float16 or bfloat16); got {t.dtype}. "
            f"Hint: convert with {name}.float()."
        )
    if t.ndim != ndim:
        raise ValueError(
            f"{name} must have {ndim} dimensions {what}; got {t.ndim} dimensions, shape {_shape(t)}."
            + (" Hint: the layout is (B, H, N, D); for (B, N, H, D) pass x.transpose(1, 2)." if ndim == 4 else "")
        )


def check_same(names: tuple[str, ...], tensors: tuple[torch.Tensor, ...]) -> None:
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) > 1:
        got = ", ".join(f"{n} {t.dtype}" for n, t in zip(names, tensors))
        raise TypeError(f"{', '.join(names)} must share one dtype; got {got}. Hint: cast them to one dtype.")
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        got = ", ".join(f"{n} on {t.device}" for n, t in zip(names, tensors))
        raise ValueError(f"{', '.join(names)} must be on one device; got {got}.")


def check_scale(scale) -> float:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a real number; got {type(scale).__name__} {scale!r}.")
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite; got {scale}.")
    return scale


def check_state(
    name: str, state, expected: tuple[int, ...], device: torch.device, dtype: torch.dtype, layout="(B, H, Dk, Dv)"
):
    """Return the state (None or a tensor) after checking it, unchanged: states are never converted.

    The rule, one for `attention` (initial_state), `decode_step` (state, out_state), the nn cache and the
    integrations: a state is (B, H, Dk, Dv) in the compute dtype of the inputs, fp32 for fp32 / fp16 / bf16
    inputs and fp64 for fp64 inputs, on the inputs' device. A state in another dtype is refused (TypeError),
    never cast: a cast would silently round an fp64 state or detach an in-place `out_state` from the caller's.
    """
    if state is None:
        return None
    if not isinstance(state, torch.Tensor):
        raise TypeError(f"{name} must be a floating torch.Tensor of shape {expected}; got {type(state).__name__}.")
    if tuple(state.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {expected} {layout}; got {_shape(state)}.")
    check_state_dtype(name, state, dtype)
    _decay.check_not_meta(name, state)
    if state.device != device:
        raise ValueError(f"{name} must be on {device} like q; got {state.device}.")
    return state


def check_state_dtype(name: str, state: torch.Tensor, dtype: torch.dtype) -> None:
    """A state must be in the compute dtype of `dtype` inputs (fp32, or fp64 for fp64); see `check_state`."""
    cd = compute_dtype_for(dtype)
    if state.dtype != cd:
        cast = (name if name.isidentifier() else "the state") + (".double()" if cd == torch.float64 else ".float()")
        raise TypeError(
            f"{name} must be {cd} for {dtype} inputs (states are fp32, fp64 for fp64 inputs, and are never cast "
            f"silently); got {state.dtype}. Hint: pass {cast} if converting it is what you want."
        )


def validate(
    q,
    k,
    v,
    decay=None,
    log_decay=None,
    scale=1.0,
    initial_state=None,
    output_final_state=False,
    cu_seqlens=None,
    state_checkpoints=None,
    cu_seqlens_cpu=None,
) -> AttentionInputs:
    """Check everything the public `attention` call receives and build the record methods use."""
    check_tensor("q", q, 4, "(B, H, N, Dk)")
    check_tensor("k", k, 4, "(B, H, N, Dk)")
    check_tensor("v", v, 4, "(B, H, N, Dv)")
    check_same(("q", "k", "v"), (q, k, v))
    _decay.check_not_meta("q", q)  # and so k and v, on the same device
    for axis, label in ((0, "batch B"), (1, "heads H"), (2, "length N")):
        if not q.shape[axis] == k.shape[axis] == v.shape[axis]:
            raise ValueError(
                f"q, k and v must agree on {label} (axis {axis}); got q {_shape(q)}, k {_shape(k)}, v {_shape(v)}."
            )
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"q and k must have the same head dim Dk (last axis); got q {_shape(q)}, k {_shape(k)}.")
    if q.shape[3] < 1 or v.shape[3] < 1:
        raise ValueError(f"head dims must be >= 1; got Dk={q.shape[3]}, Dv={v.shape[3]}.")
    if not isinstance(output_final_state, bool):
        raise TypeError(f"output_final_state must be a bool; got {type(output_final_state).__name__}.")
    B, H, N, Dk = q.shape
    Dv = v.shape[3]
    cd = compute_dtype_for(q.dtype)
    offsets = check_cu_seqlens(cu_seqlens, q, cu_seqlens_cpu)
    states = B if offsets is None else len(offsets) - 1
    log = _log_decay(decay, log_decay, q, offsets is not None, cd)
    return AttentionInputs(
        q=q,
        k=k,
        v=v,
        log_decay=log,
        scale=check_scale(scale),
        initial_state=check_state(
            "initial_state", initial_state, (states, H, Dk, Dv), q.device, q.dtype,
            "(B, H, Dk, Dv)" if offsets is None else "(S, H, Dk, Dv), one state per sequence of cu_seqlens",
        ),  # fmt: skip
        output_final_state=output_final_state,
        offsets=offsets,
        checkpoints=check_checkpoints(state_checkpoints, N),
        cu_seqlens=None if offsets is None else cu_seqlens,
        reset_decay=_reset_decay(decay, log, cd),
    )


def _reset_decay(decay, log: torch.Tensor, cd: torch.dtype) -> torch.Tensor | None:
    """AttentionInputs.reset_decay: the per-token `decay` (lambda) in `cd` on log's device when it requires grad;
    else None. Not while a graph is recorded (segments reads where the resets are; compiled calls keep a reset's
    lambda gradient at 0)."""
    if not (isinstance(decay, torch.Tensor) and decay.ndim >= 2 and decay.requires_grad and torch.is_grad_enabled()):
        return None
    return None if tracing() else decay.to(device=log.device, dtype=cd)


def _log_decay(decay, log_decay, q: torch.Tensor, packed: bool, cd: torch.dtype) -> torch.Tensor:
    """log lambda: (H,) for a constant decay, (B, H, N) for a per-token one (leetdecoding.gates)."""
    B, H, N, _ = q.shape
    if not is_per_token(decay, log_decay):
        return _decay.canonical_log_decay(decay, log_decay, H, q.device, cd)
    layout = "(1, H, T_total) with cu_seqlens" if packed else "(B, H, N)"
    return canonical_gates(decay, log_decay, (B, H, N), layout, q.device, cd)


@dataclass
class DecodeInputs:
    """One validated decode step: what the decode methods (leetdecoding.methods.decode) read."""

    q: torch.Tensor  # (B, H, Dk)
    k: torch.Tensor  # (B, H, Dk)
    v: torch.Tensor  # (B, H, Dv)
    state: torch.Tensor  # (B, H, Dk, Dv) in compute_dtype
    out_state: torch.Tensor | None  # where the new state goes (may be `state` itself), or None for a new tensor
    log_decay: torch.Tensor  # (H,) in compute_dtype, or (B, H): this step's decay per sequence
    scale: float
    compute_dtype: torch.dtype
    derived: tuple = ()  # derive(log_decay) of validate_decode, from the same read of the decay

    @property
    def requires_grad(self) -> bool:
        tensors = (self.q, self.k, self.v, self.state, self.log_decay)
        return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)

    def key(self) -> tuple:
        """What a decode method's refusals depend on: the same key, the same choice."""
        return (self.q.device, self.q.dtype, self.q.shape[-1], self.v.shape[-1], self.requires_grad, self.per_token)

    @property
    def per_token(self) -> bool:
        return self.log_decay.ndim == 2


def validate_decode(q, k, v, state, decay, log_decay, scale, out_state, derive=None) -> DecodeInputs:
    """Checks for one decode step: q, k (B, H, Dk), v (B, H, Dv), state (B, H, Dk, Dv) in the state dtype.

    `derive`: tables the step needs from the decay, computed with the validation from one read of its values
    (see `leetdecoding.decay.canonical_log_decay`).

    This runs once per token: the common case is decided by a few direct comparisons, and the detailed checks
    (which name what is wrong) run only when one of them fails.
    """
    ok = (
        isinstance(q, torch.Tensor)  # subclasses (nn.Parameter, ...) are tensors like any other
        and isinstance(k, torch.Tensor)
        and isinstance(v, torch.Tensor)
        and isinstance(state, torch.Tensor)
        and not q.is_meta
        and q.ndim == 3
        and q.shape == k.shape
        and v.ndim == 3
        and q.shape[:2] == v.shape[:2]
        and q.dtype in FLOAT_DTYPES
        and k.dtype == q.dtype == v.dtype
        and k.device == q.device == v.device
    )
    cd = compute_dtype_for(q.dtype) if ok else None
    expected = (*q.shape, v.shape[2]) if ok else None
    for t in (state, out_state) if ok else ():
        if t is not None and (
            not isinstance(t, torch.Tensor) or t.shape != expected or t.dtype != cd or t.device != q.device
        ):
            ok = False
    if ok and out_state is not None and not out_state.is_contiguous():
        ok = False  # the detailed checks look for elements it holds twice
    if not ok:  # raises with the detail, or finds the inputs valid after all (the fast checks are a shortcut)
        _explain_decode_error(q, k, v, state, out_state)
        cd = compute_dtype_for(q.dtype)
    if is_per_token(decay, log_decay):  # this step's own decay per sequence and head (leetdecoding.gates)
        log = canonical_gates(decay, log_decay, tuple(q.shape[:2]), "(B, H) for a decode step", q.device, cd)
        if isinstance(decay, torch.Tensor) and decay.requires_grad:  # lambda itself: its gradient also at 0
            derived = (decay.to(device=q.device, dtype=cd)[..., None, None],)  # (a reset, where exp(log) has none)
        else:
            derived = (torch.exp(log.double()).to(cd)[..., None, None],)  # lambda (B, H, 1, 1) for the step
    else:
        log = _decay.canonical_log_decay(decay, log_decay, q.shape[1], q.device, cd, derive)
        log, derived = (log, ()) if derive is None else (log[0], log[1:])
    scale = scale if type(scale) is float and math.isfinite(scale) else check_scale(scale)
    return DecodeInputs(q, k, v, state, out_state, log, scale, cd, derived)


def _explain_decode_error(q, k, v, state, out_state) -> None:
    """The detailed decode checks: raise naming what is wrong, or return when nothing is."""
    check_tensor("q", q, 3, "(B, H, Dk)")
    check_tensor("k", k, 3, "(B, H, Dk)")
    check_tensor("v", v, 3, "(B, H, Dv)")
    check_same(("q", "k", "v"), (q, k, v))
    _decay.check_not_meta("q", q)  # and so k and v, on the same device
    if q.shape != k.shape or q.shape[:2] != v.shape[:2]:
        raise ValueError(
            f"decode inputs must be q, k (B, H, Dk) and v (B, H, Dv) with one B and H; got q {_shape(q)}, "
            f"k {_shape(k)}, v {_shape(v)}."
        )
    B, H, Dk = q.shape
    Dv = v.shape[2]
    if state is None:
        raise TypeError(f"state must be a torch.Tensor of shape {(B, H, Dk, Dv)}; got None.")
    for name, t in (("state", state), ("out_state", out_state)):
        check_state(name, t, (B, H, Dk, Dv), q.device, q.dtype)
    if out_state is not None and any(st == 0 and n > 1 for st, n in zip(out_state.stride(), out_state.shape)):
        raise ValueError(
            f"out_state is written in place and must hold each element once; got a view with strides "
            f"{out_state.stride()} for shape {_shape(out_state)} (an expanded tensor). Hint: pass "
            "out_state.contiguous(), or a buffer of its own, and keep the returned state."
        )
