"""triton_recurrent and the fused decode step: the recurrence S_t = lambda S_{t-1} + k_t^T v_t, o_t = scale q_t S_t,
one token per step with the state block (Dk x BV, fp32) on chip. lambda is per head, or per token (PER_TOKEN:
log decays (B, H, N), or (B, H) for a decode step, read one per token; leetdecoding.gates).

One program per (Dv block, group of BB batch-heads). On the GPU BB = 1; under the interpreter all heads share one
program (the interpreter runs programs one after another, and its cost is per operation, not per element).

`decode` is the same kernel at N = 1 on (B, H, D) inputs: it reads its state block, then writes the new one into
`out_state`, which may be the state itself (each program reads its block entirely before writing it).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..base import empty_output
from .common import INTERPRET, decay_power, dim_block, dtype_flags, forward_buffers
from .launching import kernel_scale, launcher, scale_fp64, strides, warps
from .prologue import NO_SPEC, block_range
from .tile_math import _sum_combine, round_to_bf16


@triton.jit(do_not_specialize=NO_SPEC)
def recurrent_fwd_kernel(
    q, k, v, o, s0, sn, decay, g, sgb, sgh, sgn, scale, N, BH, H, K, V,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, son, sod,
    s0b, s0h, s0k, s0v, snb, snh, snk, snv, BB: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_INITIAL_STATE: tl.constexpr, STORE_FINAL_STATE: tl.constexpr, PER_TOKEN: tl.constexpr, ACC: tl.constexpr,
    ROUND_BF16: tl.constexpr,
):  # fmt: skip
    # groups of BB batch * heads on the first grid axis (up to 2^31 - 1 programs)
    o_bh, m_bh = block_range(tl.program_id(0), BB, BH)
    i_b = (o_bh // H).to(tl.int64)
    i_h = (o_bh % H).to(tl.int64)
    o_k, m_k = block_range(0, BK, K)
    o_v, m_v = block_range(tl.program_id(1), BV, V)
    if PER_TOKEN:  # this program's log decays, advanced one token per step
        p_g = g + i_b * sgb + i_h * sgh
    else:  # lambda = hi + lo per head (accurate: it multiplies the state once per token)
        b_lam_hi = tl.load(decay + 2 * i_h, mask=m_bh, other=0)[:, None, None]  # (BB, 1, 1)
        b_lam_lo = tl.load(decay + 2 * i_h + 1, mask=m_bh, other=0)[:, None, None]

    m_qk = m_bh[:, None] & m_k[None, :]
    m_ov = m_bh[:, None] & m_v[None, :]
    p_q = q + (i_b * sqb + i_h * sqh)[:, None] + o_k[None, :] * sqd  # (BB, BK), advanced one token per step
    p_k = k + (i_b * skb + i_h * skh)[:, None] + o_k[None, :] * skd
    p_v = v + (i_b * svb + i_h * svh)[:, None] + o_v[None, :] * svd
    p_o = o + (i_b * sob + i_h * soh)[:, None] + o_v[None, :] * sod

    m_s = m_bh[:, None, None] & m_k[None, :, None] & m_v[None, None, :]
    b_s = tl.zeros([BB, BK, BV], dtype=ACC)
    if USE_INITIAL_STATE:
        p_s0 = s0 + (i_b * s0b + i_h * s0h)[:, None, None] + o_k[None, :, None] * s0k + o_v[None, None, :] * s0v
        b_s = tl.load(p_s0, mask=m_s, other=0).to(ACC)

    for _ in range(0, N):  # no jit helper call in here: one per token would cost in the interpreter
        b_q = tl.load(p_q, mask=m_qk, other=0).to(ACC)
        b_k = tl.load(p_k, mask=m_qk, other=0).to(ACC)
        b_v = tl.load(p_v, mask=m_ov, other=0).to(ACC)
        if PER_TOKEN:  # lambda_t = exp(g_t) in fp64 as hi + lo, as the host makes the per-head pair; exp(-inf) = 0
            b_lam = tl.exp(tl.load(p_g, mask=m_bh, other=0).to(tl.float64))
            b_lam_hi = b_lam.to(ACC)
            b_lam_lo = (b_lam - b_lam_hi.to(tl.float64)).to(ACC)[:, None, None]
            b_lam_hi = b_lam_hi[:, None, None]
            p_g += sgn
        b_s = b_s * b_lam_hi + b_s * b_lam_lo + b_k[:, :, None] * b_v[:, None, :]
        b_o = tl.reduce(b_q[:, :, None] * b_s, 1, _sum_combine) * scale
        if ROUND_BF16:
            b_o = round_to_bf16(b_o)
        tl.store(p_o, b_o.to(o.dtype.element_ty), mask=m_ov)
        p_q += sqn
        p_k += skn
        p_v += svn
        p_o += son

    if STORE_FINAL_STATE:
        p_sn = sn + (i_b * snb + i_h * snh)[:, None, None] + o_k[None, :, None] * snk + o_v[None, None, :] * snv
        tl.store(p_sn, b_s.to(sn.dtype.element_ty), mask=m_s)


def _tiles(bh: int, dk: int, dv: int) -> tuple[int, int, int]:
    bk = dim_block(dk)
    bv = dim_block(dv)
    if INTERPRET:
        return min(dim_block(bh), 16), bk, bv
    return 1, bk, min(bv, 64 if bk <= 64 else 32)


def _decays(log_decay) -> tuple:
    """The kernel's decay arguments (decay, g, sgb, sgh, sgn): the per-head hi + lo table (H, 2), or a per-token log
    decay (B, H, N), or (B, H) for a decode step, with its strides (b, h, n)."""
    if log_decay.ndim == 1:
        table = decay_power(log_decay, 1)
        return table, table, 0, 0, 0
    return (log_decay, log_decay, *(*log_decay.stride(), 0)[:3])


def _launch(q, k, v, o, initial_state, final, log_decay, scale, n, state_out_strides):
    B, H = q.shape[:2]
    Dk, Dv = q.shape[-1], v.shape[-1]
    bb, bk, bv = _tiles(B * H, Dk, Dv)
    grid = (triton.cdiv(B * H, bb), triton.cdiv(Dv, bv))
    launcher(recurrent_fwd_kernel)[grid](
        q, k, v, o, initial_state if initial_state is not None else o, final if final is not None else o,
        *_decays(log_decay), kernel_scale(scale, q.dtype), n, B * H, H, Dk, Dv,
        *strides(q), *strides(k), *strides(v), *strides(o), *strides(initial_state), *state_out_strides,
        BB=bb, BK=bk, BV=bv,
        USE_INITIAL_STATE=initial_state is not None, STORE_FINAL_STATE=final is not None,
        PER_TOKEN=log_decay.ndim > 1, **dtype_flags(q.dtype),
        num_warps=warps(bk * bv), num_stages=2,
    )  # fmt: skip
    scale_fp64(o, scale)


def forward(q, k, v, log_decay, initial_state, scale: float, output_final_state: bool):
    """o (B, H, N, Dv) in q's dtype, final state (B, H, Dk, Dv) fp32 (an empty tensor when not asked)."""
    o, final = forward_buffers(q, v, q.shape[0], output_final_state)
    out = final if output_final_state else None
    _launch(q, k, v, o, initial_state, out, log_decay, scale, q.shape[2], strides(out))
    return o, final


def decode(q, k, v, state, log_decay, scale: float, out_state):
    """One token: q, k (B, H, Dk), v (B, H, Dv), state (B, H, Dk, Dv) fp32; the new state goes to `out_state`
    (which may be `state`). Returns o (B, H, Dv) in q's dtype."""
    o = empty_output(v.shape, q.dtype, q.device)
    _launch(q, k, v, o, state, out_state, log_decay, scale, 1, strides(out_state))
    return o
