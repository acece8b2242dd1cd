"""The epoch planner: which conversations share a packed row, and which rows form one optimizer step.

:func:`plan_epoch` is a pure numpy function of ``(lengths, max_tokens, num_ranks, seed, epoch)``: every conversation
exactly once per epoch, nothing dropped. How it packs, and why, is in ``docs/design.md`` ("Packing").
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from crlft.errors import UserError

# Planner tuning, chosen with benchmarks/bench_packing.py. Changing any of them changes the plans, so
# _PLAN_VERSION must change too: it is part of the loader's resume fingerprint.
_PLAN_VERSION = 1
_WINDOW_STEPS = 16  # steps worth of tokens per look-ahead window: bounds how far a conversation can move
_MIN_WINDOW_CONVERSATIONS = 2048  # smaller windows have fewer short conversations to close the gaps with
_FULL_BIN_FRACTION = 0.998  # a bin at least this full is emitted; a less full one may move to the next window
_SPREAD_FRACTION = 0.8  # share of a window's tokens (longest first) dealt out evenly before best-fit
_SPREAD_TOLERANCE = 0.001  # spreading may cost at most this fraction of a window's tokens in full bins
_MAX_CARRIES = 2  # a conversation moves to a later window at most this many times

_SHIFT = 1 << 32  # open bins are kept as remaining * _SHIFT + bin id in one sorted list of Python ints


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
        raise UserError(f"lengths must be a 1-D array of token counts, got shape {lengths.shape}")
    if lengths.size and not np.issubdtype(lengths.dtype, np.integer):
        if not np.all(np.mod(lengths, 1) == 0):
            raise UserError("lengths must be whole token counts")
    lengths = lengths.astype(np.int64)
    too_long = np.flatnonzero(lengths > max_tokens)
    if too_long.size:
        i = int(too_long[0])
        raise UserError(
            f"conversation {i} has {int(lengths[i])} tokens, more than max_tokens={max_tokens} "
            f"({too_long.size} conversation(s) too long in all); prepare must truncate to max_context <= max_tokens"
        )
    too_short = np.flatnonzero(lengths < 1)
    if too_short.size:
        i = int(too_short[0])
        raise UserError(
            f"conversation {i} has {int(lengths[i])} tokens; every conversation needs at least 1 "
            f"({too_short.size} such conversation(s) in all)"
        )
    return lengths


def _pack_window(
    lengths: np.ndarray, max_tokens: int, place_first: np.ndarray, spread_fraction: float
) -> tuple[np.ndarray, int]:
    """Packs one window's conversations into bins of ``max_tokens``.

    First the longest conversations, up to ``spread_fraction`` of the tokens that surely fill whole bins, are
    dealt out over those bins in snake order (0, 1, ..., B-1, B-1, ..., 0, ...), so every bin gets a similar
    share of the long, attention-heavy ones. Then the rest go best-fit-decreasing: longest first, each into the
    bin it fills most tightly, opening a new bin only when none has room. With ``spread_fraction=0`` this is plain
    best-fit-decreasing. Items flagged in ``place_first`` (moved on from the previous window) lead the order, so
    they land in bins that later items fill up rather than in the left-over bins at the end.

    Returns:
        The bin id of every item (in the given order) and the number of bins. Ties keep the given order, so the
        result is deterministic.
    """
    order = np.lexsort((-lengths, ~place_first))
    sorted_lengths = lengths[order]
    bin_of_sorted = np.empty(len(lengths), dtype=np.int64)
    num_bins, num_spread = 0, 0
    bin_tokens = np.zeros(0, dtype=np.int64)
    num_full_bins = int(sorted_lengths.sum() // max_tokens)
    if spread_fraction > 0 and num_full_bins > 1:
        budget = spread_fraction * num_full_bins * max_tokens
        count = int(np.searchsorted(np.cumsum(sorted_lengths), budget, "right"))
        rounds, slots = np.divmod(np.arange(count), num_full_bins)
        snake = np.where(rounds % 2 == 0, slots, num_full_bins - 1 - slots)
        dealt = np.bincount(snake, weights=sorted_lengths[:count], minlength=num_full_bins).astype(np.int64)
        if dealt.max(initial=0) <= max_tokens:  # else (a few very long items) plain best-fit it is
            num_bins, num_spread, bin_tokens = num_full_bins, count, dealt
            bin_of_sorted[:count] = snake

    # A bin with less room than the shortest item can never take another one: it leaves the open list.
    min_length = int(lengths.min())
    mask = _SHIFT - 1
    open_bins = sorted(
        int(room) * _SHIFT + b for b, room in enumerate((max_tokens - bin_tokens).tolist()) if room >= min_length
    )
    rest = sorted_lengths[num_spread:].tolist()
    placed = [0] * len(rest)
    for j, length in enumerate(rest):
        i = bisect_left(open_bins, length * _SHIFT)
        if i < len(open_bins):
            key = open_bins.pop(i)
            b = key & mask
            room = (key >> 32) - length
        else:
            b = num_bins
            num_bins += 1
            room = max_tokens - length
        placed[j] = b
        if room >= min_length:
            insort(open_bins, room * _SHIFT + b)
    bin_of_sorted[num_spread:] = placed
    bin_of_item = np.empty(len(lengths), dtype=np.int64)
    bin_of_item[order] = bin_of_sorted
    return bin_of_item, num_bins


def _tokens_in_full_bins(bin_of_item: np.ndarray, lengths: np.ndarray, max_tokens: int) -> int:
    bin_tokens = np.bincount(bin_of_item, weights=lengths)
    return int(bin_tokens[bin_tokens >= _FULL_BIN_FRACTION * max_tokens].sum())


def _group_into_steps(bin_costs: np.ndarray, num_ranks: int, rng: np.random.Generator) -> np.ndarray:
    """Orders bins so that consecutive groups of ``num_ranks`` have similar cost; shuffles the groups.

    Returns a permutation of ``range(len(bin_costs))`` whose length must be a multiple of ``num_ranks``.
    """
    assert len(bin_costs) % num_ranks == 0
    by_cost = np.argsort(bin_costs, kind="stable").reshape(-1, num_ranks)
    by_cost = by_cost[rng.permutation(by_cost.shape[0])]
    # Which rank gets the heaviest bin of a step should not be a fixed rank.
    return rng.permuted(by_cost, axis=1).reshape(-1)


def _pack(lengths: np.ndarray, place_first: np.ndarray, max_tokens: int, num_ranks: int) -> tuple[np.ndarray, int]:
    """Packs a window plainly or, with several ranks, spreading long conversations if that fills about as well."""
    bin_of_item, num_bins = _pack_window(lengths, max_tokens, place_first, 0.0)
    if num_ranks > 1:
        # Spreading long conversations evens the attention cost of bins but can fill them worse when bins hold
        # only a few conversations each: keep it unless it leaves more tokens in under-full bins.
        spread_bins, spread_num_bins = _pack_window(lengths, max_tokens, place_first, _SPREAD_FRACTION)
        spread_full = _tokens_in_full_bins(spread_bins, lengths, max_tokens)
        plain_full = _tokens_in_full_bins(bin_of_item, lengths, max_tokens)
        if spread_full >= plain_full - _SPREAD_TOLERANCE * lengths.sum():
            return spread_bins, spread_num_bins
    return bin_of_item, num_bins


def _choose_full_steps(
    bin_of_item: np.ndarray,
    num_bins: int,
    lengths: np.ndarray,
    times_carried: np.ndarray,
    max_tokens: int,
    num_ranks: int,
) -> np.ndarray:
    """Which bins of a (not last) window to emit: a multiple of ``num_ranks``, full ones and over-carried ones."""
    bin_tokens = np.bincount(bin_of_item, weights=lengths, minlength=num_bins)
    bin_times = np.zeros(num_bins, np.int64)
    np.maximum.at(bin_times, bin_of_item, times_carried)
    must_emit = bin_times >= _MAX_CARRIES
    is_full = bin_tokens >= _FULL_BIN_FRACTION * max_tokens
    # Priority: bins holding the most-carried conversations first, then the fullest.
    priority = np.lexsort((-bin_tokens, -bin_times))
    num_wanted = int(np.count_nonzero(must_emit | is_full)) // num_ranks * num_ranks
    num_must = int(np.count_nonzero(must_emit))
    if num_wanted < num_must:
        num_wanted = min(-(-num_must // num_ranks) * num_ranks, num_bins // num_ranks * num_ranks)
    return priority[:num_wanted]


def plan_epoch(lengths: Any, max_tokens: int, num_ranks: int, seed: int, epoch: int) -> EpochPlan:
    """Plans one epoch: which conversations go into which bin of which step.

    See the module docstring for the algorithm. The result is deterministic for ``(seed, epoch)``; another epoch
    gives another order and other bins.

    Args:
        lengths: token length of every conversation (1-D, integer, each in ``[1, max_tokens]``).
        max_tokens: capacity of a bin (one packed row) in tokens.
        num_ranks: bins per step; with gradient accumulation pass ``ranks * grad_accum`` (see module docstring).
        seed: non-negative run seed.
        epoch: non-negative epoch number.

    Returns:
        An :class:`EpochPlan`: steps x ``num_ranks`` bins of dataset indices; every conversation appears exactly
        once; every bin holds at most ``max_tokens`` tokens; only the last step may be less full or hold empty
        bins. Empty input gives a plan with zero steps.

    Raises:
        UserError (a ValueError): on a conversation longer than ``max_tokens`` (naming its index and length), a
            conversation with no tokens, or bad arguments.
    """
    for name, value, low in (
        ("max_tokens", max_tokens, 1),
        ("num_ranks", num_ranks, 1),
        ("seed", seed, 0),
        ("epoch", epoch, 0),
    ):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise UserError(f"{name} must be an integer >= {low}, got {value!r}")
    max_tokens, num_ranks = int(max_tokens), int(num_ranks)
    lengths = _check_lengths(lengths, max_tokens)
    n = len(lengths)
    if n == 0:
        return EpochPlan(np.zeros(0, np.int64), np.zeros(1, np.int64), num_ranks)

    rng = np.random.default_rng([int(seed), int(epoch)])
    stream = rng.permutation(n)  # stream position -> dataset index
    stream_lengths = lengths[stream]
    window_tokens = _WINDOW_STEPS * num_ranks * max_tokens
    window_size = max(_MIN_WINDOW_CONVERSATIONS, int(np.ceil(window_tokens / stream_lengths.mean())))
    windows = []
    start = 0
    while start < n:
        stop = start + window_size
        if n - stop < window_size // 2:  # a short remainder joins this window instead of packing badly alone
            stop = n
        windows.append((start, stop))
        start = stop

    # Every window passes its left-overs (mostly short conversations) on to the next one. So that the first
    # window is not the only one without such arrivals (it would hold longer conversations on average, a length
    # trend), it receives what the last window would pass on; the last window then packs what remains.
    carried = np.zeros(0, np.int64)  # stream positions moved on to the window about to be packed
    carried_times = np.zeros(0, np.int64)
    moved_to_front = np.zeros(0, np.int64)
    if len(windows) > 1:
        items = np.arange(*windows[-1])
        item_lengths = stream_lengths[items]
        bin_of_item, num_bins = _pack(item_lengths, np.zeros(len(items), bool), max_tokens, num_ranks)
        chosen = _choose_full_steps(
            bin_of_item, num_bins, item_lengths, np.zeros(len(items), np.int64), max_tokens, num_ranks
        )
        moved_to_front = items[~np.isin(bin_of_item, chosen)]
        carried, carried_times = moved_to_front, np.ones(len(moved_to_front), np.int64)

    out_items: list[np.ndarray] = []  # stream positions, bin-major
    out_bin_sizes: list[np.ndarray] = []
    for window, (start, stop) in enumerate(windows):
        is_last_window = window == len(windows) - 1
        own = np.arange(start, stop)
        if is_last_window and moved_to_front.size:
            own = own[~np.isin(own, moved_to_front)]
        items = np.concatenate([carried, own])
        times = np.concatenate([carried_times, np.zeros(len(own), np.int64)])
        item_lengths = stream_lengths[items]
        # Conversations already moved on once go in first, so they are not left over again.
        bin_of_item, num_bins = _pack(item_lengths, times > 0, max_tokens, num_ranks)
        bin_tokens = np.bincount(bin_of_item, weights=item_lengths, minlength=num_bins)
        bin_costs = np.bincount(bin_of_item, weights=item_lengths.astype(np.float64) ** 2, minlength=num_bins)
        if is_last_window:
            # The least-full bins make the last step, padded with empty bins up to num_ranks.
            num_last = num_bins - (num_bins - 1) // num_ranks * num_ranks
            by_fill = np.argsort(-bin_tokens, kind="stable")
            full, last = by_fill[: num_bins - num_last], by_fill[num_bins - num_last :]
            emitted = np.concatenate([full[_group_into_steps(bin_costs[full], num_ranks, rng)], last])
            num_empty = num_ranks - num_last
        else:
            chosen = _choose_full_steps(bin_of_item, num_bins, item_lengths, times, max_tokens, num_ranks)
            emitted = chosen[_group_into_steps(bin_costs[chosen], num_ranks, rng)]
            num_empty = 0

        slot_of_bin = np.full(num_bins, -1, np.int64)
        slot_of_bin[emitted] = np.arange(len(emitted))
        slot_of_item = slot_of_bin[bin_of_item]
        kept = slot_of_item >= 0
        # Within a bin, conversations keep their shuffled order.
        order = np.lexsort((items[kept], slot_of_item[kept]))
        out_items.append(items[kept][order])
        out_bin_sizes.append(np.bincount(slot_of_item[kept], minlength=len(emitted)))
        if num_empty:
            out_bin_sizes.append(np.zeros(num_empty, np.int64))
        carried, carried_times = items[~kept], times[~kept] + 1
    assert carried.size == 0

    bin_offsets = np.zeros(sum(len(s) for s in out_bin_sizes) + 1, np.int64)
    np.cumsum(np.concatenate(out_bin_sizes), out=bin_offsets[1:])
    conversation_indices = stream[np.concatenate(out_items)]
    assert len(conversation_indices) == n and (len(bin_offsets) - 1) % num_ranks == 0
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
        raise UserError(f"plan has {plan.num_ranks} bins per step, not a multiple of grad_accum={grad_accum}")
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
    "plan_epoch",
    "plan_stats",
]
