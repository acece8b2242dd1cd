"""The epoch planner: which conversations share a packed row, and which rows form one optimizer step.

:func:`plan_epoch` is a pure numpy function of ``(lengths, max_tokens, num_ranks, seed, epoch)``: every conversation
exactly once per epoch, nothing dropped. How it packs, and why, is in ``docs/design.md`` ("Packing").
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right, insort
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from heapq import heappop, heappush
from typing import Any

import numpy as np

# Planner tuning, chosen with benchmarks/bench_packing.py. Changing it changes the plans, so _PLAN_VERSION must
# change too: it is part of the loader's resume fingerprint.
_PLAN_VERSION = 2
_LOOKAHEAD_CONVERSATIONS = 64  # a step may fill its last gaps from at most this many conversations after it
_MAX_SWAPS_PER_BIN = 1  # a bin's last gap may be closed by this many one-for-one swaps with the look-ahead

_SHIFT = 1 << 32  # sorted lists hold two ints in one: room or length * _SHIFT + bin id or stream position


@dataclass(frozen=True)
class EpochPlan:
    """The bins of one epoch, stored flat; behaves like ``list[list[np.ndarray]]`` (steps x ranks x indices).

    Attributes:
        conversation_indices: int64 dataset indices of all bins, concatenated in step-major, rank-minor order.
        bin_offsets: int64 array of ``num_steps * num_ranks + 1`` offsets into ``conversation_indices``.
        num_ranks: bins per step (virtual ranks: ranks x gradient-accumulation steps).
    """

    conversation_indices: np.ndarray
    bin_offsets: np.ndarray
    num_ranks: int

    @property
    def num_steps(self) -> int:
        """Number of optimizer steps in the epoch."""
        return (len(self.bin_offsets) - 1) // self.num_ranks

    @property
    def step_offsets(self) -> np.ndarray:
        """``num_steps + 1`` offsets into ``conversation_indices``: where each step's conversations start."""
        return self.bin_offsets[:: self.num_ranks]

    @property
    def num_bins(self) -> int:
        """Number of bins (rows) in the epoch, empty ones of the last step included."""
        return len(self.bin_offsets) - 1

    def bin(self, step: int, rank: int) -> np.ndarray:
        """The dataset indices in one bin (a view into the plan)."""
        if not 0 <= rank < self.num_ranks:
            raise IndexError(f"rank {rank} out of range for {self.num_ranks} ranks")
        if step < 0:
            step += self.num_steps
        if not 0 <= step < self.num_steps:
            raise IndexError(f"step {step} out of range for {self.num_steps} steps")
        b = step * self.num_ranks + rank
        return self.conversation_indices[self.bin_offsets[b] : self.bin_offsets[b + 1]]

    def __len__(self) -> int:
        return self.num_steps

    def __getitem__(self, step: int) -> list[np.ndarray]:
        return [self.bin(step, rank) for rank in range(self.num_ranks)]

    def __iter__(self) -> Iterator[list[np.ndarray]]:
        for step in range(self.num_steps):
            yield self[step]


def _check_lengths(lengths: Any, max_tokens: int) -> np.ndarray:
    lengths = np.asarray(lengths)
    if lengths.ndim != 1:
        raise ValueError(f"lengths must be a 1-D array of token counts, got shape {lengths.shape}")
    if lengths.size and not np.issubdtype(lengths.dtype, np.integer):
        if not np.all(np.mod(lengths, 1) == 0):
            raise ValueError("lengths must be whole token counts")
    lengths = lengths.astype(np.int64)
    too_long = np.flatnonzero(lengths > max_tokens)
    if too_long.size:
        i = int(too_long[0])
        raise ValueError(
            f"conversation {i} has {int(lengths[i])} tokens, more than max_tokens={max_tokens} "
            f"({too_long.size} conversation(s) too long in all); prepare must truncate to max_context <= max_tokens"
        )
    too_short = np.flatnonzero(lengths < 1)
    if too_short.size:
        i = int(too_short[0])
        raise ValueError(
            f"conversation {i} has {int(lengths[i])} tokens; every conversation needs at least 1 "
            f"({too_short.size} such conversation(s) in all)"
        )
    return lengths


