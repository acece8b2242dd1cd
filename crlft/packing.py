"""Padding-free packing: the epoch plan, packed-row collation and the resumable loader.

Three layers, each usable on its own:

1. :func:`plan_epoch` decides, from the token length of every conversation, which conversations go into which
   bin (one packed row of at most ``max_tokens`` tokens) and which bins form one optimizer step (exactly
   ``num_ranks`` bins). It is a pure numpy function of ``(lengths, max_tokens, num_ranks, seed, epoch)``.
2. :func:`pack_row` turns one bin into one padding-free row: ``input_ids``, ``position_ids`` restarting at 0 for
   every conversation, labels and loss weights shifted *within* each conversation, and ``cu_seqlens`` /
   ``max_seqlen`` for varlen attention kernels.
3. :class:`PackedLoader` plans every epoch, collates this rank's rows in a background thread, attaches the
   global loss normalisers of the step (computed from the plan, no communication) and can be checkpointed and
   resumed at any step.

How the plan is made (measured in ``benchmarks/bench_packing.py``)
    The conversations are shuffled with a generator seeded by ``(seed, epoch)`` and cut into windows of about
    ``_WINDOW_STEPS`` steps worth of tokens (at least ``_MIN_WINDOW_CONVERSATIONS`` conversations). Each window is
    packed with best-fit-decreasing: conversations longest first, each into the open bin it fills most tightly.
    With more than one rank the window is also packed a second way, which first deals the longest conversations
    (``_SPREAD_FRACTION`` of the tokens) over the bins in snake order and then best-fits the rest: every bin gets
    a similar share of long, attention-heavy conversations. That packing is kept unless it leaves more than
    ``_SPREAD_TOLERANCE`` of the window's tokens in under-full bins (it can, when bins hold only a few
    conversations each). Bins that end clearly under-full (usually the last one or two of the window, holding
    left-over short conversations) are not emitted: their conversations move on to the next window, where they
    are placed first. A conversation moves on at most ``_MAX_CARRIES`` times (in practice once), so nothing is
    delayed by more than a window or two. The first window receives what the last window would pass on, so it is
    not the only window without short arrivals (which made the first steps ~5% longer on average). The bins a
    window emits are sorted by attention cost (sum of squared conversation lengths) and cut into steps of
    ``num_ranks`` bins, so the bins of one step cost about the same and the slowest rank waits little; the
    window's steps are then shuffled. Because every window is a random slice of the epoch and its steps are
    shuffled, there is no length trend across the epoch (long conversations are not front-loaded), while the
    slot efficiency stays above 99.9% on realistic length mixes (OpenChat's multipack sampler: 86-99.8%). The
    last window packs everything that is left; its least-full bins form the last step, which has empty bins when
    fewer bins than ranks are left. Nothing is ever dropped.
    Planning 1M conversations takes 1-2 s on 2 busy cores (numpy and ``bisect``; numba would not earn its install).

Gradient accumulation
    Plan for ``num_ranks * grad_accum`` *virtual* ranks: one planned step is one optimizer step, and real rank
    ``r`` takes bins ``[r * grad_accum, (r + 1) * grad_accum)`` of each step as its micro-batches. So
    1 rank x 2 accumulation steps and 2 ranks x 1 accumulation step see exactly the same bins, and the global
    loss normaliser of a step (its sum of loss weights over all ranks and micro-batches) is known up front.

Packed rows and attention
    A packed row holds several conversations back to back. The padding added to reach a multiple of
    ``pad_to_multiple_of`` is its *own final segment*: its position ids restart at 0 and ``cu_seqlens`` has a last
    entry for it, so no kernel ever attends padding into a real conversation (nor the reverse); its labels are
    -100 and its weights 0. An empty bin (a rank with nothing to do in the last step) becomes a short
    all-padding row with zero weight so that rank still runs forward and backward and never hangs a collective.

    transformers 5 attends packed rows correctly without any mask: when ``attention_mask`` is None, no cache is
    passed (``use_cache=False``) and ``position_ids`` are given, ``masking_utils.find_packed_sequence_indices``
    starts a new segment wherever the position id does not increase by exactly 1, and the sdpa / eager masks
    become block-diagonal causal. flash_attention_2 infers ``cu_seqlens`` from the positions that equal 0 (a
    device sync in every layer); :func:`flash_attention_kwargs` gives the precomputed ``cu_seq_lens_q`` /
    ``cu_seq_lens_k`` / ``max_length_q`` / ``max_length_k`` to pass to the model's forward instead. sdpa and eager
    ignore those keyword arguments, so passing them is harmless on CPU (``tests/test_packed_attention.py``).

Loss
    ``loss = sum(loss_weights * CE(logits[t], labels[t]))`` over the row, divided by the step's
    ``global_weight_sum``: ``loss_weights[t]`` of a row is the dataset's ``loss_weights[t + 1]`` of the same
    conversation (the weight of predicting token ``t + 1``), and 0 at the last token of every conversation and
    at padding.
"""

