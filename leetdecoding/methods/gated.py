"""Per-token decays (leetdecoding.gates) in the torch methods: the quadratic form, the chunk loop, the recurrence.

With g_t = log lambda_t (B, H, N) and G the cumulative sum of g within a block of tokens (a chunk, or the whole
sequence for the quadratic form), in fp64:

    o_t   = scale ( sum_{s<=t} exp(G_t - G_s) (q_t . k_s) v_s + exp(G_t) q_t S_start )
    S_end = exp(G_last) S_start + sum_s exp(G_last - G_s) k_s^T v_s

Every exponent is <= 0. The chunk loop (chunked; vanilla runs it as one block) has its own backward
(leetdecoding.methods.gated_chunked; `blocks_differentiable` gives its second derivatives); the recurrence has its
own backward, token by token, with
R_t = dL/dS_t = scale q_t^T do_t + lambda_{t+1} R_{t+1}: dq_t = scale do_t S_t^T, dk_t = R_t v_t,
dv_t = R_t^T k_t, d g_t = lambda_t <R_t, S_{t-1}>, d S_init = lambda_0 R_0.
"""

from __future__ import annotations

import torch

from ..gates import Sums, causal_mask, survey
from ..inputs import AttentionInputs
from .autograd import RecurrenceFunction
from .base import output_buffer, zero_states


def _initial(x: AttentionInputs) -> torch.Tensor:
    return x.initial_state if x.initial_state is not None else zero_states(x, x.batch)


def block(q, k, v, sums: Sums, state):
    """One block of tokens in the compute dtype, differentiable: (o (B, H, n, Dv) unscaled, the state after it)."""
    cd = q.dtype
    o = ((q @ k.transpose(-1, -2)) * sums.within(cd)) @ v + (q * sums.from_start(cd).unsqueeze(-1)) @ state
    decayed_k = k * sums.to_end(cd).unsqueeze(-1)
    state = sums.whole(cd).unsqueeze(-1) * state + decayed_k.transpose(-1, -2) @ v
    return o, state


def _block_in_place(q, k, v, factors, state, out, scale: float):
    """`block` without gradients, each product fused with its sum and written over its own temporaries, on
    (B*H, n, D) views; the state is updated in place; o is copied into `out` (B, H, n, Dv). `factors` is the
    block's Sums, or for a shallow block (exp(G), exp(-G) in the compute dtype (`shallow_factors`), and the bool
    mask of the pairs s > t). (Written straight into `out`, a strided view, the batched products ran per batch
    row: 1.85x the time.)"""
    cd, (B, H, n, Dk), Dv = q.dtype, q.shape, v.shape[-1]
    q3, k3, v3 = q.reshape(B * H, n, Dk), k.reshape(B * H, n, Dk), v.reshape(B * H, n, Dv)
    s3 = state.view(B * H, Dk, Dv)
    if isinstance(factors, tuple):  # exp(G_t - G_s) (q_t . k_s) = (exp(G_t) q_t) . (exp(-G_s) k_s): on q and k
        down, up, later = factors
        down = down.reshape(B * H, n, 1)
        decayed_q, raised_k = q3 * down, k3 * up.reshape(B * H, n, 1)
        # above the diagonal (s > t) the factor is exp(G_t - G_s) >= 1, up to exp(SHALLOW): for large q and k
        # (|q_t . k_s| > 1e21 in fp32) the score is inf there, and inf times a mask's 0 would be NaN; filled instead
        scores = torch.bmm(decayed_q, raised_k.transpose(1, 2)).masked_fill_(later, 0.0)
        decayed_k, whole = raised_k.mul_(down[:, -1:]), down[:, -1:]
    else:
        scores = torch.bmm(q3, k3.transpose(1, 2)).mul_(factors.within(cd).view(B * H, n, n))
        decayed_q = q3 * factors.from_start(cd).view(B * H, n, 1)
        decayed_k, whole = k3 * factors.to_end(cd).view(B * H, n, 1), factors.whole(cd).view(B * H, 1, 1)
    o = torch.bmm(decayed_q, s3).baddbmm_(scores, v3)
    if scale != 1.0:
        o.mul_(scale)
    s3.mul_(whole).baddbmm_(decayed_k.transpose(1, 2), v3)
    out.copy_(o.view(B, H, n, Dv))


