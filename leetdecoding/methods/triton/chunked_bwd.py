"""triton_chunked, backward: three fused kernels that walk the sequence as the forward (`chunked_fwd`) does.

With the state-gradient dH (the gradient of the loss with respect to the state entering a chunk; dH = dS_N after
the last chunk) carried backwards,

    dq_i = scale * ( sum_{j <= i} lambda^(i-j) (do_i . v_j) k_j  +  lambda^(i+1) do_i S^T )   (forward walk)
    dk_j = scale * sum_{i >= j} lambda^(i-j) (do_i . v_j) q_i  +  lambda^(L-1-j) v_j dH^T    (backward walk)
    dv_j = scale * sum_{i >= j} lambda^(i-j) (q_i . k_j) do_i  +  lambda^(L-1-j) k_j dH
    dH  <- lambda^L dH + scale * sum_i lambda^(i+1) q_i^T do_i,          dS_0 = dH at the start

d log lambda as in leetdecoding.methods.chunked: a sum of pair terms each weighted by its distance t - s >= 0,
never sum_t (t+1) (q_t . dq_t - k_t . dk_t) + N <S_N, dS_N> (O(1) terms cancelling to an O(lambda) result). For
a query t in a chunk starting at p and a key s in an earlier chunk ending at e, t - s = (t-p+1) + (e-1-s) + (p-e):

    dq kernel:  sum_t q_t . ( scale sum_{s <= t in the chunk} (t-s) lambda^(t-s) (do_t . v_s) k_s
                              + (t-p+1) [the inter-chunk part of dq_t] )
    dk kernel:  sum_s k_s . ( (e-1-s) [the inter-chunk part of dk_s]  +  lambda^(e-1-s) v_s dH'^T )
                + <S_0, dH' at the start>,      dH' <- lambda^L (dH' + L dH)  (dH' = 0 after the last chunk)

dH' weights each later query by its gap p - e; the final state is a query starting a chunk at p = T (each
sequence's own length T), so it needs no term of its own.

With per-token decays (PER_TOKEN) the kernels take each chunk's factors from `prologue.token_decays`, as the
forward does (exp(G_t - G_s), exp(G_t), exp(G_last - G_s), exp(G_last) for lambda^(i-j), lambda^(i+1),
lambda^(L-1-j), lambda^L), which gives dq, dk, dv and dS_0 unchanged. The per-token decays' gradient (DG, when
log_decay requires grad) is not the stateless d log lambda_u = sum_{t >= u} (q_t . dq_t - k_t . dk_t) + <S_N, dS_N>
(fla's chunk_simple_gla backward), which subtracts terms of the size of the pairs near the diagonal to get a result
as small as the decays across u (a kernel of it was off by 0.27 of the largest entry at log decays of -15 in fp32),
but the exact sums of pair terms of leetdecoding.methods.gated_chunked, split between the dq kernel (each chunk's
intra pairs and query side, knowing S) and the dk kernel (key side and w <S, D>, knowing D), as `token_grad`
explains: the dq kernel stores each chunk's start state S^T for the dk kernel, which is then launched at the same
chunk size.

Nothing of size N Dk Dv is stored: memory is the inputs, outputs and their grads, and only with DG one state per
chunk (O(N/C Dk Dv), fp32) and a per-token sum per Dk block.
Names as in `chunked_fwd` (K and V the head dims; dq, dk, dv the gradients' pointers and b_dq, b_dk, b_dv their
tiles).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...inputs import compute_dtype_for
from .common import INTERPRET, decay_power, dim_block, dot_flags, packed_rows, split_log_decay, token_log_decays
from .launching import chunk_variants, launch, launcher, pipeline_stages, strides, warps
from .prologue import NO_SPEC, block_range, chunk_decays, head_decays, program_head, sequence
from .tile_math import _sum_combine, input_dot, mixed_dot, round_to_bf16
from .token_grad import buffers, key_side, query_side, state_slot


@triton.jit
def distances(BT: tl.constexpr, ACC: tl.constexpr):
    """(BT, BT): t - s for s <= t, else 0 (the weights of d log lambda's intra-chunk pairs)."""
    o_t = tl.arange(0, BT)
    return tl.where(o_t[:, None] >= o_t[None, :], o_t[:, None] - o_t[None, :], 0).to(ACC)


@triton.jit(do_not_specialize=NO_SPEC)
def chunked_bwd_dq_kernel(
    q, k, v, do, dq, s0, dg_q, dgt, states, log_decay, decay, g, sgb, sgh, sgn, neg, cu_seqlens, scale, N, H, K, V,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdb, sdh, sdn, sdd, s0b, s0h, s0k, s0v,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, USE_INITIAL_STATE: tl.constexpr, VARLEN: tl.constexpr,
    PER_TOKEN: tl.constexpr, DG: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr, NATIVE_QK: tl.constexpr,
    MODE: tl.constexpr, ROUND_BF16: tl.constexpr,
):  # fmt: skip
    """dq for one Dk block (all of Dv), walking forwards with S^T (V x BK); also this block's share of
    d log lambda's query-side terms (the module docstring): per head summed into dg_q; per token (DG) into dgt,
    with each chunk's start state S^T stored into `states` (`token_grad`)."""
    i_bh, i_b, i_h = program_head(H)
    g_hi, g_lo, c_hi, c_lo, b_lam_ij, b_lam_q = head_decays(log_decay, decay, i_h, BT, ACC)
    i_b, bos, T, i_n = sequence(cu_seqlens, i_b, N, VARLEN)  # T tokens from bos; i_n indexes states
    i_k = tl.program_id(1)
    o_k, m_k = block_range(i_k, BK, K)
    p_q0 = q + i_b * sqb + i_h * sqh + bos * sqn + o_k[None, :] * sqd
    p_k0 = k + i_b * skb + i_h * skh + bos * skn + o_k[None, :] * skd
    p_dq0 = dq + ((i_b * H + i_h) * N + bos) * K + o_k[None, :]  # dq is contiguous (B, H, N, K)
    o_v, m_v = block_range(0, BV, V)
    p_v0 = v + i_b * svb + i_h * svh + bos * svn + o_v[:, None] * svd  # v loaded transposed (BV, BT)
    p_do0 = do + i_b * sdb + i_h * sdh + bos * sdn + o_v[None, :] * sdd
    p_g0 = g + i_b * sgb + i_h * sgh + bos * sgn  # per-token log decays (PER_TOKEN)
    nk = tl.num_programs(1)
    p_dgt0 = dgt + ((i_b * H + i_h) * N + bos) * nk + i_k  # DG: dgt is contiguous (B, H, N, Dk blocks), ACC
    p_st0 = states + ((state_slot(i_n, bos, N, BT, VARLEN) * H + i_h) * V + o_v[:, None]) * K + o_k[None, :]
    m_vk = m_v[:, None] & m_k[None, :]

    b_st = tl.zeros([BV, BK], dtype=ACC)  # S^T for this Dk block
    if USE_INITIAL_STATE:
        p_s0 = s0 + i_n * s0b + i_h * s0h + o_v[:, None] * s0v + o_k[None, :] * s0k
        b_st = tl.load(p_s0, mask=m_vk, other=0).to(ACC)
    b_dg = tl.zeros([BT], dtype=ACC)
    b_dist = distances(BT, ACC)
    e_q = (tl.arange(0, BT) + 1).to(ACC)  # t - p + 1: a query's distance to the state entering its chunk

    for i_c in range(0, (T + BT - 1) // BT):
        r_t, m_t, n_c, b_w_ij, b_w_q, b_lam_k, f_hi, f_lo = chunk_decays(
            i_c, T, g_hi, g_lo, c_hi, c_lo, b_lam_ij, b_lam_q, p_g0, sgn, neg, BT, ACC, PER_TOKEN
        )
        m_tk = m_t[:, None] & m_k[None, :]
        b_q = tl.load(p_q0 + r_t[:, None] * sqn, mask=m_tk, other=0)
        b_k = tl.load(p_k0 + r_t[:, None] * skn, mask=m_tk, other=0)
        b_vt = tl.load(p_v0 + r_t[None, :] * svn, mask=m_v[:, None] & m_t[None, :], other=0)
        b_do = tl.load(p_do0 + r_t[:, None] * sdn, mask=m_t[:, None] & m_v[None, :], other=0)
        b_dov = input_dot(b_do, b_vt, NATIVE_QK, ACC, PREC) * b_w_ij  # decayed causal (do_i . v_j)
        b_k_end = b_k.to(ACC) * b_lam_k[:, None]  # k_j decayed to the chunk's last token
        b_dq_inter = mixed_dot(b_st, b_do, False, MODE, PREC) * b_w_q[:, None]  # through the carried state
        b_dq = (mixed_dot(b_dov, b_k, True, MODE, PREC) + b_dq_inter) * scale
        b_st_add = mixed_dot(b_k_end, b_vt, False, MODE, PREC)
        if not PER_TOKEN:  # d log lambda: intra-chunk pairs by t - s, inter-chunk part by t - p + 1 (nothing cancels)
            b_dq_w = mixed_dot(b_dov * b_dist, b_k, True, MODE, PREC) + b_dq_inter * e_q[:, None]
            b_dg += tl.reduce(b_q.to(ACC) * b_dq_w, 1, _sum_combine)
        if DG:  # per token: this chunk's query-side terms, and its start state for the dk kernel
            b_dgt = query_side(b_q, b_k, b_dov, b_dq_inter, NATIVE_QK, ACC, PREC, BT)
            tl.store(p_dgt0 + r_t * nk, b_dgt * scale, mask=m_t)
            tl.store(p_st0 + i_c * (H * V * K), b_st, mask=m_vk)
        if ROUND_BF16:
            b_dq = round_to_bf16(b_dq)
        tl.store(p_dq0 + r_t[:, None] * K, b_dq.to(dq.dtype.element_ty), mask=m_tk)
        b_st = b_st * f_hi + b_st * f_lo + b_st_add

    tl.store(dg_q + i_bh * nk + i_k, tl.reduce(b_dg, 0, _sum_combine) * scale)  # per token: unused


@triton.jit(do_not_specialize=NO_SPEC)
def chunked_bwd_dk_kernel(
    q, k, v, do, dk, dsn, s0, ds0, dg_k, dgt, states, log_decay, decay, g, sgb, sgh, sgn, neg, cu_seqlens, scale,
    N, H, K, V,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdb, sdh, sdn, sdd,
    snb, snh, snk, snv, s0b, s0h, s0k, s0v,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_FINAL_GRAD: tl.constexpr, USE_INITIAL_STATE: tl.constexpr, VARLEN: tl.constexpr, PER_TOKEN: tl.constexpr,
    DG: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr, NATIVE_QK: tl.constexpr, MODE: tl.constexpr,
    ROUND_BF16: tl.constexpr,
):  # fmt: skip
    """dk for one Dk block (all of Dv), walking backwards with dH^T (V x BK) and its gap-weighted twin dH'^T;
    also dS_0 (with an initial state) and this block's share of d log lambda's key-side terms (the module
    docstring): per head summed into dg_k; per token (DG) completed in dgt from the dq kernel's `states`."""
    i_bh, i_b, i_h = program_head(H)
    g_hi, g_lo, c_hi, c_lo, b_lam_ij, b_lam_q = head_decays(log_decay, decay, i_h, BT, ACC)
    i_b, bos, T, i_n = sequence(cu_seqlens, i_b, N, VARLEN)  # T tokens from bos; i_n indexes states
    b_lam_ji = tl.trans(b_lam_ij)  # b_lam_ji[j, i] = lambda^(i-j) for i >= j
    i_k = tl.program_id(1)
    o_k, m_k = block_range(i_k, BK, K)
    o_v, m_v = block_range(0, BV, V)
    m_vk = m_v[:, None] & m_k[None, :]
    p_q0 = q + i_b * sqb + i_h * sqh + bos * sqn + o_k[None, :] * sqd
    p_k0 = k + i_b * skb + i_h * skh + bos * skn + o_k[None, :] * skd
    p_v0 = v + i_b * svb + i_h * svh + bos * svn + o_v[None, :] * svd
    p_do0 = do + i_b * sdb + i_h * sdh + bos * sdn + o_v[:, None] * sdd  # do loaded transposed (BV, BT)
    p_dk0 = dk + ((i_b * H + i_h) * N + bos) * K + o_k[None, :]
    p_g0 = g + i_b * sgb + i_h * sgh + bos * sgn  # per-token log decays (PER_TOKEN)
    nk = tl.num_programs(1)
    p_dgt0 = dgt + ((i_b * H + i_h) * N + bos) * nk + i_k  # DG: as in the dq kernel
    p_st0 = states + ((state_slot(i_n, bos, N, BT, VARLEN) * H + i_h) * V + o_v[:, None]) * K + o_k[None, :]

    b_dht = tl.zeros([BV, BK], dtype=ACC)  # dH^T for this Dk block
    if USE_FINAL_GRAD:
        p_dsn = dsn + i_n * snb + i_h * snh + o_v[:, None] * snv + o_k[None, :] * snk
        b_dht = tl.load(p_dsn, mask=m_vk, other=0).to(ACC)
    b_dht_gap = tl.zeros([BV, BK], dtype=ACC)  # dH'^T: 0 after the last chunk (the final state's gap is 0)
    b_dg = tl.zeros([BT], dtype=ACC)

    n_chunks = (T + BT - 1) // BT
    for i_r in range(0, n_chunks):
        i_c = n_chunks - 1 - i_r
        r_t, m_t, n_c, b_w_ij, b_w_q, b_lam_k, f_hi, f_lo = chunk_decays(
            i_c, T, g_hi, g_lo, c_hi, c_lo, b_lam_ij, b_lam_q, p_g0, sgn, neg, BT, ACC, PER_TOKEN
        )
        b_w_ji = tl.trans(b_w_ij) if PER_TOKEN else b_lam_ji
        m_tk = m_t[:, None] & m_k[None, :]
        b_q = tl.load(p_q0 + r_t[:, None] * sqn, mask=m_tk, other=0)
        b_k = tl.load(p_k0 + r_t[:, None] * skn, mask=m_tk, other=0)
        b_v = tl.load(p_v0 + r_t[:, None] * svn, mask=m_t[:, None] & m_v[None, :], other=0)
        b_dot = tl.load(p_do0 + r_t[None, :] * sdn, mask=m_v[:, None] & m_t[None, :], other=0)  # do^T
        b_vdo = input_dot(b_v, b_dot, NATIVE_QK, ACC, PREC) * b_w_ji  # decayed anti-causal (v_j . do_i)
        b_q_start = b_q.to(ACC) * b_w_q[:, None]  # q_i decayed from the state entering the chunk
        b_dk_inter = mixed_dot(b_dht, b_v, False, MODE, PREC) * b_lam_k[:, None]  # through dH
        b_dk = mixed_dot(b_vdo, b_q, True, MODE, PREC) * scale + b_dk_inter
        b_dht_add = mixed_dot(b_q_start, b_dot, False, MODE, PREC)
        if not PER_TOKEN:  # d log lambda: the inter-chunk part of dk weighted by e - 1 - s, the gaps p - e through dH'
            e_e = tl.maximum(n_c - 1 - tl.arange(0, BT), 0).to(ACC)
            b_dk_w = b_dk_inter * e_e[:, None] + mixed_dot(b_dht_gap, b_v, False, MODE, PREC) * b_lam_k[:, None]
            b_dg += tl.reduce(b_k.to(ACC) * b_dk_w, 1, _sum_combine)
            b_dht_gap += n_c.to(ACC) * b_dht
            b_dht_gap = b_dht_gap * f_hi + b_dht_gap * f_lo
        if DG:  # per token: the key-side terms and w <S, D>, b_dht being D at the chunk's end
            p_st = p_st0 + i_c * (H * V * K)
            key_side(p_dgt0 + r_t * nk, b_k, b_dk_inter, p_st, b_dht, f_hi, f_lo, m_vk, p_g0 + r_t * sgn, m_t, neg,
                     BT, ACC)  # fmt: skip
        if ROUND_BF16:
            b_dk = round_to_bf16(b_dk)
        tl.store(p_dk0 + r_t[:, None] * K, b_dk.to(dk.dtype.element_ty), mask=m_tk)
        b_dht = b_dht * f_hi + b_dht * f_lo + (b_dht_add * scale).to(ACC)  # scale: fp64 under torch.compile

    if USE_INITIAL_STATE:
        p_ds0 = ds0 + i_bh * K * V + o_v[:, None] + o_k[None, :] * V  # ds0 is contiguous (rows, H, K, V)
        tl.store(p_ds0, b_dht.to(ds0.dtype.element_ty), mask=m_vk)
    if not PER_TOKEN:
        b_dg_sum = tl.reduce(b_dg, 0, _sum_combine)
        if USE_INITIAL_STATE:  # a chunk ending at 0: only its gap to each query counts
            p_s0 = s0 + i_n * s0b + i_h * s0h + o_v[:, None] * s0v + o_k[None, :] * s0k
            b_s0t = tl.load(p_s0, mask=m_vk, other=0).to(ACC)
            b_dg_sum += tl.reduce(tl.reduce(b_s0t * b_dht_gap, 1, _sum_combine), 0, _sum_combine)
        tl.store(dg_k + i_bh * nk + i_k, b_dg_sum)


@triton.jit(do_not_specialize=NO_SPEC)
def chunked_bwd_dv_kernel(
    q, k, do, dv, dsn, log_decay, decay, g, sgb, sgh, sgn, neg, cu_seqlens, scale, N, H, K, V,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, sdb, sdh, sdn, sdd, snb, snh, snk, snv,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, USE_FINAL_GRAD: tl.constexpr, VARLEN: tl.constexpr,
    PER_TOKEN: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr, NATIVE_QK: tl.constexpr, MODE: tl.constexpr,
    ROUND_BF16: tl.constexpr,
):  # fmt: skip
    """dv for one Dv block (all of Dk), walking backwards with dH (K x BV)."""
    i_bh, i_b, i_h = program_head(H)
    g_hi, g_lo, c_hi, c_lo, b_lam_ij, b_lam_q = head_decays(log_decay, decay, i_h, BT, ACC)
    i_b, bos, T, i_n = sequence(cu_seqlens, i_b, N, VARLEN)  # T tokens from bos; i_n indexes states
    b_lam_ji = tl.trans(b_lam_ij)  # b_lam_ji[j, i] = lambda^(i-j) for i >= j
    o_v, m_v = block_range(tl.program_id(1), BV, V)
    p_do0 = do + i_b * sdb + i_h * sdh + bos * sdn + o_v[None, :] * sdd
    p_dv0 = dv + ((i_b * H + i_h) * N + bos) * V + o_v[None, :]
    o_k, m_k = block_range(0, BK, K)
    p_q0 = q + i_b * sqb + i_h * sqh + bos * sqn + o_k[:, None] * sqd  # q loaded transposed (BK, BT)
    p_k0 = k + i_b * skb + i_h * skh + bos * skn + o_k[None, :] * skd
    p_g0 = g + i_b * sgb + i_h * sgh + bos * sgn  # per-token log decays (PER_TOKEN)

    b_dh = tl.zeros([BK, BV], dtype=ACC)
    if USE_FINAL_GRAD:
        p_dsn = dsn + i_n * snb + i_h * snh + o_k[:, None] * snk + o_v[None, :] * snv
        b_dh = tl.load(p_dsn, mask=m_k[:, None] & m_v[None, :], other=0).to(ACC)

    n_chunks = (T + BT - 1) // BT
    for i_r in range(0, n_chunks):
        r_t, m_t, n_c, b_w_ij, b_w_q, b_lam_k, f_hi, f_lo = chunk_decays(
            n_chunks - 1 - i_r, T, g_hi, g_lo, c_hi, c_lo, b_lam_ij, b_lam_q, p_g0, sgn, neg, BT, ACC, PER_TOKEN
        )
        b_w_ji = tl.trans(b_w_ij) if PER_TOKEN else b_lam_ji
        m_tv = m_t[:, None] & m_v[None, :]
        b_qt = tl.load(p_q0 + r_t[None, :] * sqn, mask=m_k[:, None] & m_t[None, :], other=0)
        b_k = tl.load(p_k0 + r_t[:, None] * skn, mask=m_t[:, None] & m_k[None, :], other=0)
        b_do = tl.load(p_do0 + r_t[:, None] * sdn, mask=m_tv, other=0)
        b_kq = input_dot(b_k, b_qt, NATIVE_QK, ACC, PREC) * b_w_ji  # decayed anti-causal scores
        b_do_start = b_do.to(ACC) * b_w_q[:, None]  # do_i decayed from the state entering the chunk
        b_dv = mixed_dot(b_kq, b_do, True, MODE, PREC) * scale
        b_dv += mixed_dot(b_dh, b_k, False, MODE, PREC) * b_lam_k[:, None]
        b_dh_add = mixed_dot(b_do_start, b_qt, False, MODE, PREC)
        if ROUND_BF16:
            b_dv = round_to_bf16(b_dv)
        tl.store(p_dv0 + r_t[:, None] * V, b_dv.to(dv.dtype.element_ty), mask=m_tv)
        b_dh = b_dh * f_hi + b_dh * f_lo + (b_dh_add * scale).to(ACC)  # scale: fp64 under torch.compile


# The backward's chunk under the interpreter (tests lower it to cross chunk borders on short sequences).
INTERPRET_CHUNK = 64


def _bwd_tiles(d_split: int, d_full: int) -> tuple[int, int, int]:
    """(BT, block of the split dim, block of the full dim) for the backward kernels."""
    full = dim_block(d_full)
    split = dim_block(d_split)
    if INTERPRET:
        return INTERPRET_CHUNK, split, full
    split = min(split, 64 if full <= 128 else 32)
    bt = 64 if full <= 128 else 32
    return bt, split, full


def backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor,
    initial_state: torch.Tensor | None,
    final_state: torch.Tensor | None,
    do: torch.Tensor,
    dfinal: torch.Tensor | None,
    scale: float,
    precision: str,
    cu_seqlens: torch.Tensor | None = None,
    decay_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(dq, dk, dv, dlog_decay, dinitial_state or None); dlog_decay has log_decay's shape: (H,) per head, (B, H, N)
    (or (1, H, T) packed) per token, where `decay_grad=False` skips it (zeros; `token_grad`'s buffers and work are
    left out). `final_state` is not read; the parameter stays for the operator's schema
    (leetdecoding.methods.triton.ops)."""
    B, H, N, Dk = q.shape
    rows = packed_rows(q, cu_seqlens, initial_state=initial_state, final_state=final_state, dfinal=dfinal)
    Dv = v.shape[-1]
    acc = compute_dtype_for(q.dtype)
    if q.dtype == torch.float64:  # an fp64 scale applied to do here rather than as an fp32 kernel argument
        do, scale = do * scale, 1.0
    per_token = log_decay.ndim == 3
    head = log_decay.new_zeros(H) if per_token else log_decay  # per token: the per-head tables are not read
    g_split = split_log_decay(head)
    tokens = token_log_decays(log_decay)
    flags = dot_flags(q.dtype, precision)
    per_token_grad = per_token and decay_grad
    flags["VARLEN"], flags["PER_TOKEN"] = cu_seqlens is not None, per_token
    cu = cu_seqlens if cu_seqlens is not None else log_decay  # a pointer the kernels never read without VARLEN
    dq = torch.empty(B, H, N, Dk, dtype=q.dtype, device=q.device)
    dk = torch.empty(B, H, N, Dk, dtype=k.dtype, device=q.device)
    dv = torch.empty(B, H, N, Dv, dtype=v.dtype, device=q.device)
    ds0 = torch.empty(rows, H, Dk, Dv, dtype=acc, device=q.device) if initial_state is not None else None
    dfinal_or_any = dfinal if dfinal is not None else q  # a pointer the kernel never reads without the flag
    s0_or_any = initial_state if initial_state is not None else q
    key = (Dk, Dv, q.dtype, precision, initial_state is not None, dfinal is not None, cu_seqlens is not None,
           per_token, per_token_grad)  # fmt: skip

    bt_k, bk, bvf = _bwd_tiles(Dk, Dv)
    nk = triton.cdiv(Dk, bk)
    dg_q = torch.empty(rows * H, nk, dtype=acc, device=q.device)
    dg_k = torch.empty(rows * H, nk, dtype=acc, device=q.device)
    sizes = (scale, N, H, Dk, Dv)
    dgt = states = q  # placeholders the kernels never read without DG

    def run_dq(variant):
        bt, stages = variant
        launcher(chunked_bwd_dq_kernel)[(rows * H, nk)](
            q, k, v, do, dq, s0_or_any, dg_q, dgt, states, g_split, decay_power(head, bt), *tokens, cu, *sizes,
            *strides(q), *strides(k), *strides(v), *strides(do), *strides(initial_state),
            BT=bt, BK=bk, BV=bvf, USE_INITIAL_STATE=initial_state is not None, DG=per_token_grad, **flags,
            num_warps=warps(bvf * bk), num_stages=stages,
        )  # fmt: skip

    def run_dk(variant):
        bt, stages = variant
        launcher(chunked_bwd_dk_kernel)[(rows * H, nk)](
            q, k, v, do, dk, dfinal_or_any, s0_or_any, ds0 if ds0 is not None else dg_k, dg_k, dgt, states, g_split,
            decay_power(head, bt), *tokens, cu, *sizes,
            *strides(q), *strides(k), *strides(v), *strides(do), *strides(dfinal), *strides(initial_state),
            BT=bt, BK=bk, BV=bvf, USE_FINAL_GRAD=dfinal is not None, USE_INITIAL_STATE=ds0 is not None,
            DG=per_token_grad, **flags,
            num_warps=warps(bvf * bk), num_stages=stages,
        )  # fmt: skip

    bt_v, bv, bkf = _bwd_tiles(Dv, Dk)

    def run_dv(variant):
        bt, stages = variant
        launcher(chunked_bwd_dv_kernel)[(rows * H, triton.cdiv(Dv, bv))](
            q, k, do, dv, dfinal_or_any, g_split, decay_power(head, bt), *tokens, cu, *sizes,
            *strides(q), *strides(k), *strides(do), *strides(dfinal),
            BT=bt, BK=bkf, BV=bv, USE_FINAL_GRAD=dfinal is not None, **flags,
            num_warps=warps(bkf * bv), num_stages=stages,
        )  # fmt: skip

    def run_dq_dk(variant):  # DG: the dk kernel reads the chunk states the dq kernel stored, at the same BT
        nonlocal dgt, states
        dgt, states = buffers(q, rows, Dv, variant[0], nk, cu_seqlens is not None, acc)
        run_dq(variant)
        run_dk(variant)

    stages = pipeline_stages(q.dtype)
    if per_token_grad:
        launch(("dq+dk", *key), chunk_variants(bt_k, stages), run_dq_dk)
    else:
        launch(("dq", *key), chunk_variants(bt_k, stages), run_dq)
        launch(("dk", *key), chunk_variants(bt_k, stages), run_dk)
    launch(("dv", *key), chunk_variants(bt_v, stages), run_dv)
    if per_token:  # each Dk block's share of d log lambda_t summed (`token_grad`), or zeros for the schema
        dg = dgt.sum(-1) if per_token_grad else torch.zeros_like(log_decay)
        return dq, dk, dv, dg.to(log_decay.dtype), ds0
    # dlog_lambda: the query- and key-side distance-weighted sums (nothing cancels; the final state's pairs are
    # in the key side), per Dk block and sequence, summed per head
    dg = (dg_q.double().sum(-1) + dg_k.double().sum(-1)).view(rows, H).sum(0)
    return dq, dk, dv, dg.to(log_decay.dtype), ds0