from __future__ import annotations

import queue
import threading
import zlib
from bisect import bisect_left, insort
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

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

IGNORE_INDEX = -100  # labels value ignored by torch's cross-entropy

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


def pack_row(
    examples: Sequence[tuple[Any, Any]],
    pad_to_multiple_of: int | None = 64,
    pad_token_id: int = 0,
    conditions: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Collates conversations into one padding-free packed row.

    Args:
        examples: ``(input_ids, loss_weights)`` per conversation, each 1-D of the same length >= 1, with the
            dataset's unshifted weights (``loss_weights[i]`` weighs predicting ``input_ids[i]``).
        pad_to_multiple_of: pad the row to a multiple of this many tokens (padding is its own final segment
            with zero weight), or None for no padding. An empty ``examples`` gives a row of
            ``pad_to_multiple_of`` (or 1) padding tokens.
        pad_token_id: token id written into padding positions (never attended by real tokens, never trained).
        conditions: optional condition name per conversation, returned as ``segment_conditions``.

    Returns:
        A dict with ``input_ids``, ``position_ids``, ``labels`` (long ``[1, T]``), ``loss_weights`` (float32
        ``[1, T]``, shifted), ``cu_seqlens`` (int32 ``[num_segments + 1]``, the padding segment last if any),
        ``max_seqlen`` (int, over all segments), ``num_tokens`` (real tokens), ``num_conversations``,
        ``segment_conditions`` (list[str], one per real conversation; empty strings if not given).

    Raises:
        UserError (a ValueError): if a conversation is empty or its ids and weights differ in length.
    """
    if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
        raise UserError(f"pad_to_multiple_of must be >= 1 or None, got {pad_to_multiple_of}")
    if conditions is not None and len(conditions) != len(examples):
        raise UserError(f"got {len(conditions)} conditions for {len(examples)} conversations")
    ids_parts, weight_parts = [], []
    for k, (ids, weights) in enumerate(examples):
        ids, weights = np.asarray(ids).reshape(-1), np.asarray(weights).reshape(-1)
        if len(ids) == 0 or len(ids) != len(weights):
            raise UserError(
                f"conversation {k} of the row: {len(ids)} input_ids and {len(weights)} loss_weights "
                "(need the same number, at least 1)"
            )
        ids_parts.append(ids)
        weight_parts.append(weights)
    seq_lengths = np.array([len(x) for x in ids_parts], dtype=np.int64)
    num_tokens = int(seq_lengths.sum())
    multiple = pad_to_multiple_of or 1
    num_pad = (-num_tokens) % multiple if num_tokens else multiple
    total = num_tokens + num_pad

    input_ids = np.full(total, pad_token_id, dtype=np.int64)
    shifted_weights = np.zeros(total, dtype=np.float32)
    labels = np.full(total, IGNORE_INDEX, dtype=np.int64)
    position_ids = np.empty(total, dtype=np.int64)
    starts = np.zeros(len(seq_lengths), np.int64)
    if num_tokens:
        np.cumsum(seq_lengths[:-1], out=starts[1:])
        input_ids[:num_tokens] = np.concatenate(ids_parts)
        weights = np.concatenate(weight_parts).astype(np.float32)
        # Target of position t is token t+1 of the same conversation; a conversation's last token has none.
        labels[: num_tokens - 1] = input_ids[1:num_tokens]
        shifted_weights[: num_tokens - 1] = weights[1:]
        last = starts + seq_lengths - 1
        shifted_weights[last] = 0.0
        labels[:num_tokens][shifted_weights[:num_tokens] == 0] = IGNORE_INDEX
        position_ids[:num_tokens] = np.arange(num_tokens) - np.repeat(starts, seq_lengths)
    position_ids[num_tokens:] = np.arange(num_pad)

    segment_lengths = np.concatenate([seq_lengths, [num_pad] if num_pad else []]).astype(np.int64)
    cu_seqlens = np.zeros(len(segment_lengths) + 1, dtype=np.int32)
    np.cumsum(segment_lengths, out=cu_seqlens[1:])
    return {
        "input_ids": torch.from_numpy(input_ids).unsqueeze(0),
        "position_ids": torch.from_numpy(position_ids).unsqueeze(0),
        "labels": torch.from_numpy(labels).unsqueeze(0),
        "loss_weights": torch.from_numpy(shifted_weights).unsqueeze(0),
        "cu_seqlens": torch.from_numpy(cu_seqlens),
        "max_seqlen": int(segment_lengths.max()),
        "num_tokens": num_tokens,
        "num_conversations": len(seq_lengths),
        "segment_conditions": list(conditions) if conditions is not None else [""] * len(seq_lengths),
    }


def flash_attention_kwargs(row: dict[str, Any], device: torch.device | str | None = None) -> dict[str, Any]:
    """Keyword arguments that let transformers' flash_attention_2 use the row's precomputed varlen boundaries.

    Passing them to the model's forward spares the per-layer inference of ``cu_seqlens`` from ``position_ids``;
    sdpa and eager ignore them.

    Args:
        row: a row from :func:`pack_row`.
        device: where to put ``cu_seqlens`` (the model's device).

    Returns:
        ``{"cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k"}``.
    """
    cu_seqlens = row["cu_seqlens"].to(device) if device is not None else row["cu_seqlens"]
    return {
        "cu_seq_lens_q": cu_seqlens,
        "cu_seq_lens_k": cu_seqlens,
        "max_length_q": row["max_seqlen"],
        "max_length_k": row["max_seqlen"],
    }


@dataclass
class PackedStep:
    """What one rank needs for one optimizer step.

    Attributes:
        micro_batches: ``grad_accum`` rows from :func:`pack_row` for this rank, each with
            ``conversation_indices`` (the dataset indices it holds) added.
        global_weight_sum: sum of shifted loss weights over all ranks and micro-batches of the step (the loss
            normaliser).
        global_num_supervised_tokens: number of targets with weight > 0 in the step, all ranks.
        global_num_tokens: real tokens in the step, all ranks.
        epoch: epoch of the step.
        step_in_epoch: 0-based index of the step within its epoch.
        steps_per_epoch: steps in this epoch (varies slightly between epochs).
    """

    micro_batches: list[dict[str, Any]]
    global_weight_sum: float
    global_num_supervised_tokens: int
    global_num_tokens: int
    epoch: int
    step_in_epoch: int
    steps_per_epoch: int

    def __getitem__(self, key: str) -> Any:
        return getattr(self, key)


@dataclass(frozen=True)
class _EpochTotals:
    plan: EpochPlan
    weight_sums: np.ndarray  # per step, all virtual ranks
    supervised_counts: np.ndarray
    token_counts: np.ndarray


_TOTALS_BLOCK_VALUES = 1 << 22  # values cast to float64 at a time: bounded memory for billions of tokens


def _list_column_totals(column: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row of an arrow list<float> column: length, sum of elements 1.., count of elements 1.. that are > 0.

    Element 0 is skipped: it weighs predicting a conversation's first token, which has nothing before it.
    """
    row_lengths, sums, counts = [], [], []
    cast_buffer = np.empty(_TOTALS_BLOCK_VALUES, np.float64)
    positive_buffer = np.empty(_TOTALS_BLOCK_VALUES, np.bool_)
    for chunk in column.chunks:
        if chunk.null_count:
            raise UserError("loss_weights has missing rows")
        offsets = chunk.offsets.to_numpy().astype(np.int64)
        values = chunk.values.to_numpy(zero_copy_only=False)  # memory-mapped: read block by block below
        lengths = np.diff(offsets)
        row_sums = np.zeros(len(lengths), np.float64)
        row_counts = np.zeros(len(lengths), np.int64)
        first_row = 0
        while first_row < len(lengths):
            # As many rows as fit in the buffer (at least one); cast into a reused buffer, then sum per row.
            end_row = int(np.searchsorted(offsets, offsets[first_row] + _TOTALS_BLOCK_VALUES, "right")) - 1
            end_row = min(max(end_row, first_row + 1), len(lengths))
            begin, end = offsets[first_row], offsets[end_row]
            size = end - begin
            block = cast_buffer[:size] if size <= _TOTALS_BLOCK_VALUES else np.empty(size, np.float64)
            positive = positive_buffer[:size] if size <= _TOTALS_BLOCK_VALUES else np.empty(size, np.bool_)
            np.copyto(block, values[begin:end])
            np.greater(block, 0, out=positive)
            nonempty = lengths[first_row:end_row] > 0  # rows without tokens are reported by the length check
            starts = offsets[first_row:end_row][nonempty] - begin
            if starts.size:
                rows = np.flatnonzero(nonempty) + first_row
                row_sums[rows] = np.add.reduceat(block, starts) - block[starts]
                row_counts[rows] = np.add.reduceat(positive, starts, dtype=np.int64) - positive[starts]
            first_row = end_row
        if np.isnan(row_sums).any():
            row = int(np.flatnonzero(np.isnan(row_sums))[0]) + sum(len(x) for x in row_lengths)
            raise UserError(f"loss_weights of dataset row {row} contain NaN")
        row_lengths.append(lengths)
        sums.append(row_sums)
        counts.append(row_counts)
    if not row_lengths:
        return np.zeros(0, np.int64), np.zeros(0, np.float64), np.zeros(0, np.int64)
    return np.concatenate(row_lengths), np.concatenate(sums), np.concatenate(counts)


class PackedLoader:
    """Resumable padding-free loader: yields one :class:`PackedStep` per optimizer step for one rank.

    Iterating runs from the current position (epoch, step) to the end of ``num_epochs`` epochs; rows are collated
    ``prefetch`` steps ahead by a background thread. :meth:`state_dict` gives the position of the next step to be
    yielded, so a loader given it with :meth:`load_state_dict` yields exactly the steps an uninterrupted run
    would have seen next, without replaying the epoch.

    Args:
        dataset: a ``datasets.Dataset`` with ``input_ids`` and ``loss_weights`` list columns (and optionally
            ``condition`` and ``length``).
        max_tokens: tokens per packed row (bin capacity).
        num_ranks: data-parallel world size.
        rank: this process's rank.
        grad_accum: micro-batches per rank per optimizer step.
        seed: run seed; with the epoch number it fixes every plan.
        pad_to_multiple_of: pad rows to a multiple of this (None: no padding).
        prefetch: steps collated ahead in the background.
        num_epochs: epochs to iterate over.
        pad_token_id: token id of padding.

    Raises:
        UserError (a ValueError): on bad arguments, missing columns, ids/weights of different lengths, or a
            conversation longer than ``max_tokens``.
    """

    def __init__(
        self,
        dataset: Any,
        max_tokens: int,
        num_ranks: int = 1,
        rank: int = 0,
        grad_accum: int = 1,
        seed: int = 0,
        pad_to_multiple_of: int | None = 64,
        prefetch: int = 2,
        num_epochs: int = 1,
        pad_token_id: int = 0,
    ):
        for name, value, low in (
            ("max_tokens", max_tokens, 1),
            ("num_ranks", num_ranks, 1),
            ("grad_accum", grad_accum, 1),
            ("seed", seed, 0),
            ("prefetch", prefetch, 1),
            ("num_epochs", num_epochs, 1),
        ):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise UserError(f"PackedLoader: {name} must be an integer >= {low}, got {value!r}")
        if not 0 <= rank < num_ranks:
            raise UserError(f"PackedLoader: rank must be in [0, {num_ranks}), got {rank}")
        missing = {"input_ids", "loss_weights"} - set(dataset.column_names)
        if missing:
            raise UserError(f"PackedLoader: dataset lacks column(s) {sorted(missing)}; has {dataset.column_names}")
        if len(dataset) == 0:
            raise UserError("PackedLoader: the dataset is empty")
        self.max_tokens, self.num_ranks, self.rank = int(max_tokens), int(num_ranks), int(rank)
        self.grad_accum, self.seed, self.num_epochs = int(grad_accum), int(seed), int(num_epochs)
        self.pad_to_multiple_of, self.prefetch, self.pad_token_id = pad_to_multiple_of, int(prefetch), pad_token_id
        self._has_condition = "condition" in dataset.column_names
        columns = ["input_ids", "loss_weights"] + (["condition"] if self._has_condition else [])
        self._rows = dataset.select_columns(columns).with_format("arrow")

        # One pass over the arrow columns (no Python per row): lengths, weight sums, supervised counts.
        table = dataset.select_columns(["input_ids", "loss_weights"]).with_format("arrow")[:]
        id_lengths = np.concatenate(
            [np.diff(c.offsets.to_numpy().astype(np.int64)) for c in table.column("input_ids").chunks]
        )
        weight_lengths, self._weight_sums, self._supervised_counts = _list_column_totals(table.column("loss_weights"))
        bad = np.flatnonzero(id_lengths != weight_lengths)
        if bad.size:
            i = int(bad[0])
            raise UserError(
                f"PackedLoader: row {i} has {id_lengths[i]} input_ids but {weight_lengths[i]} loss_weights "
                f"({bad.size} such row(s))"
            )
        self.lengths = id_lengths
        too_long = np.flatnonzero(self.lengths > self.max_tokens)
        if too_long.size:
            i = int(too_long[0])
            where = ", ".join(
                f"{key} {dataset[i][key]!r}" for key in ("source", "index") if key in dataset.column_names
            )
            raise UserError(
                f"PackedLoader: dataset row {i}{f' ({where})' if where else ''} has {self.lengths[i]} tokens, more "
                f"than max_tokens={self.max_tokens} ({too_long.size} such row(s)); prepare must truncate to "
                "max_context <= max_tokens"
            )
        _check_lengths(self.lengths, self.max_tokens)
        self._fingerprint = {
            "plan_version": _PLAN_VERSION,
            "seed": self.seed,
            "max_tokens": self.max_tokens,
            "num_ranks": self.num_ranks,
            "grad_accum": self.grad_accum,
            "num_conversations": len(self.lengths),
            "lengths_crc32": zlib.crc32(self.lengths.tobytes()),
        }
        self._epoch = 0
        self._step = 0
        self._cache: dict[int, _EpochTotals] = {}
        self._cache_lock = threading.Lock()

    # ----- planning -----
    def _epoch_totals(self, epoch: int) -> _EpochTotals:
        with self._cache_lock:
            cached = self._cache.get(epoch)
        if cached is not None:
            return cached
        plan = plan_epoch(self.lengths, self.max_tokens, self.num_ranks * self.grad_accum, self.seed, epoch)
        step_offsets = plan.bin_offsets[:: plan.num_ranks]
        indices = plan.conversation_indices
        totals = _EpochTotals(
            plan=plan,
            weight_sums=_bin_sums(self._weight_sums[indices], step_offsets),
            supervised_counts=_bin_sums(self._supervised_counts[indices], step_offsets),
            token_counts=_bin_sums(self.lengths[indices], step_offsets),
        )
        with self._cache_lock:
            # Drop plans older than the previous epoch (a plan of 1M conversations is ~10 MB).
            for old in [e for e in self._cache if e < epoch - 1]:
                del self._cache[old]
            self._cache[epoch] = totals
        return totals

    def steps_per_epoch(self, epoch: int) -> int:
        """Optimizer steps in ``epoch`` (plans it if needed)."""
        return self._epoch_totals(epoch).plan.num_steps

    def total_steps(self) -> int:
        """Optimizer steps over all ``num_epochs`` epochs (plans every epoch once; ~1 s per 1M conversations)."""
        return sum(self.steps_per_epoch(e) for e in range(self.num_epochs))

    # ----- state -----
    def _plan_checksum(self, epoch: int) -> int:
        plan = self._epoch_totals(epoch).plan
        return zlib.crc32(plan.bin_offsets.tobytes(), zlib.crc32(plan.conversation_indices.tobytes()))

    def state_dict(self) -> dict[str, Any]:
        """Position of the next step to be yielded, the fingerprint of the plan's inputs and a checksum of the plan.

        The checksum catches what the inputs cannot, e.g. another numpy drawing another shuffle.
        """
        return {
            "epoch": self._epoch,
            "step_in_epoch": self._step,
            **self._fingerprint,
            "plan_crc32": self._plan_checksum(self._epoch),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continues from a saved position; the next iteration starts there.

        Raises:
            UserError (a ValueError): if the state was saved with another seed, ``max_tokens``, world size, gradient
                accumulation, dataset or planner version, if the epoch's plan differs from the saved checksum, or
                if the state is malformed.
        """
        mismatched = [
            f"{key}: saved {state.get(key)!r}, now {value!r}"
            for key, value in self._fingerprint.items()
            if state.get(key) != value
        ]
        if mismatched:
            raise UserError("PackedLoader: cannot resume, the data plan would differ: " + "; ".join(mismatched))
        epoch, step = state.get("epoch"), state.get("step_in_epoch")
        if not isinstance(epoch, (int, np.integer)) or not isinstance(step, (int, np.integer)) or min(epoch, step) < 0:
            raise UserError(f"PackedLoader: bad resume position epoch={epoch!r} step_in_epoch={step!r}")
        if step > self.steps_per_epoch(epoch):
            raise UserError(
                f"PackedLoader: resume step {step} is past the {self.steps_per_epoch(epoch)} steps of epoch {epoch}"
            )
        if "plan_crc32" in state and state["plan_crc32"] != self._plan_checksum(int(epoch)):
            raise UserError(
                f"PackedLoader: cannot resume, the plan of epoch {epoch} differs from the saved run's although its "
                "inputs match (another numpy or crlft version?)"
            )
        self._epoch, self._step = int(epoch), int(step)

    # ----- collation -----
    def _make_step(self, epoch: int, step: int) -> PackedStep:
        totals = self._epoch_totals(epoch)
        plan = totals.plan
        bins = [plan.bin(step, self.rank * self.grad_accum + k) for k in range(self.grad_accum)]
        all_indices = np.concatenate(bins)
        ids_values = w_values = np.zeros(0)
        ids_offsets = w_offsets = np.zeros(1, np.int64)
        conditions = [""] * len(all_indices)
        if all_indices.size:  # one read for all micro-batches; an empty bin (last step) reads nothing
            table = self._rows[all_indices.tolist()]
            ids_column = table.column("input_ids").combine_chunks()
            weights_column = table.column("loss_weights").combine_chunks()
            ids_offsets, ids_values = ids_column.offsets.to_numpy(), ids_column.values.to_numpy()
            w_offsets, w_values = weights_column.offsets.to_numpy(), weights_column.values.to_numpy()
            if self._has_condition:
                conditions = [str(c) for c in table.column("condition").to_pylist()]
        micro_batches = []
        row = 0
        for indices in bins:
            rows = range(row, row + len(indices))
            examples = [
                (ids_values[ids_offsets[i] : ids_offsets[i + 1]], w_values[w_offsets[i] : w_offsets[i + 1]])
                for i in rows
            ]
            packed = pack_row(
                examples,
                pad_to_multiple_of=self.pad_to_multiple_of,
                pad_token_id=self.pad_token_id,
                conditions=conditions[row : row + len(indices)],
            )
            packed["conversation_indices"] = indices.copy()
            micro_batches.append(packed)
            row += len(indices)
        return PackedStep(
            micro_batches=micro_batches,
            global_weight_sum=float(totals.weight_sums[step]),
            global_num_supervised_tokens=int(totals.supervised_counts[step]),
            global_num_tokens=int(totals.token_counts[step]),
            epoch=epoch,
            step_in_epoch=step,
            steps_per_epoch=plan.num_steps,
        )

    def _positions(self, epoch: int, step: int) -> Iterator[tuple[int, int]]:
        while epoch < self.num_epochs:
            num_steps = self.steps_per_epoch(epoch)
            while step < num_steps:
                yield epoch, step
                step += 1
            epoch, step = epoch + 1, 0

    def __iter__(self) -> Iterator[PackedStep]:
        """Yields the steps from the current position to the end of the last epoch."""
        done = object()
        ready: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stopping = threading.Event()

        def put(item: Any) -> bool:
            while not stopping.is_set():
                try:
                    ready.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def work(epoch: int, step: int) -> None:
            try:
                for e, s in self._positions(epoch, step):
                    if not put(self._make_step(e, s)):
                        return
                    if s == self.steps_per_epoch(e) // 2 and e + 1 < self.num_epochs:
                        # Plan the next epoch (~1 s per 1M conversations) long before its first step is due.
                        self._epoch_totals(e + 1)
                put(done)
            except BaseException as error:  # handed to the consumer, which re-raises it
                put(error)

        worker = threading.Thread(target=work, args=(self._epoch, self._step), name="crlft-packed-loader", daemon=True)
        worker.start()
        try:
            while True:
                item = ready.get()
                if item is done:
                    return
                if isinstance(item, BaseException):
                    raise item
                # The position advances only when a step is handed out, so state_dict() never skips a step.
                self._epoch, self._step = item.epoch, item.step_in_epoch + 1
                if self._step >= item.steps_per_epoch:
                    self._epoch, self._step = item.epoch + 1, 0
                yield item
        finally:
            stopping.set()
            worker.join()

    def __len__(self) -> int:
        """Steps left from the current position to the end of the last epoch."""
        left = -self._step
        for epoch in range(self._epoch, self.num_epochs):
            left += self.steps_per_epoch(epoch)
        return max(left, 0)


__all__ = [
    "IGNORE_INDEX",
    "EpochPlan",
    "PackedLoader",
    "PackedStep",
    "PlanStats",
    "flash_attention_kwargs",
    "pack_row",
    "plan_epoch",
    "plan_stats",
]
