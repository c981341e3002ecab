"""The kernels' shared prologue, in-kernel: program ids and sequence bounds, head-dim blocks, the decays of a head
and of a chunk. Products and rounding are in `tile_math`.

Kernel habits used throughout: explicit offsets and masks on every load and store, 64-bit batch/head offsets,
the sequence length and every stride that can depend on it marked `do_not_specialize` (`NO_SPEC`), constexpr
feature flags instead of copied kernels, every decay factor exp(non-positive), lambda^e always as
exp(g_hi e) * exp(g_lo e) (`common.split_log_decay`).

Under `TRITON_INTERPRET=1` the kernels run on CPU tensors in Triton's interpreter. There, every call of a
`@triton.jit` helper costs about a millisecond (the interpreter re-patches the language on each call), so the
kernels call helpers once per program or once per chunk, never once per token (on the GPU they are inlined).
"""

from __future__ import annotations

import triton
import triton.language as tl

# The sequence length, and the batch and head strides of every (B, H, N, D) tensor and of per-token log decays
# (B, H, N) (they depend on N for some layouts): never specialised on. One list for all kernels; Triton skips the
# names a kernel does not take.
NO_SPEC = ["N", "sqb", "sqh", "skb", "skh", "svb", "svh", "sob", "soh", "sdb", "sdh", "sgb", "sgh"]


# ----- the prologue -----


