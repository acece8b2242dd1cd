"""How long a run is: the epochs it iterates, the steps its learning-rate schedule spans, the step it stops after.

``train.max_steps`` means what it means in Hugging Face's Trainer, TRL and axolotl: the run's length. The warm-up
and the cosine decay span ``max_steps`` and it overrides ``train.epochs`` (as many epochs as it needs are run,
the last one perhaps in part). ``train.stop_after_steps`` ends a run early without touching the schedule (a test
or a benchmark that wants the first N steps of the real run). The trainer and ``crlft plan`` both use
:func:`run_length`, so the plan says exactly what the trainer will do.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# Fewer optimizer steps per epoch than this: warn (a GPU-sized batch on a small dataset; warm-up and decay have
# almost nothing to act on).
FEW_STEPS_PER_EPOCH = 10


def num_warmup_steps(total_steps: int, warmup_ratio: float) -> int:
    """Steps of linear warm-up: ``ceil(warmup_ratio · total_steps)``, less than ``total_steps``."""
    return min(math.ceil(warmup_ratio * total_steps), max(total_steps - 1, 0))


@dataclass(frozen=True)
class RunLength:
    """The steps of a run.

    Attributes:
        epochs: epochs the loader plans and iterates (``train.epochs``, or what ``max_steps`` needs).
        steps_per_epoch: optimizer steps of each of those epochs.
        schedule_steps: steps the learning-rate schedule spans (warm-up + decay).
        stop_at: optimizer steps the run does before it ends (≤ ``schedule_steps``).
        warmup_steps: steps of linear warm-up.
        source: which key decided the length, for messages.
    """

    epochs: int
    steps_per_epoch: tuple[int, ...]
    schedule_steps: int
    stop_at: int
    warmup_steps: int
    source: str

    def describe(self) -> str:
        """One line: epochs, schedule, stop, warm-up."""
        per_epoch = sorted(set(self.steps_per_epoch))
        spe = str(per_epoch[0]) if len(per_epoch) == 1 else f"{per_epoch[0]}-{per_epoch[-1]}"
        text = f"{spe} steps/epoch × {self.epochs} epoch(s); schedule over {self.schedule_steps} steps ({self.source})"
        if self.stop_at < self.schedule_steps:
            text += f", stopping after {self.stop_at} (train.stop_after_steps; the schedule is unchanged)"
        return text + f"; {self.warmup_steps} warm-up steps"


def run_length(train: Any, steps_per_epoch: Callable[[int], int]) -> RunLength:
    """The run's length from the recipe's ``train`` section and the packing plan's steps per epoch.

    Args:
        train: ``recipe.train`` (``epochs``, ``max_steps``, ``stop_after_steps``, ``lr_warmup_ratio``).
        steps_per_epoch: steps of epoch ``e`` (``PackedLoader.steps_per_epoch``; any epoch number works).

    Returns:
        A :class:`RunLength`.
    """
    if train.max_steps:
        per_epoch: list[int] = []
        while sum(per_epoch) < train.max_steps:
            per_epoch.append(int(steps_per_epoch(len(per_epoch))))
        schedule_steps, source = int(train.max_steps), f"train.max_steps={train.max_steps}"
    else:
        per_epoch = [int(steps_per_epoch(e)) for e in range(train.epochs)]
        schedule_steps, source = sum(per_epoch), f"train.epochs={train.epochs}"
    stop_at = min(schedule_steps, train.stop_after_steps) if train.stop_after_steps else schedule_steps
    return RunLength(epochs=len(per_epoch), steps_per_epoch=tuple(per_epoch), schedule_steps=schedule_steps,
                     stop_at=stop_at, warmup_steps=num_warmup_steps(schedule_steps, train.lr_warmup_ratio),
                     source=source)


def few_steps_warning(length: RunLength) -> str | None:
    """A warning when an epoch has fewer than ``FEW_STEPS_PER_EPOCH`` steps (None otherwise)."""
    fewest = min(length.steps_per_epoch)
    if fewest >= FEW_STEPS_PER_EPOCH:
        return None
    return (f"only {fewest} optimizer step(s) per epoch (fewer than {FEW_STEPS_PER_EPOCH}): batches sized for many "
            "GPUs on a small dataset; lower train.batch_max_len or train.grad_accum, or use fewer ranks, for more "
            "updates")


__all__ = ["FEW_STEPS_PER_EPOCH", "RunLength", "few_steps_warning", "num_warmup_steps", "run_length"]
