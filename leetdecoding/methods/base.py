"""The method interface: what every method declares, and the buffers its forward fills.

A method is a small class: capabilities as data (devices, dtypes, head dims, gradients, the options the dispatcher
sets), its extra memory, `not_supported_reasons(inputs)` and `forward(inputs, **options) -> (o, final_state or
None)`. A decode method (`DecodeMethod`, leetdecoding.methods.decode) declares the same capabilities for one token.
The decay math the methods share is in `decay_math`.
"""

from __future__ import annotations

import os

import torch

from ..inputs import AttentionInputs, dtype_name
from . import hugepages

ALL_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)

# Tests set this (see tests/conftest.py) so that any output element a method forgets to write is NaN.
FILL_UNWRITTEN_WITH_NAN = os.environ.get("LEETDECODING_DEBUG_NAN", "") == "1"


class Declared:
    """Capabilities as data, and the refusals they imply. Shared by the attention methods and the decode methods."""

    name: str = ""
    algorithm: str = ""
    backend: str = "torch"
    devices: tuple[str, ...] = ("cpu", "cuda")
    dtypes: tuple[torch.dtype, ...] = ALL_DTYPES
    max_head_dim: int | None = None
    supports_grad: bool = True
    per_token_decay: bool = False  # takes a decay per token (leetdecoding.gates), not only per head

    def unavailable_reason(self) -> str | None:
        """Why this method cannot run in this process at all (a missing package), or None."""
        return None

    def capability_reasons(
        self, device: torch.device, dtype: torch.dtype, dk: int, dv: int, grad: bool, per_token: bool = False
    ) -> list[str]:
        """The refusals the declarations imply for inputs on `device` in `dtype` with head dims dk, dv; `grad`:
        some input requires grad; `per_token`: the decay is per token."""
        reasons = []
        missing = self.unavailable_reason()
        if missing:
            reasons.append(missing)
        if device.type not in self.devices:
            reasons.append(f"runs on {'/'.join(self.devices)}, not {device.type}")
        if dtype not in self.dtypes:
            reasons.append(f"supports {', '.join(dtype_name(d) for d in self.dtypes)}, not {dtype_name(dtype)}")
        if self.max_head_dim is not None and max(dk, dv) > self.max_head_dim:
            reasons.append(f"head dims up to {self.max_head_dim}, got Dk={dk}, Dv={dv}")
        if grad and not self.supports_grad:
            reasons.append("no gradient support (an input requires grad)")
        if per_token and not self.per_token_decay:
            reasons.append("no per-token decay (a decay per head only)")
        return reasons

    def info(self) -> dict:
        return {
            "name": self.name,
            "algorithm": self.algorithm,
            "backend": self.backend,
            "devices": list(self.devices),
            "dtypes": [dtype_name(d) for d in self.dtypes],
            "max_head_dim": self.max_head_dim,
            "grad": self.supports_grad,
            "per_token_decay": self.per_token_decay,
            "available": self.unavailable_reason() is None,
            "unavailable_reason": self.unavailable_reason(),
        }


class Method(Declared):
    """One way to compute `attention`. Every method takes an initial state, returns a final state and runs packed
    sequences (through leetdecoding.segments, or in one call where `native_varlen`)."""

    plain_autograd: bool = False  # differentiated by autograd through its torch ops (no custom backward)
    native_varlen: bool = False  # forward() takes packed sequences (x.offsets) itself, in one call
    time_complexity: str = ""
    memory_complexity: str = ""
    time_exponent: float = 1.0  # how time grows with N, for the benchmark's time budget
    # The keyword options forward() takes: the dispatcher gives each a value (leetdecoding.dispatch.options_for),
    # forward() has no default for them, so that a value lives in one place.
    options: tuple[str, ...] = ()

    def extra_memory_bytes(self, x: AttentionInputs, **options) -> int:
        """Peak working memory beyond inputs and output, in bytes."""
        raise NotImplementedError

    def not_supported_reasons(self, x: AttentionInputs) -> list[str]:
        return self.capability_reasons(x.device, x.dtype, x.dk, x.dv, x.requires_grad, x.per_token)

    def forward(self, x: AttentionInputs, **options) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError

    def info(self) -> dict:
        return {
            **super().info(),
            "operation": "attention",
            "time": self.time_complexity,
            "memory": self.memory_complexity,
            "options": list(self.options),
        }


# ----- the buffers a forward fills -----


def new_output(x: AttentionInputs) -> torch.Tensor:
    return output_buffer(x.q, x.dv)


def output_buffer(q: torch.Tensor, dv: int) -> torch.Tensor:
    """An uninitialised (B, H, N, Dv) output like q (see `empty_output`)."""
    return empty_output((*q.shape[:3], dv), q.dtype, q.device)


def empty_output(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised output or gradient buffer; NaN-filled under tests so that an unwritten element shows;
    on CPU in huge pages where it is large (see hugepages)."""
    if FILL_UNWRITTEN_WITH_NAN:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    if torch.device(device).type == "cpu" and not torch.compiler.is_compiling():
        return hugepages.empty(shape, dtype)
    return torch.empty(shape, dtype=dtype, device=device)


def zero_states(x: AttentionInputs, rows: int, dk: int | None = None) -> torch.Tensor:
    """rows zero states (rows, H, dk or Dk, Dv) in the state dtype: the state before any token."""
    return torch.zeros(rows, x.heads, x.dk if dk is None else dk, x.dv, dtype=x.compute_dtype, device=x.device)


def finish(x: AttentionInputs, o: torch.Tensor) -> torch.Tensor:
    """Apply the scale in the compute dtype, then cast to the input dtype."""
    if x.scale != 1.0:
        o = o * x.scale
    return o.to(x.dtype)


def elem_bytes(x: AttentionInputs) -> int:
    return torch.finfo(x.compute_dtype).bits // 8


# Every extra_memory_bytes is a count of the tensors its forward holds at its peak, times this margin for what the
# count leaves out (small tables, allocator rounding). The counts are checked against measured peaks by
# tests/test_memory_estimates.py and benchmarks/memory_estimates.py.
MEMORY_MARGIN = 1.1


def with_margin(nbytes: float) -> int:
    return int(nbytes * MEMORY_MARGIN)


def upcast_bytes(x: AttentionInputs) -> int:
    """Memory of compute-dtype copies of q, k, v when the inputs are low precision."""
    if x.dtype == x.compute_dtype:
        return 0
    return elem_bytes(x) * x.batch * x.heads * x.seq_len * (2 * x.dk + x.dv)