def shallow_factors(g: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """exp(G) and exp(-G) (..., N) in g's dtype, G the fp64 cumulative sums of g within each block of `size`
    tokens, for every block of a call at once: a shallow call's factors (gates.SHALLOW; no resets), as each
    block's Sums gives them, in four ops per call rather than per block."""
    n = g.shape[-1]
    G = torch.nn.functional.pad(g.to(torch.float64), (0, -n % size)).unflatten(-1, (-1, size)).cumsum(-1)
    G = G.flatten(-2)[..., :n]
    return torch.exp(G).to(g.dtype), torch.exp(-G).to(g.dtype)


class BlockSums:
    """The Sums maker of a call's log decays g (..., N) in blocks of `size` tokens: one read of the values decides
    resets and shallow blocks (gates.survey) for every block, forward and backward alike."""

    def __init__(self, g: torch.Tensor, size: int, shallow: bool = True):
        self.resets, self.shallow = survey(g, size)
        self.shallow &= shallow  # shallow=False: every block's factors from its exp(G_t - G_s) table
        n = g.shape[-1]
        self.causal = causal_mask(min(size, max(n, 1)), g.device, g.dtype if self.shallow else torch.bool)

    def __call__(self, part: torch.Tensor) -> Sums:
        r = part.shape[-1]
        return Sums(part, self.causal[:r, :r], self.resets, self.shallow)


def blocks_differentiable(q, k, v, g, s0, scale: float, size: int):
    """(o in q's dtype, final state) of the blocks of `size` tokens in turn, differentiable by autograd (a new
    tensor per product); g and s0 are in the compute dtype."""
    cd, sums = g.dtype, BlockSums(g, size)
    # split, not sliced per block: a slice's backward writes a zero tensor of the whole input per block
    state, parts = s0, []
    for qc, kc, vc, gc in zip(q.split(size, 2), k.split(size, 2), v.split(size, 2), g.split(size, -1)):
        o, state = block(qc.to(cd), kc.to(cd), vc.to(cd), sums(gc), state)
        parts.append(o)
    o = torch.cat(parts, dim=2) if parts else q.new_zeros(*q.shape[:3], v.shape[-1], dtype=cd)
    return (o * scale if scale != 1.0 else o).to(q.dtype), state.clone() if not parts else state


def blocks_in_place(q, k, v, g, s0, scale: float, size: int, save_at=(), shallow: bool = True):
    """(o, final state, the states before the tokens in `save_at`) of the blocks of `size` tokens, without
    gradients: products fused and written over their own temporaries, the state updated in place.

    Shallow blocks raise each key by exp(-G_s) (up to exp(SHALLOW), gates.py) before its product with q: a key
    beyond the dtype's largest number over that (about 1e21 in fp32) overflows though the result may be finite.
    Such a key leaves the final state non-finite (its raised copy enters it), so a shallow call whose final state
    is not finite runs again with every block's exp(G_t - G_s) table (non-finite inputs pay for two runs)."""
    n, cd, sums = q.shape[2], g.dtype, BlockSums(g, size, shallow)
    out, state, saved = output_buffer(q, v.shape[-1]), s0.clone(memory_format=torch.contiguous_format), []
    down, up = shallow_factors(g, size) if sums.shallow else (None, None)
    later = sums.causal == 0 if sums.shallow else None  # the pairs s > t, for the shallow blocks' scores
    for start in range(0, n, size):
        if start in save_at:
            saved.append(state.clone())
        part = slice(start, min(n, start + size))
        if sums.shallow:
            r = part.stop - start
            factors = (down[..., part], up[..., part], later[:r, :r])
        else:
            factors = sums(g[..., part])
        _block_in_place(q[:, :, part].to(cd), k[:, :, part].to(cd), v[:, :, part].to(cd), factors, state,
                        out[:, :, part], scale)  # fmt: skip
    if sums.shallow and not bool(torch.isfinite(state).all()):
        return blocks_in_place(q, k, v, g, s0, scale, size, save_at, shallow=False)
    return out, state, saved


def forward_blocks(x: AttentionInputs, size: int):
    """(o in the input dtype, final state) of the blocks of `size` tokens in turn (size >= N: one block), without
    gradients (with them, the methods run gated_chunked's autograd Function)."""
    return blocks_in_place(x.q, x.k, x.v, x.log_decay, _initial(x), x.scale, size)[:2]


# ----- the recurrence, with its own backward (autograd.RecurrenceFunction) -----

CHECKPOINT_EVERY = 64  # the forward keeps the state every this many tokens for the backward to restart from


def _step(state, q_t, k_t, v_t, lam):
    new = torch.addcmul(state * lam, k_t.unsqueeze(-1), v_t.unsqueeze(-2))
    return (q_t.unsqueeze(-2) @ new).squeeze(-2), new


def recurrent_fwd(q, k, v, g, scale, initial_state, save, in_place=False):
    """(o, final state, the state before every CHECKPOINT_EVERY-th token if save). A new state per token
    (differentiable by autograd); `in_place` is the per-head recurrence's option, with nothing to do here."""
    cd = initial_state.dtype
    lam = torch.exp(g.to(torch.float64)).to(cd)  # (B, H, N), each factor once
    state, saved = initial_state, []
    o = torch.empty(*q.shape[:3], v.shape[-1], dtype=q.dtype, device=q.device)
    for t in range(q.shape[2]):
        if save and t % CHECKPOINT_EVERY == 0:
            saved.append(state)
        o_t, state = _step(state, q[:, :, t].to(cd), k[:, :, t].to(cd), v[:, :, t].to(cd), lam[..., t, None, None])
        o[:, :, t] = o_t * scale if scale != 1.0 else o_t
    return o, state.clone() if q.shape[2] == 0 else state, saved


def recurrent_bwd(q, k, v, g, scale, saved, do, d_final, initial_state):
    cd = initial_state.dtype
    n = q.shape[2]
    lam = torch.exp(g.to(torch.float64)).to(cd)
    grad = d_final.to(cd) if d_final is not None else torch.zeros_like(initial_state)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    dg = torch.empty(g.shape, dtype=cd, device=g.device)
    for i in reversed(range(len(saved))):
        start, stop = i * CHECKPOINT_EVERY, min(n, (i + 1) * CHECKPOINT_EVERY)
        states = [saved[i]]  # states[t - start]: the state before token t
        for t in range(start, stop):
            states.append(_step(states[-1], q[:, :, t].to(cd), k[:, :, t].to(cd), v[:, :, t].to(cd),
                                lam[..., t, None, None])[1])  # fmt: skip
        for t in reversed(range(start, stop)):
            q_t, k_t, v_t, do_t = (z[:, :, t].to(cd) for z in (q, k, v, do))
            do_t = do_t * scale
            grad = torch.addcmul(grad, q_t.unsqueeze(-1), do_t.unsqueeze(-2))  # R_t
            dq[:, :, t] = (states[t - start + 1] @ do_t.unsqueeze(-1)).squeeze(-1)
            dk[:, :, t] = (grad @ v_t.unsqueeze(-1)).squeeze(-1)
            dv[:, :, t] = (k_t.unsqueeze(-2) @ grad).squeeze(-2)
            dg[..., t] = lam[..., t] * (grad * states[t - start]).sum((-2, -1))
            grad = grad * lam[..., t, None, None]
    return dq, dk, dv, dg.to(g.dtype), grad


def recurrent(x: AttentionInputs):
    """(o, final state) of the recurrence with per-token decays."""
    s0 = _initial(x)
    if x.requires_grad:
        return RecurrenceFunction.apply(x.q, x.k, x.v, x.log_decay, s0, x.scale, (recurrent_fwd, recurrent_bwd))
    with torch.no_grad():
        return recurrent_fwd(x.q, x.k, x.v, x.log_decay, x.scale, s0, False)[:2]