def check_integer_arguments(owner: str, arguments: Iterable[tuple[str, Any, int]]) -> None:
    """Raises ValueError (a caller's bug) unless every ``(name, value, lowest)`` is an integer ``>= lowest``."""
    for name, value, low in arguments:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"{owner}{name} must be an integer >= {low}, got {value!r}")


def stream_order(num_conversations: int, seed: int, epoch: int) -> np.ndarray:
    """The epoch's shuffled stream: position -> dataset index (what the plan's steps are drawn from, in order)."""
    return np.random.default_rng([int(seed), int(epoch)]).permutation(num_conversations)


def _place_balanced(lengths: list[int], num_bins: int, capacity: int) -> tuple[list[int], list[int]]:
    """Places items, in the given order, each into the bin of lowest attention cost that has room.

    Given longest first, this is LPT scheduling on the attention cost (sum of squared lengths): the long,
    attention-heavy conversations are spread over the bins, the short ones fill them up.

    Returns:
        The bin of every item (-1: no bin had room) and the room left in every bin.
    """
    heap = [(0, b) for b in range(num_bins)]  # (attention cost, bin), a valid heap as it is
    room = [capacity] * num_bins
    bin_of_item = [-1] * len(lengths)
    min_length = min(lengths)
    for i, length in enumerate(lengths):
        full_for_this = []
        while heap:
            cost, b = heappop(heap)
            if room[b] >= length:
                room[b] -= length
                bin_of_item[i] = b
                if room[b] >= min_length:  # else no item of this step can go there any more
                    heappush(heap, (cost + length * length, b))
                break
            full_for_this.append((cost, b))
        for entry in full_for_this:
            heappush(heap, entry)
    return bin_of_item, room


def _place_tightly(lengths: list[int], num_bins: int, capacity: int) -> tuple[list[int], list[int]]:
    """Best-fit: each item, in the given order, into the bin it fills most tightly. Same returns as above."""
    mask = _SHIFT - 1
    open_bins = [capacity * _SHIFT + b for b in range(num_bins)]  # room * _SHIFT + bin, sorted
    room = [capacity] * num_bins
    bin_of_item = [-1] * len(lengths)
    for i, length in enumerate(lengths):
        j = bisect_left(open_bins, length * _SHIFT)
        if j < len(open_bins):
            b = open_bins.pop(j) & mask
            room[b] -= length
            bin_of_item[i] = b
            insort(open_bins, room[b] * _SHIFT + b)
    return bin_of_item, room


def _top_up(
    bins: list[list[int]],
    room: list[int],
    lookahead: list[int],
    stream_lengths: list[int],
    keep: set[int],
    taken: bytearray,
) -> list[int]:
    """Fills the bins' gaps with conversations from just after the step; returns the positions it took out again.

    ``lookahead`` holds ``length * _SHIFT + position`` keys, sorted; what is taken is removed from it. A gap takes
    an exact fit if there is one, else the longest conversation that leaves room for the shortest one left (so
    the gap can still be closed), else the longest that fits. A gap too small for any of them is closed, where
    possible, by a swap: a conversation of the bin (not one in ``keep``) makes way for a look-ahead one longer by
    up to the gap; the one that made way goes first into the next step. Taken positions are marked in ``taken``.
    """
    mask = _SHIFT - 1
    swapped_out = []
    for b in sorted(range(len(room)), key=lambda b: -room[b]):
        gap, members = room[b], bins[b]
        while lookahead and gap >= lookahead[0] >> 32:
            j = bisect_right(lookahead, gap * _SHIFT + mask) - 1  # longest that fits
            if lookahead[j] >> 32 != gap:
                shortest = lookahead[0] >> 32
                k = bisect_right(lookahead, (gap - shortest) * _SHIFT + mask) - 1  # longest leaving room for it
                if k >= 0:
                    j = k
            key = lookahead.pop(j)
            gap -= key >> 32
            members.append(key & mask)
            taken[key & mask] = 1
        for _ in range(_MAX_SWAPS_PER_BIN):
            if not (gap and lookahead):
                break
            best_gain, best = 0, None
            for i, p in enumerate(members):
                if p in keep:
                    continue
                length = stream_lengths[p]
                j = bisect_right(lookahead, (length + gap) * _SHIFT + mask) - 1
                if j >= 0 and (lookahead[j] >> 32) - length > best_gain:
                    best_gain, best = (lookahead[j] >> 32) - length, (i, j)
                    if best_gain == gap:
                        break
            if best is None:
                break
            i, j = best
            swapped_out.append(members[i])
            keep.add(members[i])  # what made way is not considered again
            members[i] = lookahead.pop(j) & mask
            keep.add(members[i])
            taken[members[i]] = 1
            gap -= best_gain
        room[b] = gap
    return swapped_out


