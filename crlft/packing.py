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
    Every step is a random draw of the data. The conversations are shuffled with a generator seeded by
    ``(seed, epoch)`` into the epoch's *stream*, and each step takes the next stretch of it: the conversations that
    found no room in the previous step first, then the next ones in stream order while their tokens fit in the
    step's ``num_ranks`` bins. They are spread over the bins longest first, each onto the bin of lowest attention
    cost (sum of squared lengths) that has room, so the ranks of a step cost about the same. What did not fit goes
    first into the next step. The gaps that remain are filled from the next ``_LOOKAHEAD_CONVERSATIONS`` stream
    positions (an exact fit, else the longest that leaves room for the shortest one left), and a gap too small for
    any of them is closed by one swap (a conversation of the bin makes way, into the next step, for a look-ahead
    one up to the gap longer). So no step is sorted or selected by length, and a conversation is trained within a
    few steps of its stream position: classes are mixed in every step as in random steps of the same sizes, which
    matters because the rewards weigh classes only against each other within a step (``crlft.mixing`` measures it;
    the trainer logs it per epoch). Slots stay full: 99.99%+ on realistic mixes with rows of 16k tokens and more,
    98% with rows of ~14 conversations of nearly equal length (OpenChat's multipack sampler, whose steps are also
    random: 86-99.8% and 97.5%). The last step takes the epoch's left-overs, packed tightly; it may have empty
    bins (last). Nothing is ever dropped. Bins go to ranks in random order within a step. Planning 1M
    conversations takes a few seconds (plain Python with ``bisect`` and ``heapq``).

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
from bisect import bisect_left, bisect_right, insort
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from heapq import heappop, heappush
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow.compute as pc
import torch

from crlft.errors import UserError

if TYPE_CHECKING:
    from crlft.mixing import StepMixing

# Planner tuning, chosen with benchmarks/bench_packing.py. Changing it changes the plans, so _PLAN_VERSION must
# change too: it is part of the loader's resume fingerprint.
_PLAN_VERSION = 2
_LOOKAHEAD_CONVERSATIONS = 64  # a step may fill its last gaps from at most this many conversations after it
_MAX_SWAPS_PER_BIN = 1  # a bin's last gap may be closed by this many one-for-one swaps with the look-ahead

IGNORE_INDEX = -100  # labels value ignored by torch's cross-entropy

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
        num_ranks: bins per step; with gradient accumulation pass ``ranks * grad_accum`` (see module docstring).
        seed: non-negative run seed.
        epoch: non-negative epoch number.

    Returns:
        An :class:`EpochPlan`: steps x ``num_ranks`` bins of dataset indices; every conversation appears exactly
        once; every bin holds at most ``max_tokens`` tokens; only the last step may hold empty bins (then last).
        Deterministic for ``(seed, epoch)``; empty input gives a plan with zero steps.

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
        self._class_codes = None  # condition of every row as a small integer, for the per-epoch mixing report
        if self._has_condition:
            conditions = dataset.select_columns(["condition"]).with_format("arrow")[:].column("condition")
            self._class_codes = pc.dictionary_encode(conditions.combine_chunks()).indices.to_numpy()
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

    def class_mixing(self, epoch: int) -> StepMixing | None:
        """How many steps of ``epoch`` hold one condition only, beside random steps (None without conditions)."""
        from crlft.mixing import one_class_steps  # crlft.mixing builds on this module

        if self._class_codes is None:
            return None
        return one_class_steps(self._epoch_totals(epoch).plan, self._class_codes)

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
