"""In-kernel pieces shared by the Triton kernels: the prologue (program ids, decays, sequence bounds), the dots
that meet an fp32 operand, bf16 rounding.

Kernel habits used throughout: explicit offsets and masks on every load and store, 64-bit batch/head offsets,
the sequence length and every stride that can depend on it marked `do_not_specialize` (`NO_SPEC`), constexpr
feature flags instead of copied kernels, every decay factor exp(non-positive), lambda^e always as
exp(g_hi e) * exp(g_lo e) (`common.split_log_decay`).

Under `TRITON_INTERPRET=1` the kernels run on CPU tensors in Triton's interpreter. There, every call of a
`@triton.jit` helper costs about a millisecond (the interpreter re-patches the language on each call), so the
helpers below are called once per program or once per chunk, never once per token, and sums are
`tl.reduce(x, axis, SUM)` (the interpreter's numpy fast path) instead of `tl.sum`; on the GPU both compile to the
same reduction.
"""

from __future__ import annotations

import triton
import triton.language as tl

# The sequence length, and the batch and head strides of every (B, H, N, D) tensor (they depend on N for some
# layouts): never specialised on. One list for all kernels; Triton skips the names a kernel does not take.
NO_SPEC = ["N", "sqb", "sqh", "skb", "skh", "svb", "svh", "sob", "soh", "sdb", "sdh"]

# The combine function of tl.sum. `tl.reduce(x, axis, SUM)` is tl.sum without the nested jit call.
SUM = tl.standard._sum_combine

# how `mixed_dot` multiplies (the MODE flag of the kernels; `common.dot_flags` chooses it)
WIDE, SPLIT_BF16, SPLIT_TF32, LOW = 0, 1, 2, 3


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
def distances(BT: tl.constexpr, ACC: tl.constexpr):
    """(BT, BT): t - s for s <= t, else 0 (the weights of d log lambda's intra-chunk pairs)."""
    o_t = tl.arange(0, BT)
    return tl.where(o_t[:, None] >= o_t[None, :], o_t[:, None] - o_t[None, :], 0).to(ACC)


# ----- products and rounding -----


@triton.jit
def input_dot(a, b, NATIVE_QK: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr):
    """a @ b for two tiles of the inputs (q k^T and the like): with NATIVE_QK the 16-bit tiles multiplied
    directly (exact products, fp32 accumulation), otherwise widened to ACC first."""
    if NATIVE_QK:
        out = tl.dot(a, b)
    else:
        out = tl.dot(a.to(ACC), b.to(ACC), input_precision=PREC)
    return out


@triton.jit
def split_hi_lo(w, MODE: tl.constexpr):
    """w (fp32) as hi + lo for `mixed_dot`'s split modes. SPLIT_BF16 (1): hi and lo in bf16, w - hi - lo about
    2^-17 |w|. SPLIT_TF32 (2): hi = w with its 13 low mantissa bits cleared (exact in TF32) and lo = w - hi exactly
    in fp32; the TF32 product rounds lo once more (about 2^-21 |w| in all)."""
    if MODE == 1:
        hi = w.to(tl.bfloat16)
        lo = (w - hi.to(tl.float32)).to(tl.bfloat16)
    else:
        hi = (w.to(tl.int32, bitcast=True) & -8192).to(tl.float32, bitcast=True)
        lo = w - hi
    return hi, lo


@triton.jit
def mixed_dot(w, x, W_FIRST: tl.constexpr, MODE: tl.constexpr, PREC: tl.constexpr):
    """w @ x (W_FIRST) or x @ w, for w in the accumulation dtype and x a tile of the inputs (any dtype).

    WIDE (0): x widened to w's dtype, one dot at PREC. LOW (3): w rounded to x's dtype, one native dot.
    SPLIT_BF16 (1) / SPLIT_TF32 (2): w split by `split_hi_lo` and two dots in which x is exact (16-bit inputs are
    exact in TF32): about 2^-17 (bf16) or 2^-21 (TF32) relative error per product.
    """
    # (one return at the end: the compiler does not stop at a return inside a branch)
    if MODE == 1 or MODE == 2:
        hi, lo = split_hi_lo(w, MODE)
        if MODE == 2:
            x = x.to(tl.float32)
        if W_FIRST:
            out = tl.dot(hi, x, input_precision="tf32") + tl.dot(lo, x, input_precision="tf32")
        else:
            out = tl.dot(x, hi, input_precision="tf32") + tl.dot(x, lo, input_precision="tf32")
    elif MODE == 3:
        w = w.to(x.dtype)
        if W_FIRST:
            out = tl.dot(w, x)
        else:
            out = tl.dot(x, w)
    else:
        x = x.to(w.dtype)
        if W_FIRST:
            out = tl.dot(w, x, input_precision=PREC)
        else:
            out = tl.dot(x, w, input_precision=PREC)
    return out


@triton.jit
def round_to_bf16(x):
    """fp32 -> bf16 rounding to nearest even, in integer arithmetic. The interpreter's own fp32 -> bf16 cast
    truncates (up to twice the rounding error); kernels use this there only (flag ROUND_BF16)."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True).to(tl.bfloat16)
