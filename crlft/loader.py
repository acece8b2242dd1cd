"""The resumable background loader: plans every epoch, collates this rank's rows ahead, resumes at any step.

Each :class:`PackedStep` carries the step's *global* loss normalisers (``Σ w`` and supervised targets over all ranks
and micro-batches), known from the plan without communication. With ``grad_accum`` > 1 the plan is made for
``num_ranks · grad_accum`` virtual ranks, so 1 rank × 2 micro-batches and 2 ranks × 1 see the same bins.
"""

from __future__ import annotations

import queue
import threading
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow.compute as pc

from crlft.collate import pack_row
from crlft.errors import UserError
from crlft.mixing import StepMixing, one_class_steps
from crlft.packing import _PLAN_VERSION, EpochPlan, _bin_sums, _check_lengths, check_integer_arguments, plan_epoch


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
            raise ValueError("loss_weights has missing rows")
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
            raise ValueError(f"loss_weights of dataset row {row} contain NaN")
        row_lengths.append(lengths)
        sums.append(row_sums)
        counts.append(row_counts)
    if not row_lengths:
        return np.zeros(0, np.int64), np.zeros(0, np.float64), np.zeros(0, np.int64)
    return np.concatenate(row_lengths), np.concatenate(sums), np.concatenate(counts)


def _check_arguments(max_tokens: Any, num_ranks: Any, rank: Any, grad_accum: Any, seed: Any, prefetch: Any,
                     num_epochs: Any) -> None:
    """Each argument is an integer in its range; anything else is a caller's bug (ValueError)."""
    check_integer_arguments("PackedLoader: ", (
        ("max_tokens", max_tokens, 1),
        ("num_ranks", num_ranks, 1),
        ("grad_accum", grad_accum, 1),
        ("seed", seed, 0),
        ("prefetch", prefetch, 1),
        ("num_epochs", num_epochs, 1),
    ))
    if not 0 <= rank < num_ranks:
        raise ValueError(f"PackedLoader: rank must be in [0, {num_ranks}), got {rank}")


def _row_totals(dataset: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per dataset row: tokens, sum of shifted weights, supervised targets; one pass over the arrow columns."""
    table = dataset.select_columns(["input_ids", "loss_weights"]).with_format("arrow")[:]
    id_lengths = np.concatenate(
        [np.diff(c.offsets.to_numpy().astype(np.int64)) for c in table.column("input_ids").chunks]
    )
    weight_lengths, weight_sums, supervised_counts = _list_column_totals(table.column("loss_weights"))
    bad = np.flatnonzero(id_lengths != weight_lengths)
    if bad.size:
        i = int(bad[0])
        raise ValueError(
            f"PackedLoader: row {i} has {id_lengths[i]} input_ids but {weight_lengths[i]} loss_weights "
            f"({bad.size} such row(s))"
        )
    return id_lengths, weight_sums, supervised_counts


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
        ValueError: on bad arguments, missing columns or ids/weights of different lengths (our invariants).
        UserError: an empty dataset, or a conversation longer than ``max_tokens`` (prepare with a smaller
            ``model.max_context``).
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
        _check_arguments(max_tokens, num_ranks, rank, grad_accum, seed, prefetch, num_epochs)
        missing = {"input_ids", "loss_weights"} - set(dataset.column_names)
        if missing:
            raise ValueError(f"PackedLoader: dataset lacks column(s) {sorted(missing)}; has {dataset.column_names}")
        if len(dataset) == 0:
            raise UserError("PackedLoader: the dataset is empty")
        self.max_tokens, self.num_ranks, self.rank = int(max_tokens), int(num_ranks), int(rank)
        self.grad_accum, self.seed, self.num_epochs = int(grad_accum), int(seed), int(num_epochs)
        self.pad_to_multiple_of, self.prefetch, self.pad_token_id = pad_to_multiple_of, int(prefetch), pad_token_id
        self._has_condition = "condition" in dataset.column_names
        columns = ["input_ids", "loss_weights"] + (["condition"] if self._has_condition else [])
        self._rows = dataset.select_columns(columns).with_format("arrow")

        self.lengths, self._weight_sums, self._supervised_counts = _row_totals(dataset)
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
            # The plan is made for num_ranks × grad_accum virtual ranks: only the product decides the batches.
            "rows_per_step": self.num_ranks * self.grad_accum,
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
        step_offsets = plan.step_offsets
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
            UserError: if the state was saved with another seed, ``max_tokens``, rows per step (world size ×
                gradient accumulation), dataset or planner version, or if the epoch's plan differs from the saved
                checksum.
            ValueError: if the state is malformed.
        """
        if "rows_per_step" not in state and "num_ranks" in state:  # written before rows_per_step
            state = {**state, "rows_per_step": state["num_ranks"] * state.get("grad_accum", 1)}
        mismatched = [
            f"{key}: saved {state.get(key)!r}, now {value!r}"
            for key, value in self._fingerprint.items()
            if state.get(key) != value
        ]
        if mismatched:
            raise UserError("PackedLoader: cannot resume, the data plan would differ: " + "; ".join(mismatched))
        epoch, step = state.get("epoch"), state.get("step_in_epoch")
        if not isinstance(epoch, (int, np.integer)) or not isinstance(step, (int, np.integer)) or min(epoch, step) < 0:
            raise ValueError(f"PackedLoader: bad resume position epoch={epoch!r} step_in_epoch={step!r}")
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


__all__ = ["PackedLoader", "PackedStep"]