def _pack_stream(stream_lengths: list[int], max_tokens: int, num_ranks: int) -> tuple[list[int], list[int]]:
    """Cuts the shuffled stream into steps of ``num_ranks`` bins (see :func:`plan_epoch`).

    Returns:
        The stream positions of all bins, bin-major, and the size of every bin.
    """
    n = len(stream_lengths)
    step_capacity = num_ranks * max_tokens
    taken = bytearray(n)  # stream positions planned ahead of their turn (by a top-up)
    lookahead: list[int] = []  # length * _SHIFT + position of the free positions in [position, frontier), sorted
    position = frontier = 0  # next stream position to look at; end of the look-ahead
    tokens_left = sum(stream_lengths)
    carried: list[int] = []  # positions that made way or found no room in the previous step: they go first
    out_positions: list[int] = []
    bin_sizes: list[int] = []
    while carried or position < n:
        # The step's own stretch of the stream: what was carried over, then the next conversations while they fit.
        chunk, num_carried = carried, len(carried)
        chunk_tokens = sum(stream_lengths[p] for p in chunk)
        while position < n:
            if taken[position]:
                position += 1
                continue
            length = stream_lengths[position]
            if chunk_tokens + length > step_capacity:
                break
            if position < frontier:
                del lookahead[bisect_left(lookahead, length * _SHIFT + position)]
            chunk.append(position)
            chunk_tokens += length
            position += 1
        frontier = max(frontier, position)
        while len(lookahead) < _LOOKAHEAD_CONVERSATIONS and frontier < n:
            if not taken[frontier]:
                insort(lookahead, stream_lengths[frontier] * _SHIFT + frontier)
            frontier += 1

        is_last = chunk_tokens == tokens_left  # the rest of the epoch fits in this step's slots
        if num_ranks == 1:  # the chunk fits the one bin as it is
            order, bin_of_item, room = chunk, [0] * len(chunk), [max_tokens - chunk_tokens]
        else:  # carried conversations first (so they are not carried again), then longest first
            order = sorted(chunk[:num_carried], key=lambda p: -stream_lengths[p])
            order += sorted(chunk[num_carried:], key=lambda p: -stream_lengths[p])
            order_lengths = [stream_lengths[p] for p in order]
            bin_of_item = None
        if is_last and bin_of_item is None:
            # The epoch's left-overs: packed tightly when that closes the epoch here (its empty bins go last).
            bin_of_item, room = _place_tightly(order_lengths, num_ranks, max_tokens)
            if -1 in bin_of_item:
                bin_of_item = None
        if bin_of_item is None:
            bin_of_item, room = _place_balanced(order_lengths, num_ranks, max_tokens)
        bins: list[list[int]] = [[] for _ in range(num_ranks)]
        carried = []
        for p, b in zip(order, bin_of_item):
            (bins[b] if b >= 0 else carried).append(p)
        if lookahead and not is_last:
            carried += _top_up(bins, room, lookahead, stream_lengths, set(chunk[:num_carried]), taken)
        for b in bins:
            b.sort()  # within a bin, conversations keep their stream order
            out_positions.extend(b)
            bin_sizes.append(len(b))
            tokens_left -= sum(stream_lengths[p] for p in b)
    assert tokens_left == 0 and len(out_positions) == n
    return out_positions, bin_sizes


