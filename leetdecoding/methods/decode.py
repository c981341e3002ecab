"""The decode methods: ways to run one token of generation, `decode_step`, chosen by the dispatcher.

A decode method declares its capabilities as an attention method does (`Declared`), answers
`not_supported_reasons(d)` for a validated step (`leetdecoding.inputs.DecodeInputs`) and runs it with `step(d)`,
returning (o (B, H, Dv) in the input dtype, new state). The new state goes into `d.out_state` when one is given.
"""

from __future__ import annotations

import torch

from ..inputs import DecodeInputs
from . import triton
from .base import Declared
from .recurrent import step


class DecodeMethod(Declared):
    def not_supported_reasons(self, d: DecodeInputs) -> list[str]:
        q, dv = d.q, d.v.shape[-1]
        return self.capability_reasons(q.device, q.dtype, q.shape[-1], dv, d.requires_grad, d.per_token)

    def step(self, d: DecodeInputs) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def info(self) -> dict:
        return {**super().info(), "operation": "decode_step", "time": "O(Dk Dv)", "memory": "O(Dk Dv)"}


class RecurrentStep(DecodeMethod):
    name = "recurrent_step"
    algorithm = "the recurrence for one token in torch ops: a new state, or written into out_state (in place)"
    per_token_decay = True

    def step(self, d: DecodeInputs) -> tuple[torch.Tensor, torch.Tensor]:
        (lam,) = d.derived  # from the validation's one read of the decay (see leetdecoding.inputs.validate_decode)
        q, k, v = d.q, d.k, d.v
        if q.dtype != d.compute_dtype:
            q, k, v = q.to(d.compute_dtype), k.to(d.compute_dtype), v.to(d.compute_dtype)
        o, new = step(d.state, q, k, v, lam, d.out_state)
        if d.scale != 1.0:
            o = o * d.scale
        return o.to(d.q.dtype), new


class TritonStep(DecodeMethod):
    """The fused Triton decode kernel: one launch per token (leetdecoding.methods.triton.decode_step)."""

    name = "triton_step"
    algorithm = "the recurrence for one token in one fused Triton kernel"
    backend = "triton"
    devices = triton.TritonMethod.devices
    dtypes = triton.TritonMethod.dtypes
    max_head_dim = triton.MAX_HEAD_DIM
    supports_grad = False
    per_token_decay = True  # a (B, H) log decay for the step, read in the kernel

    def unavailable_reason(self) -> str | None:
        return triton.triton_missing()

    def not_supported_reasons(self, d: DecodeInputs) -> list[str]:
        return triton.decode_step_reasons(d.q, d.k, d.v, d.state, d.log_decay)

    def step(self, d: DecodeInputs) -> tuple[torch.Tensor, torch.Tensor]:
        return triton.decode_step(d.q, d.k, d.v, d.state, d.log_decay, d.scale, d.out_state)


DECODE_REGISTRY: dict[str, DecodeMethod] = {m.name: m for m in (TritonStep(), RecurrentStep())}
