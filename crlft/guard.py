"""The non-finite guard: a step whose loss or gradient norm is not finite is discarded or stops the run.

How a step is discarded: the step's loss is all-reduced before the last backward; when it is not finite, that
backward is multiplied by NaN, so every gradient is NaN and DeepSpeed's own overflow check (ZeRO 1-3, fp32 and bf16)
drops the update as it does for fp16 overflows: weights, optimizer moments and the learning-rate schedule stay as
they were. A non-finite gradient norm with a finite loss takes the same path inside DeepSpeed. Where DeepSpeed
applies the update anyway (ZeRO stage 0 in fp32), the run stops at once, whatever the skip budget.

The weights and optimizer state are also checked before every checkpoint: an update can make them non-finite
while the loss of its own step was still finite (``lr=inf``), and such a state is never written.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from crlft.errors import UserError


class NonFiniteError(UserError):
    """The run met a non-finite loss, gradient norm or state and stopped; nothing of that state was written."""


def discard_if_not_finite(loss: torch.Tensor, step_sums: torch.Tensor) -> torch.Tensor:
    """``loss`` for the step's last backward, NaN when the all-reduced ``step_sums`` are not finite.

    Every rank sees the same all-reduced sums, so every rank poisons its gradients in the same step and DeepSpeed's
    overflow check (a global all-reduce of its own) discards the update everywhere.
    """
    if bool(torch.isfinite(step_sums).all()):
        return loss
    return loss * float("nan")


@dataclass
class NonFiniteGuard:
    """Counts non-finite steps and stops the run when ``max_skips`` is exceeded (``train.nonfinite_skips``)."""

    max_skips: int = 0
    skipped_steps: list[int] = field(default_factory=list)  # goes into checkpoints: the budget is per run

    def check_step(
        self, step: int, loss: float, grad_norm: float | None, update_applied: bool, last_checkpoint: str | None
    ) -> bool:
        """Whether optimizer step ``step`` (1-based) was skipped for a non-finite loss or gradient norm.

        Raises:
            NonFiniteError: the step was not finite and the budget is spent, or its update could not be skipped.
        """
        finite = math.isfinite(loss) and (grad_norm is None or math.isfinite(grad_norm))
        if finite:
            return False
        what = f"step {step}: the loss is {loss}" + (
            f" and the gradient norm {grad_norm}" if grad_norm is not None else ""
        )
        if update_applied:
            raise NonFiniteError(
                f"{what}, and DeepSpeed applied the update anyway (no overflow check in this configuration, e.g. "
                f"ZeRO stage 0 in float32); stopping: {nothing_written(last_checkpoint)}"
            )
        self.skipped_steps.append(step)
        if len(self.skipped_steps) > self.max_skips:
            raise NonFiniteError(
                f"{what}; stopping (train.nonfinite_skips={self.max_skips}"
                + (f", non-finite steps so far: {self.skipped_steps}" if self.max_skips else "")
                + f"). The update of step {step} was not applied; {nothing_written(last_checkpoint)} "
                "Lower train.lr, check the data of that step, or allow skipped steps with train.nonfinite_skips."
            )
        return True


def check_state_finite(engine: Any, when: str, consequence: str) -> None:
    """Stop when any rank's weights or optimizer state are not finite; every rank calls it (one all-reduce).

    Args:
        engine: the DeepSpeed engine.
        when: for the message, e.g. ``after step 12``.
        consequence: what is done about it, for the message.

    Raises:
        NonFiniteError: naming ``when`` and this rank's first non-finite tensors.
    """
    bad = nonfinite_state(engine)
    count = torch.tensor([len(bad)], dtype=torch.int64)
    if torch.distributed.is_initialized():
        count = count.to(_device_of(engine))
        torch.distributed.all_reduce(count)
    if int(count.item()):
        here = f" (here: {', '.join(bad[:3])})" if bad else ""
        raise NonFiniteError(f"the weights or optimizer state {when} are not finite on some rank{here}; {consequence}")


def nonfinite_state(engine: Any) -> list[str]:
    """Names of this rank's non-finite tensors: module weights (its ZeRO-3 partition), the optimizer's fp32
    weights and moments."""
    bad = []
    for name, param in engine.module.named_parameters():
        tensor = getattr(param, "ds_tensor", None)  # ZeRO-3: this rank's partition; param.data is empty
        tensor = param.data if tensor is None else tensor
        if tensor.numel() and not bool(torch.isfinite(tensor).all()):
            bad.append(name)
    optimizer = getattr(engine, "optimizer", None)
    base = getattr(optimizer, "optimizer", optimizer)  # ZeRO wraps the torch optimizer of the fp32 partitions
    if base is not None and hasattr(base, "param_groups"):
        for g, group in enumerate(base.param_groups):
            for i, param in enumerate(group["params"]):
                tensors = {
                    "fp32 weights": param,
                    **{
                        k: v
                        for k, v in base.state.get(param, {}).items()
                        if isinstance(v, torch.Tensor) and v.is_floating_point()
                    },
                }
                bad += [
                    f"optimizer {key} (group {g}, tensor {i})"
                    for key, t in tensors.items()
                    if t.numel() and not bool(torch.isfinite(t).all())
                ]
    return bad


def _device_of(engine: Any) -> torch.device:
    device = getattr(engine, "device", None)
    return device if isinstance(device, torch.device) else torch.device("cpu")


def nothing_written(last_checkpoint: str | None) -> str:
    last = f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else "there is no earlier checkpoint"
    return f"no checkpoint or export of this state was written and none was deleted; {last}."


__all__ = [
    "NonFiniteError",
    "NonFiniteGuard",
    "check_state_finite",
    "discard_if_not_finite",
    "nonfinite_state",
    "nothing_written",
]
