"""Sequence parallelism over torch.distributed: one sequence spread over the ranks of a group, exact.

    import torch.distributed as dist, leetdecoding.distributed as ldd
    dist.init_process_group("gloo")                     # "nccl" on GPUs; torchrun sets the environment
    o, state = ldd.attention(q_mine, k_mine, v_mine, decay=0.99, output_final_state=True)

Rank r holds a contiguous slice of the sequence (the ranks in group order). The state the tokens before its slice
leave is a linear function of the earlier ranks' slices: each rank runs `leetdecoding.attention` on its slice from
a zero state, which gives its output and the state its slice adds, S_r = sum_j lambda^(n_r-1-j) k_j^T v_j; one
all-gather shares (S_r, the log of the factor across the slice) between the ranks; each rank scans the earlier
ranks' pairs into its incoming state S_in and adds what S_in contributes to its outputs, scale lambda^(t+1) q_t S_in
(every factor exp of a sum of log decays, never positive). Communication per call: P (B H Dk Dv + B H) numbers
forward and the same backward, whatever N (LASP-2's design, with decays, states and packed sequences).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..api import _results
from ..api import attention as _local_attention
from ..inputs import check_state_dtype, validate
from ..positions import check_cu_seqlens
from .comm import all_gather, all_reduce, depend, gather_ints, resolve_group, sum_gradient
from .layout import Layout, layout

__all__ = ["attention", "layer_attention"]


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    decay: float | torch.Tensor | None = None,
    *,
    log_decay: float | torch.Tensor | None = None,
    scale: float = 1.0,
    group=None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    method: str = "auto",
    reduce_decay_grad: bool = False,
):
    """`leetdecoding.attention` over a sequence split between the ranks of `group`; exact (the same operator, only
    the order of the sums changes), forward and backward.

    Args:
        q, k: (B, H, n_r, Dk); v: (B, H, n_r, Dv): this rank's contiguous slice of the sequence. n_r may differ
            between ranks and be 0; B, H, Dk, Dv, the dtype and the kind of decay must agree.
        decay, log_decay, scale, method: as in `leetdecoding.attention`. A per-head decay is the same on every rank;
            a per-token decay (B, H, n_r) is this rank's slice of it.
        group: a ProcessGroup, a 1-D DeviceMesh (e.g. `mesh["sp"]` of a data x sequence mesh), or None for the
            default group. The sequence runs through the ranks in the group's rank order.
        initial_state: the state before the whole sequence, (B, H, Dk, Dv) ((S, H, Dk, Dv) with cu_seqlens), the
            same on every rank: each rank reads it where a sequence starts in its slice.
        output_final_state: also return the state after the whole sequence (after each sequence, with
            cu_seqlens), identical on every rank.
        cu_seqlens: global offsets (S + 1,) into the whole stream of packed sequences (batch 1), the same on every
            rank; a sequence may cross rank boundaries.
        reduce_decay_grad: sum a per-head decay's gradient over the group (see Gradients).

    Returns:
        As `leetdecoding.attention`: o (B, H, n_r, Dv), this rank's outputs, or `(o, final_state)`.

    Gradients: the objective is the sum of the ranks' losses, as in data-parallel training. Gradients of q, k, v
    and of a per-token decay are exact on each rank for its slice (they include what later ranks' losses owe to
    it). A per-head decay and the initial state are replicated inputs: each rank's gradient is a partial sum and
    their sum over the group is the single-process gradient; reduce it as for any replicated parameter (DDP
    does), or pass `reduce_decay_grad=True` to have the decay's summed here. The final state is the same tensor on
    every rank: a loss on it counts once per rank that uses it.

    Raises:
        RuntimeError: torch.distributed is not initialised.
        TypeError / ValueError: as `leetdecoding.attention`, naming the argument; ValueError, on every rank, when
            the ranks disagree on B, H, Dk, Dv, the dtype or the kind of decay, or cu_seqlens does not end at the
            total length of the ranks' slices.
    """
    group = resolve_group(group)
    x = validate(q, k, v, decay, log_decay, scale, None, False, None, None, None)
    lay = _layout(x, group, cu_seqlens)
    _check_initial_state(initial_state, x, lay)
    gates = x.log_decay
    if reduce_decay_grad and not x.per_token:
        gates = sum_gradient(gates, group)
    o, finals = _local(x, lay, gates, initial_state, method)
    rows = 1 if cu_seqlens is not None else x.batch
    gathered = all_gather(_tail(x, lay, gates, finals, rows), group)
    states = _Scan(gathered, lay.cuts, rows, x)
    if lay.continues:
        o, finals = _continue(x, lay, gates, o, finals, states.before(lay.rank))
    if not output_final_state:
        return depend(gathered, o)[0]
    if cu_seqlens is None:
        final = states.before(len(lay.lengths), initial_state)
    else:
        # through `depend`, the sum's backward runs before the gather's on every rank: the same collectives in the
        # same order everywhere, whichever ranks continue a sequence
        final = all_reduce(depend(gathered, _sequence_finals(x, lay, finals, initial_state))[0], group)
    return _results(*depend(gathered, o, final), None)


def layer_attention(q, k, v, *, log_decay, scale: float, method, group) -> torch.Tensor:
    """`DecayingLinearAttention`'s core when it is given a group: this rank's o (B, n_r, H * Dv) from its slice of
    q, k (B, H, n_r, Dk) and v, as `leetdecoding.layers.attend` lays it out."""
    b, h, n, dv = v.shape
    o = attention(q, k, v, log_decay=log_decay, scale=scale, method=method, group=group)
    return o.transpose(1, 2).reshape(b, n, h * dv)


def _agreed(x, cu_seqlens) -> dict[str, int]:
    """What every rank must pass alike, as ints for one all-gather: shapes and kinds, and fingerprints of the
    values (a per-head decay, the scale, the offsets) so that a rank with other values fails on every rank."""
    same_decay = 0 if x.per_token else hash(tuple(x.log_decay.double().tolist()))
    offsets = () if cu_seqlens is None else tuple(int(c) for c in cu_seqlens.tolist())
    return {
        "B": x.batch, "H": x.heads, "Dk": x.dk, "Dv": x.dv, "per-token decay (0 no, 1 yes)": int(x.per_token),
        "dtype (index)": _DTYPES.index(x.dtype), "cu_seqlens given (0 no, 1 yes)": int(cu_seqlens is not None),
        "decay": same_decay, "scale": hash(float(x.scale)), "cu_seqlens": hash(offsets),
    }  # fmt: skip


def _layout(x, group, cu_seqlens) -> Layout:
    """Every rank's length from one small all-gather, which also checks that the ranks agree on the rest."""
    fields = _agreed(x, cu_seqlens)
    every = gather_ints([x.seq_len, *fields.values()], group, x.device)
    for i, name in enumerate(fields, start=1):
        if len({row[i] for row in every}) > 1:
            shown = {"decay": "(values differ)", "cu_seqlens": "(offsets differ)", "scale": "(values differ)"}
            per_rank = ", ".join(f"rank {r} {row[i] if name not in shown else ''}".rstrip() for r, row in
                                 enumerate(every))  # fmt: skip
            raise ValueError(
                f"every rank must pass the same {name}; it differs between ranks {shown.get(name, '')}: {per_rank}."
            )
    lengths = [row[0] for row in every]
    total = sum(lengths)
    if cu_seqlens is None:
        offsets = [0, total]
    else:  # checked as leetdecoding.attention checks it, against the whole stream's length
        offsets = check_cu_seqlens(cu_seqlens, torch.empty(x.batch, x.heads, total, 0, device="meta"))
    return layout(dist.get_rank(group), lengths, offsets, packed=cu_seqlens is not None)


_DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


def _check_initial_state(state, x, lay: Layout) -> None:
    if state is None:
        return
    if not isinstance(state, torch.Tensor):
        raise TypeError(f"initial_state must be a tensor or None; got {type(state).__name__}.")
    rows = len(lay.offsets) - 1 if lay.packed else x.batch
    want = (rows, x.heads, x.dk, x.dv)
    if tuple(state.shape) != want:
        what = "S" if lay.packed else "B"
        raise ValueError(
            f"initial_state must have shape ({what}, H, Dk, Dv) = {want}, the state before the whole sequence; got "
            f"{tuple(state.shape)}."
        )
    check_state_dtype("initial_state", state, x.dtype)


def _local(x, lay: Layout, gates, initial_state, method):
    """This rank's outputs and the state each of its pieces leaves, every piece from its initial state where its
    sequence starts here and from zeros where it continues an earlier rank's (added later, by linearity)."""
    starts = [p.start for p in lay.pieces] + [lay.pieces[-1].end]
    packed = len(lay.pieces) > 1
    cu = torch.tensor(starts, dtype=torch.int64, device=x.device) if packed else None
    o, finals = _local_attention(
        x.q, x.k, x.v, log_decay=gates, scale=x.scale, method=method, output_final_state=True, cu_seqlens=cu,
        initial_state=_local_initial_states(x, lay, initial_state),
    )  # fmt: skip
    return o, finals