def plan_epoch(lengths: Any, max_tokens: int, num_ranks: int, seed: int, epoch: int) -> EpochPlan:
    """Plans one epoch: which conversations go into which bin of which step.

    Each step is drawn from the epoch's shuffled stream (:func:`stream_order`) in order, so a step is a random
    sample of the data (classes and lengths mixed as in the whole set): it takes the next conversations while
    they fit in ``num_ranks`` bins of ``max_tokens`` tokens, spreads them over its bins longest first onto the
    bin of lowest attention cost (so ranks wait little for each other), and fills the gaps that remain with
    conversations from at most ``_LOOKAHEAD_CONVERSATIONS`` stream positions ahead. A conversation that found no
    room is placed first in the next step. So every conversation is trained within about a step of its stream
    position, and no step is sorted or selected by length. See ``docs/design.md`` and
    ``benchmarks/bench_packing.py`` for the measured fill and mixing.

    Args:
        lengths: token length of every conversation (1-D, integer, each in ``[1, max_tokens]``).
        max_tokens: capacity of a bin (one packed row) in tokens.
        num_ranks: bins per step; with gradient accumulation pass ``ranks * grad_accum`` (the virtual-rank rule of
            ``docs/design.md``, "Packing").
        seed: non-negative run seed.
        epoch: non-negative epoch number.

    Returns:
        An :class:`EpochPlan`: steps x ``num_ranks`` bins of dataset indices; every conversation appears exactly
        once; every bin holds at most ``max_tokens`` tokens; only the last step may hold empty bins (then last).
        Deterministic for ``(seed, epoch)``; empty input gives a plan with zero steps.

    Raises:
        ValueError: on a conversation longer than ``max_tokens`` (naming its index and length), a
            conversation with no tokens, or bad arguments.
    """
    check_integer_arguments("", (("max_tokens", max_tokens, 1), ("num_ranks", num_ranks, 1), ("seed", seed, 0),
                                 ("epoch", epoch, 0)))
    max_tokens, num_ranks = int(max_tokens), int(num_ranks)
    lengths = _check_lengths(lengths, max_tokens)
    n = len(lengths)
    if n == 0:
        return EpochPlan(np.zeros(0, np.int64), np.zeros(1, np.int64), num_ranks)

    stream = stream_order(n, seed, epoch)
    out_positions, bin_sizes = _pack_stream(lengths[stream].tolist(), max_tokens, num_ranks)

    # Which rank gets which bin of a step is random, so no rank is systematically the busiest; empty bins (only
    # ever in the last step) stay at its end.
    sizes = np.asarray(bin_sizes, np.int64)
    num_steps = len(sizes) // num_ranks
    rng = np.random.default_rng([int(seed), int(epoch), 1])  # the stream has its own generator
    bin_order = rng.permuted(np.tile(np.arange(num_ranks), (num_steps, 1)), axis=1)
    last = np.argsort(sizes[-num_ranks:][bin_order[-1]] == 0, kind="stable")
    bin_order[-1] = bin_order[-1][last]
    bin_order = (bin_order + np.arange(num_steps)[:, None] * num_ranks).reshape(-1)
    offsets = np.zeros(len(sizes) + 1, np.int64)
    np.cumsum(sizes, out=offsets[1:])
    bin_offsets = np.zeros(len(sizes) + 1, np.int64)
    np.cumsum(sizes[bin_order], out=bin_offsets[1:])
    gather = np.repeat(offsets[bin_order] - bin_offsets[:-1], sizes[bin_order]) + np.arange(n)
    conversation_indices = stream[np.asarray(out_positions, np.int64)[gather]]
    conversation_indices.setflags(write=False)  # plans are cached and shared between threads
    bin_offsets.setflags(write=False)
    return EpochPlan(conversation_indices, bin_offsets, num_ranks)


