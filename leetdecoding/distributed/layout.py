"""Where the ranks' slices lie in the whole stream, and which sequences they cut: host arithmetic, no tensors.

Rank r holds the tokens [a_r, b_r) of the whole stream (the ranks in group order, a_0 = 0). With `cu_seqlens` the
stream holds packed sequences with global offsets o_0 = 0 <= o_1 <= ... <= o_S = T; without it every batch row is
one sequence [0, N). A rank's tokens split into *pieces*, one per sequence they touch. Only the first piece can
continue a sequence from an earlier rank; only the last (the *tail*) can continue into a later one.
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass


@dataclass(frozen=True)
class Piece:
    start: int  # local token positions [start, end) in the rank's slice
    end: int
    seq: int  # the global sequence the piece belongs to
    starts_here: bool  # the sequence's first token is the piece's: its state starts from the initial state
    ends_here: bool  # the sequence's last token is the piece's: its final state is the piece's


# An empty rank passes the chain through unchanged: its tail adds nothing and decays nothing.
PASS_THROUGH = Piece(0, 0, -1, False, False)


def rank_pieces(a: int, b: int, offsets: list[int]) -> list[Piece]:
    """The pieces of the tokens [a, b) of the stream, in order ([PASS_THROUGH] for an empty rank)."""
    if a == b:
        return [PASS_THROUGH]
    bounds = sorted({a, b} | {o for o in offsets if a < o < b})
    pieces = []
    for s, e in zip(bounds, bounds[1:]):
        seq = bisect_right(offsets, s) - 1  # the last sequence starting at or before s: empty ones are skipped
        pieces.append(Piece(s - a, e - a, seq, offsets[seq] == s, offsets[seq + 1] == e))
    return pieces


@dataclass
class Layout:
    rank: int
    lengths: list[int]  # every rank's token count, in group order
    offsets: list[int]  # global sequence offsets ([0, N] without cu_seqlens)
    pieces: list[Piece]  # this rank's
    # per rank: its tail piece starts its sequence, so the state it leaves owes nothing to earlier ranks
    cuts: list[bool]
    packed: bool  # cu_seqlens given: pieces are rows of a packed batch, else one piece of B rows

    @property
    def continues(self) -> bool:
        """This rank's first piece continues a sequence from an earlier rank."""
        first = self.pieces[0]
        return first.end > first.start and not first.starts_here

    @property
    def empty_sequences(self) -> list[int]:
        return [i for i, (a, b) in enumerate(zip(self.offsets, self.offsets[1:])) if a == b]


def layout(rank: int, lengths: list[int], offsets: list[int], packed: bool) -> Layout:
    starts = [sum(lengths[:r]) for r in range(len(lengths) + 1)]
    every = [rank_pieces(starts[r], starts[r + 1], offsets) for r in range(len(lengths))]
    return Layout(rank, lengths, offsets, every[rank], [p[-1].starts_here for p in every], packed)