def _local_initial_states(x, lay: Layout, state):
    """One initial state per piece: the sequence's where it starts in this slice, zeros elsewhere."""
    if state is None or not any(p.starts_here for p in lay.pieces):
        return None
    if not lay.packed:
        return state  # one piece, every batch row's sequence starting here
    zero = state.new_zeros(1, *state.shape[1:])
    return torch.cat([state[p.seq : p.seq + 1] if p.starts_here else zero for p in lay.pieces])


def _tail(x, lay: Layout, gates, finals, rows: int) -> torch.Tensor:
    """What this rank shares: the state its tail piece leaves (from zeros, or from the initial state where its
    sequence starts here) and the log of the factor across the tail, as one (rows, H, Dk Dv + 1) tensor."""
    tail = lay.pieces[-1]
    log_factor = _token_gates(x, gates)[..., tail.start : tail.end].sum(-1, dtype=torch.float64)
    state = finals[finals.shape[0] - rows :]
    return torch.cat((state.flatten(2), log_factor.to(state.dtype).unsqueeze(-1)), dim=-1)


def _token_gates(x, gates) -> torch.Tensor:
    """Log decays per token, (B, H, n): a per-head decay expanded (a view)."""
    return gates if x.per_token else gates.view(1, -1, 1).expand(x.batch, -1, x.seq_len)


class _Scan:
    """The states the ranks leave, in order, from the gathered (S_r, log factor) pairs: E_r = S_r where rank r's
    tail starts its sequence, else S_r + exp(log factor_r) E_{r-1}."""

    def __init__(self, gathered: torch.Tensor, cuts: list[bool], rows: int, x):
        self.gathered, self.cuts = gathered, cuts
        self.shape = (rows, x.heads, x.dk, x.dv)

    def before(self, rank: int, start: torch.Tensor | None = None) -> torch.Tensor:
        """The state after ranks 0..rank-1 (the whole sequence for rank = P), from `start` (zeros if None)."""
        state = start if start is not None else self.gathered.new_zeros(self.shape)
        for j in range(rank):
            s_j = self.gathered[j, ..., :-1].reshape(self.shape)
            if self.cuts[j]:
                state = s_j
            else:
                state = s_j + torch.exp(self.gathered[j, ..., -1])[..., None, None] * state
        return state


def _continue(x, lay: Layout, gates, o, finals, incoming):
    """Add what the incoming state contributes to the first piece: scale exp(G_t) q_t S_in to its outputs (G_t the
    sum of its log decays up to t, so exp(G_t) = lambda^(t+1) for a per-head decay) and exp(G_last) S_in to the
    state it leaves."""
    m = lay.pieces[0].end
    factors = torch.exp(torch.cumsum(_token_gates(x, gates)[..., :m].to(torch.float64), dim=-1))
    factors = factors.to(incoming.dtype)  # (rows, H, m): exp of sums that are never positive
    extra = x.scale * (x.q[:, :, :m].to(incoming.dtype) * factors.unsqueeze(-1)) @ incoming
    o = torch.cat((o[:, :, :m] + extra.to(o.dtype), o[:, :, m:]), dim=2)
    rows = incoming.shape[0]
    first = finals[:rows] + factors[..., -1:].unsqueeze(-1) * incoming
    return o, torch.cat((first, finals[rows:]))


def _sequence_finals(x, lay: Layout, finals, initial_state) -> torch.Tensor:
    """(S, H, Dk, Dv): the final states of the sequences that end in this slice, zeros for the others; the first
    rank also gives the empty sequences theirs (the initial state). Summed over the ranks, every sequence's."""
    count = len(lay.offsets) - 1
    rows = [(p.seq, finals[i]) for i, p in enumerate(lay.pieces) if p.ends_here]
    if lay.rank == 0 and initial_state is not None:
        rows += [(i, initial_state[i]) for i in lay.empty_sequences]
    out = finals.new_zeros(count, x.heads, x.dk, x.dv)
    if not rows:
        return out
    index = torch.tensor([i for i, _ in rows], dtype=torch.int64, device=finals.device)
    return out.index_copy(0, index, torch.stack([s for _, s in rows]))
