"""Validation during training: the prepared ``eval`` split, evaluated forward only by every rank, logged by rank 0.

Every rank evaluates its share of the split, packed by the training planner with a fixed seed (the same rows in
every evaluation and every run of the split), under ``torch.no_grad()`` through the training engine (same dtype,
attention kernel and fused chunked loss, which then computes no gradients); the per-condition sums are all-reduced
once. Why it cannot change training is in ``docs/design.md`` ("Validation during training").
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from crlft.collate import flash_attention_kwargs
from crlft.loader import PackedLoader
from crlft.metrics import SUM_FIELDS, condition_rows, per_condition_sums, ratio
from crlft.split import load_eval_split, split_fingerprint

logger = logging.getLogger("crlft.evaluation")

# The eval split's packing plan: plan_epoch's own generator with this seed and epoch, never the run's randomness.
EVAL_PLAN_SEED = 0

_FIELD = {name: i for i, name in enumerate(SUM_FIELDS)}


def eval_metrics(sums: torch.Tensor, conditions: list[str]) -> dict[str, float]:
    """The logged numbers of one evaluation from its all-reduced per-condition sums.

    Args:
        sums: ``[len(conditions), len(SUM_FIELDS)]`` over the whole split (``crlft.metrics.per_condition_sums``).
        conditions: the condition names of the rows of ``sums``.

    Returns:
        ``eval_loss`` (``Σ w·CE / Σ w``), ``eval_accuracy`` (``Σ w·correct / Σ w``), ``eval_tokens`` (supervised
        targets scored), ``eval_weight_sum``, and per condition with targets ``eval_loss/<c>``,
        ``eval_accuracy/<c>``, ``eval_tokens/<c>`` (``<none>`` for the empty condition).
    """
    s = sums.double().cpu()
    f = _FIELD
    total = s.sum(dim=0)
    metrics = {
        "eval_loss": ratio(total[f["weighted_ce_sum"]], total[f["weight_sum"]]),
        "eval_accuracy": ratio(total[f["weighted_correct"]], total[f["weight_sum"]]),
        "eval_tokens": int(total[f["num_tokens"]]),
        "eval_weight_sum": float(total[f["weight_sum"]]),
    }
    for name, row in condition_rows(s, conditions):
        metrics[f"eval_loss/{name}"] = ratio(row[f["weighted_ce_sum"]], row[f["weight_sum"]])
        metrics[f"eval_accuracy/{name}"] = ratio(row[f["weighted_correct"]], row[f["weight_sum"]])
        metrics[f"eval_tokens/{name}"] = int(row[f["num_tokens"]])
    return metrics


def is_due(every_steps: int | None, done_steps: int, epoch_end: bool, last: bool) -> bool:
    """Whether to evaluate after optimizer step ``done_steps``: every ``every_steps`` steps (``train.eval_every_steps``;
    0: never), at each epoch end and at the last step. A function of the step alone: a resumed run evaluates at the
    same steps."""
    if every_steps == 0:
        return False
    return epoch_end or last or bool(every_steps and done_steps % every_steps == 0)


class Evaluator:
    """The eval split of one run on one rank: when to evaluate, and the evaluation itself.

    Args:
        dataset: the prepared ``eval`` split (``crlft.split.load_eval_split``).
        max_tokens: tokens per packed row (``train.batch_max_len``: the memory bound of training holds).
        world_size: data-parallel ranks (each takes its bins of every planned step).
        rank: this rank.
        pad_to_multiple_of: ``train.pad_to_multiple_of``.
        pad_token_id: the tokenizer's padding id.
        every_steps: ``train.eval_every_steps`` (None: epoch ends and the last step; 0: never).
    """

    def __init__(self, dataset: Any, *, max_tokens: int, world_size: int, rank: int,
                 pad_to_multiple_of: int | None, pad_token_id: int, every_steps: int | None):
        self.loader = PackedLoader(dataset, max_tokens=max_tokens, num_ranks=world_size, rank=rank, grad_accum=1,
                                   seed=EVAL_PLAN_SEED, pad_to_multiple_of=pad_to_multiple_of, num_epochs=1,
                                   pad_token_id=pad_token_id)
        self._start = self.loader.state_dict()
        self.conditions = sorted(set(dataset.unique("condition"))) if "condition" in dataset.column_names else [""]
        self.split = split_fingerprint(dataset)
        self.num_conversations = len(dataset)
        self.num_tokens = int(self.loader.lengths.sum())
        self.rows_per_rank = self.loader.steps_per_epoch(0)
        self.every_steps = every_steps

    def is_due(self, done_steps: int, epoch_end: bool, last: bool) -> bool:
        """Whether to evaluate after optimizer step ``done_steps`` (see :func:`is_due`)."""
        return is_due(self.every_steps, done_steps, epoch_end, last)

    def local_sums(self, forward: Callable[..., Any], device: torch.device) -> torch.Tensor:
        """This rank's per-condition sums over its share of the split (no collective of its own).

        Args:
            forward: ``forward(batch, **attention_kwargs) -> LossParts``: the DeepSpeed engine, or a
                ``crlft.loss.WeightedLossModel``.
            device: this rank's device.
        """
        self.loader.load_state_dict(self._start)
        sums = torch.zeros(len(self.conditions), len(SUM_FIELDS), dtype=torch.float64, device=device)
        with torch.no_grad():
            for step in self.loader:  # every rank the same number of rows (empty bins: a padding row)
                for row in step.micro_batches:
                    batch = {key: row[key].to(device, non_blocking=True)
                             for key in ("input_ids", "position_ids", "labels", "loss_weights")}
                    parts = forward(batch, **flash_attention_kwargs(row, device))
                    sums += per_condition_sums(parts, row["cu_seqlens"], row["segment_conditions"], self.conditions)
        return sums

    def evaluate(self, engine: Any, device: torch.device) -> dict[str, Any]:
        """One evaluation of the whole split; every rank must call it. Returns the ``metrics.jsonl`` fields."""
        started = time.perf_counter()
        was_training = engine.module.training
        engine.eval()
        try:
            sums = self.local_sums(engine, device)
        finally:
            engine.train(was_training)
        torch.distributed.all_reduce(sums)  # the evaluation's one collective
        metrics = eval_metrics(sums, self.conditions)
        metrics["eval_num_tokens"] = self.num_tokens
        metrics["eval_time_s"] = time.perf_counter() - started
        metrics["eval_split"] = self.split
        return metrics

    def maybe_evaluate(self, engine: Any, device: torch.device, done_steps: int, epoch_end: bool,
                       last: bool) -> dict[str, Any]:
        """Evaluate when due (see :meth:`is_due`) and log a line; returns the fields to add to the step's record."""
        if not self.is_due(done_steps, epoch_end, last):
            return {}
        metrics = self.evaluate(engine, device)
        per_condition = ", ".join(f"{k[10:]} {v:.4f}" for k, v in metrics.items() if k.startswith("eval_loss/"))
        logger.info(f"eval after step {done_steps}: loss {metrics['eval_loss']:.4f}"
                    + (f" ({per_condition})" if per_condition else "")
                    + f", weighted accuracy {metrics['eval_accuracy']:.3f}, {self.num_conversations} conversations, "
                    f"{metrics['eval_tokens']} supervised tokens, {metrics['eval_time_s']:.1f}s")
        return metrics