@triton.jit
def program_head(H):
    """This program's batch * head index (first grid axis: up to 2^31 - 1 programs), its batch row and head;
    all 64-bit, for address arithmetic."""
    i_bh = tl.program_id(0)
    return i_bh.to(tl.int64), (i_bh // H).to(tl.int64), (i_bh % H).to(tl.int64)


@triton.jit
def block_range(i_block, BLOCK: tl.constexpr, size):
    """Offsets of block `i_block` (BLOCK wide) of an axis of `size`, and the mask of those inside it."""
    o_x = i_block * BLOCK + tl.arange(0, BLOCK)
    return o_x, o_x < size


@triton.jit
def head_decays(log_decay, decay, i_h, BT: tl.constexpr, ACC: tl.constexpr):
    """Head i_h's decays for chunks of BT tokens: log lambda as g_hi + g_lo (`split_log_decay`), lambda^BT as
    c_hi + c_lo (from the host: it compounds over chunks), b_lam_ij[i, j] = lambda^(i-j) for j <= i else 0, and
    b_lam_q[i] = lambda^(i+1) (what a query at i sees of the state entering the chunk)."""
    g_hi = tl.load(log_decay + 2 * i_h).to(ACC)
    g_lo = tl.load(log_decay + 2 * i_h + 1).to(ACC)
    c_hi = tl.load(decay + 2 * i_h)
    c_lo = tl.load(decay + 2 * i_h + 1)
    o_t = tl.arange(0, BT)
    m_ij = o_t[:, None] >= o_t[None, :]
    e_ij = tl.where(m_ij, o_t[:, None] - o_t[None, :], 0).to(ACC)
    b_lam_ij = tl.where(m_ij, tl.exp(g_hi * e_ij) * tl.exp(g_lo * e_ij), 0)
    e_q = (o_t + 1).to(ACC)
    b_lam_q = tl.exp(g_hi * e_q) * tl.exp(g_lo * e_q)
    return g_hi, g_lo, c_hi, c_lo, b_lam_ij, b_lam_q


@triton.jit
def sequence(cu_seqlens, i_b, N, VARLEN: tl.constexpr):
    """(batch row, first token, length, sequence index) of this program's sequence: batch row i_b of N tokens,
    or with VARLEN the packed sequence i_b, tokens [cu_seqlens[i_b], cu_seqlens[i_b + 1]) of batch row 0."""
    if VARLEN:
        bos = tl.load(cu_seqlens + i_b).to(tl.int64)
        n = (tl.load(cu_seqlens + i_b + 1) - bos).to(tl.int32)
        row = i_b * 0
    else:
        bos = i_b * 0
        n = N
        row = i_b
    return row, bos, n, i_b


@triton.jit
def chunk_span(i_c, T, g_hi, g_lo, c_hi, c_lo, BT: tl.constexpr, ACC: tl.constexpr):
    """Chunk i_c of a sequence of T tokens: its token indices (64-bit) and their mask, its length n_c,
    b_lam_k[j] = lambda^(n_c-1-j) (a key at j seen from the chunk's last token; rows past n_c hold zeros anyway)
    and lambda^n_c as f_hi + f_lo (the state's decay across the chunk; the host's accurate pair for a full one)."""
    o_t = tl.arange(0, BT)
    r_t = i_c * BT + o_t.to(tl.int64)
    n_c = tl.minimum(T - i_c * BT, BT)
    e_k = tl.maximum(n_c - 1 - o_t, 0).to(ACC)
    b_lam_k = tl.exp(g_hi * e_k) * tl.exp(g_lo * e_k)
    e_c = n_c.to(ACC)
    f_hi = tl.where(n_c == BT, c_hi, tl.exp(g_hi * e_c) * tl.exp(g_lo * e_c))
    f_lo = tl.where(n_c == BT, c_lo, 0)
    return r_t, r_t < T, n_c, b_lam_k, f_hi, f_lo


@triton.jit
def token_decays(p_g, m_t, neg, BT: tl.constexpr, ACC: tl.constexpr):
    """A chunk's per-token decays (PER_TOKEN): log decays g at p_g (masked by m_t; rows past the chunk read 0, no
    decay), G their cumulative sum in fp64 with resets (g < neg, `leetdecoding.gates.negligible`) left out and R
    the number of resets up to each token, so that a factor across a reset is 0 and -inf never enters a sum.
    Returns what `head_decays` and `chunk_span` give a constant decay: b_lam_ij[t, s] = exp(G_t - G_s) (s <= t, no
    reset in (s, t]), b_lam_q[t] = exp(G_t), b_lam_k[s] = exp(G_last - G_s) and exp(G_last) as f_hi + f_lo (it
    compounds over chunks). Every exponent is a difference of fp64 sums, never positive (G does not increase)."""
    b_g = tl.load(p_g, mask=m_t, other=0).to(tl.float64)
    reset = b_g < neg
    b_G = tl.cumsum(tl.where(reset, 0.0, b_g), 0)
    b_R = tl.cumsum(reset.to(tl.int32), 0)
    G_last = tl.min(b_G, 0)  # the last token's sum (padding rows add 0)
    R_last = tl.max(b_R, 0)
    o_t = tl.arange(0, BT)
    m_ij = (o_t[:, None] >= o_t[None, :]) & (b_R[:, None] == b_R[None, :])
    b_lam_ij = tl.where(m_ij, tl.exp(tl.where(m_ij, b_G[:, None] - b_G[None, :], 0).to(ACC)), 0)
    b_lam_q = tl.where(b_R == 0, tl.exp(b_G.to(ACC)), 0)
    b_lam_k = tl.where(b_R == R_last, tl.exp((G_last - b_G).to(ACC)), 0)
    f = tl.where(R_last == 0, tl.exp(G_last), 0.0)
    f_hi = f.to(ACC)
    return b_lam_ij, b_lam_q, b_lam_k, f_hi, (f - f_hi.to(tl.float64)).to(ACC)


@triton.jit
def chunk_decays(
    i_c, T, g_hi, g_lo, c_hi, c_lo, b_lam_ij, b_lam_q, p_g0, sgn, neg,
    BT: tl.constexpr, ACC: tl.constexpr, PER_TOKEN: tl.constexpr,
):  # fmt: skip
    """Chunk i_c's span and decays in either mode, for the kernels' chunk loops: (r_t, m_t, n_c) of `chunk_span`,
    then b_w_ij, b_w_q, b_lam_k, f_hi, f_lo: the head's tables (`head_decays`, `chunk_span`) or, with PER_TOKEN,
    the chunk's own (`token_decays`, log decays at p_g0 + token * sgn)."""
    r_t, m_t, n_c, b_lam_k, f_hi, f_lo = chunk_span(i_c, T, g_hi, g_lo, c_hi, c_lo, BT, ACC)
    b_w_ij, b_w_q = b_lam_ij, b_lam_q
    if PER_TOKEN:
        b_w_ij, b_w_q, b_lam_k, f_hi, f_lo = token_decays(p_g0 + r_t * sgn, m_t, neg, BT, ACC)
    return r_t, m_t, n_c, b_w_ij, b_w_q, b_lam_k, f_hi, f_lo
