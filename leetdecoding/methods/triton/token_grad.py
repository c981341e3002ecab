"""triton_chunked's gradient for per-token log decays (the DG flag of `chunked_bwd`'s dq and dk kernels): the exact
sums of pair terms of leetdecoding.methods.gated_chunked (its module docstring and `crossing`), split between the
kernel that walks forwards (it knows each chunk's start state S) and the one that walks backwards (it knows the
state gradient D at each chunk's end).

For u in a chunk, with W_ts = exp(G_t - G_s), a_t = exp(G_t), b_s = exp(G_last - G_s), w = exp(G_last) (G the
chunk's cumulative log decays, `prologue.token_decays`), dO = scale * do and P_ts = (q_t . k_s) W_ts (dO_t . v_s):

    d g_u =  sum_{t >= u, s < u, both in the chunk} P_ts          (`query_side`, dq kernel)
           + sum_{t >= u in the chunk} q_t . (dO_t a_t S^T)        (`query_side`: the inter part of dq_t)
           + sum_{s < u in the chunk} k_s . (b_s v_s D^T)          (`key_side`, dk kernel: the inter part of dk_s)
           + w <S, D>                                             (`key_side`: the pairs across the whole chunk)

and 0 for a reset token (log decay below `gates.negligible`, as the forward treats it). Every part is a running
sum of terms, never a difference of two sums (the form sum_{t >= u} (q_t . dq_t - k_t . dk_t) cancels at strong
decays), and every part is linear in the Dk split: each Dk-block program adds its share per token into `dgt`
(B, H, N, Dk blocks) in the accumulation dtype, which the host sums. The dq kernel stores each chunk's start state
tile (S^T, V x BK: the initial state for the first chunk) into `states` for the dk kernel: one state per chunk,
O(N/C Dk Dv) (fla keeps the same per-chunk states), only with DG.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .tile_math import _sum_combine, input_dot


def state_slots(rows: int, n: int, bt: int, varlen: bool) -> int:
    """Chunk-state slots of `states` for chunks of bt tokens (`state_slot`): B * ceil(N / bt), or for S packed
    sequences of N tokens in all at most S + ceil(N / bt)."""
    return rows + triton.cdiv(n, bt) if varlen else rows * triton.cdiv(n, bt)


def buffers(q: torch.Tensor, rows: int, dv: int, bt: int, nk: int, varlen: bool, acc: torch.dtype):
    """(dgt (B, H, N, nk), states (slots, H, Dv, Dk)) for chunks of bt tokens, in the accumulation dtype."""
    B, H, N, Dk = q.shape
    dgt = torch.zeros(B, H, N, nk, dtype=acc, device=q.device)
    states = torch.empty(state_slots(rows, N, bt, varlen), H, dv, Dk, dtype=acc, device=q.device)
    return dgt, states


@triton.jit
def state_slot(i_n, bos, N, BT: tl.constexpr, VARLEN: tl.constexpr):
    """The slot of the first chunk of sequence i_n (starting at token bos) in `states`: i_n * ceil(N / BT), or
    packed i_n + floor(bos / BT), which leaves every sequence's ceil(T / BT) chunks their own slots."""
    if VARLEN:
        slot = i_n + bos // BT
    else:
        slot = i_n * ((N + BT - 1) // BT)
    return slot


@triton.jit
def query_side(b_q, b_k, b_dov, b_dq_inter, NATIVE_QK: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
               BT: tl.constexpr):  # fmt: skip
    """A chunk's d g_u, the parts the dq kernel knows, for one Dk block and without the scale: the intra-chunk
    pairs crossing u from b_dov (do_t . v_s) W_ts and this block's q_t . k_s, and sum_{t >= u} q_t . b_dq_inter_t."""
    o_t = tl.arange(0, BT)
    b_pairs = input_dot(b_q, tl.trans(b_k), NATIVE_QK, ACC, PREC) * b_dov
    b_pairs = tl.cumsum(b_pairs, 1)  # [t, j]: the terms of query t with the keys s <= j
    b_cross = tl.reduce(tl.where(o_t[:, None] > o_t[None, :], b_pairs, 0), 0, _sum_combine)  # [j]: u = j + 1
    b_cross = tl.reduce(tl.where(o_t[:, None] == o_t[None, :] + 1, b_cross[None, :], 0), 1, _sum_combine)  # [u]
    b_qi = tl.reduce(b_q.to(ACC) * b_dq_inter, 1, _sum_combine)
    return b_cross + tl.reduce(tl.where(o_t[None, :] >= o_t[:, None], b_qi[None, :], 0), 1, _sum_combine)


@triton.jit
def key_side(p_dgt, b_k, b_dk_inter, p_st, b_dht, f_hi, f_lo, m_vk, p_g, m_t, neg, BT: tl.constexpr,
             ACC: tl.constexpr):  # fmt: skip
    """Completes a chunk's d g_u (one Dk block) at p_dgt in the dk kernel: sum_{s < u} k_s . b_dk_inter_s, then
    w <S, D> with S^T this block's tile of the chunk's start state (stored at p_st by the dq kernel), D^T = b_dht
    at the chunk's end and w = f_hi + f_lo; 0 at a reset (log decay at p_g below neg)."""
    o_t = tl.arange(0, BT)
    b_ki = tl.reduce(b_k.to(ACC) * b_dk_inter, 1, _sum_combine)
    b_before = tl.reduce(tl.where(o_t[None, :] < o_t[:, None], b_ki[None, :], 0), 1, _sum_combine)
    b_st = tl.load(p_st, mask=m_vk, other=0)
    b_sd = tl.reduce(tl.reduce(b_st * b_dht, 1, _sum_combine), 0, _sum_combine)
    b_dg = tl.load(p_dgt, mask=m_t, other=0) + b_before + (b_sd * f_hi + b_sd * f_lo)
    b_g = tl.load(p_g, mask=m_t, other=0)
    tl.store(p_dgt, tl.where(b_g < neg, 0, b_dg), mask=m_t)