def build_evaluator(recipe: Any, world_size: int, rank: int, pad_token_id: int) -> Evaluator | None:
    """The run's evaluator, or None when the prepared data has no ``eval`` split or ``eval_every_steps`` is 0."""
    t = recipe.train
    dataset = load_eval_split(recipe.data.output_dir)
    if dataset is None:
        return None
    if t.eval_every_steps == 0:
        logger.info(f"eval split: {len(dataset)} held-out conversations, not evaluated (train.eval_every_steps: 0)")
        return None
    evaluator = Evaluator(dataset, max_tokens=t.batch_max_len, world_size=world_size, rank=rank,
                          pad_to_multiple_of=t.pad_to_multiple_of, pad_token_id=pad_token_id,
                          every_steps=t.eval_every_steps)
    when = (f"every {t.eval_every_steps} steps, " if t.eval_every_steps else "") + "at each epoch end and the end"
    logger.info(f"eval split {evaluator.split}: {evaluator.num_conversations} held-out conversations, "
                f"{evaluator.num_tokens} tokens ({evaluator.rows_per_rank} row(s) per rank), evaluated {when}")
    return evaluator


def evaluation_steps(epoch_steps: list[int], total_steps: int, every_steps: int | None) -> list[int]:
    """The optimizer steps after which a run evaluates (``Evaluator.is_due`` for every step of the run)."""
    epoch_ends = set(np.cumsum(epoch_steps).tolist())
    return [s for s in range(1, total_steps + 1) if is_due(every_steps, s, s in epoch_ends, s == total_steps)]


def eval_plan_lines(recipe: Any, num_gpus: int, epoch_steps: list[int], total_steps: int) -> list[str]:
    """``crlft plan``'s lines on the eval split: held-out conversations, the cost of one evaluation, how many."""
    t = recipe.train
    dataset = load_eval_split(recipe.data.output_dir)
    if dataset is None:
        return ["  eval split: none (data.eval_fraction and data.eval_sources are unset)"]
    evaluator = Evaluator(dataset, max_tokens=t.batch_max_len, world_size=num_gpus, rank=0,
                          pad_to_multiple_of=t.pad_to_multiple_of, pad_token_id=0, every_steps=t.eval_every_steps)
    supervised = int(evaluator.loader._supervised_counts.sum())
    steps = evaluation_steps(epoch_steps, total_steps, t.eval_every_steps)
    when = ("never (train.eval_every_steps: 0)" if t.eval_every_steps == 0 else
            (f"every {t.eval_every_steps} steps, " if t.eval_every_steps else "") + "at each epoch end and the end")
    return [
        f"  eval split: {evaluator.num_conversations:,} held-out conversations, {evaluator.num_tokens:,} tokens "
        f"({supervised:,} supervised); one evaluation: {evaluator.rows_per_rank} row(s) of at most "
        f"{t.batch_max_len:,} tokens per GPU, forward only",
        f"  evaluations: {len(steps)} ({when}), {len(steps) * evaluator.num_tokens:,} tokens forwarded in all",
    ]


def check_split_on_resume(saved_split: str | None, evaluator: Evaluator | None, checkpoint: str) -> None:
    """Warn when the eval split differs from the one the checkpoint's run evaluated (not a reason to refuse)."""
    current = evaluator.split if evaluator is not None else None
    if saved_split and current and saved_split != current:
        logger.warning(f"the eval split changed since {checkpoint} (it evaluated {saved_split}, now {current}): "
                       "eval_loss before and after this resume are on different held-out sets; every record's "
                       "eval_split tells them apart")


__all__ = ["EVAL_PLAN_SEED", "Evaluator", "build_evaluator", "check_split_on_resume", "eval_metrics", "eval_plan_lines",
           "evaluation_steps", "is_due"]