@dataclass(frozen=True)
class PlanStats:
    """Quality figures of one epoch plan.

    The efficiency and balance figures cover all steps but the last (the last step holds the left-overs and
    may have empty bins); with a single step they cover that step.

    Attributes:
        num_steps: optimizer steps in the epoch.
        num_conversations: conversations planned (each exactly once).
        num_tokens: real tokens planned.
        slot_efficiency: real tokens / (steps x ranks x max_tokens) over all steps but the last.
        last_step_efficiency: the same for the last step alone.
        token_balance_mean: mean over steps of max/mean tokens per rank.
        token_balance_worst: worst step's max/mean tokens per rank.
        attention_balance_mean: mean over steps of max/mean attention cost (sum of squared lengths) per rank.
        attention_balance_worst: worst step's max/mean attention cost per rank.
    """

    num_steps: int
    num_conversations: int
    num_tokens: int
    slot_efficiency: float
    last_step_efficiency: float
    token_balance_mean: float
    token_balance_worst: float
    attention_balance_mean: float
    attention_balance_worst: float


def _bin_sums(values: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Sums ``values`` over each ``[offsets[i], offsets[i+1])``; empty ranges give 0."""
    cumulative = np.zeros(len(values) + 1, dtype=np.float64 if values.dtype.kind == "f" else np.int64)
    np.cumsum(values, out=cumulative[1:])
    return cumulative[offsets[1:]] - cumulative[offsets[:-1]]


def plan_stats(plan: EpochPlan, lengths: Any, max_tokens: int, grad_accum: int = 1) -> PlanStats:
    """Measures a plan: slot efficiency and per-step rank balance of tokens and attention cost.

    Args:
        plan: the plan from :func:`plan_epoch`.
        lengths: the lengths the plan was made from.
        max_tokens: the bin capacity the plan was made for.
        grad_accum: if the plan has ``ranks * grad_accum`` virtual ranks, pass ``grad_accum`` to measure the
            balance between real ranks (each summing its ``grad_accum`` consecutive bins).

    Returns:
        A :class:`PlanStats`.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if plan.num_ranks % grad_accum:
        raise ValueError(f"plan has {plan.num_ranks} bins per step, not a multiple of grad_accum={grad_accum}")
    planned = lengths[plan.conversation_indices]
    bin_tokens = _bin_sums(planned, plan.bin_offsets).reshape(plan.num_steps, plan.num_ranks)
    bin_costs = _bin_sums(planned.astype(np.float64) ** 2, plan.bin_offsets).reshape(plan.num_steps, plan.num_ranks)
    slots_per_step = plan.num_ranks * max_tokens
    if plan.num_steps == 0:
        return PlanStats(0, 0, 0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0)
    body = slice(0, max(plan.num_steps - 1, 1))
    rank_tokens = bin_tokens.reshape(plan.num_steps, -1, grad_accum).sum(-1)[body]
    rank_costs = bin_costs.reshape(plan.num_steps, -1, grad_accum).sum(-1)[body]
    token_ratio = rank_tokens.max(1) / np.maximum(rank_tokens.mean(1), 1e-12)
    cost_ratio = rank_costs.max(1) / np.maximum(rank_costs.mean(1), 1e-12)
    return PlanStats(
        num_steps=plan.num_steps,
        num_conversations=len(plan.conversation_indices),
        num_tokens=int(planned.sum()),
        slot_efficiency=float(bin_tokens[body].sum() / (rank_tokens.shape[0] * slots_per_step)),
        last_step_efficiency=float(bin_tokens[-1].sum() / slots_per_step),
        token_balance_mean=float(token_ratio.mean()),
        token_balance_worst=float(token_ratio.max()),
        attention_balance_mean=float(cost_ratio.mean()),
        attention_balance_worst=float(cost_ratio.max()),
    )


__all__ = [
    "EpochPlan",
    "PlanStats",
    "check_integer_arguments",
    "plan_epoch",
    "plan_stats",
    "stream_order",
]
