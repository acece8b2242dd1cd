"""Before any rank starts: which checkpoint a run resumes from, whether the recipe may resume from it, whether the
run is already complete.

``launch.sh`` runs ``crlft preflight`` before the DeepSpeed launcher, so a finished run says so in seconds and a
refused resume is reported once, not after minutes of start-up by every rank. The trainer makes the same checks
(with the same functions) for runs started with ``deepspeed`` directly.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from crlft import checkpoint as ckpt
from crlft import reshard
from crlft.config import Recipe
from crlft.errors import UserError

FINAL_EXPORT = "final"
EVAL_FILE = "eval.json"


class ResumeRefused(UserError):
    """A resume the recipe cannot do; every rank finds the same, so only rank 0 prints it (``crlft.cli``)."""

    reported_by_rank_0 = True


@dataclass
class ResumePoint:
    """Where a run continues from: the checkpoint (None: from the base model), its step and trainer state."""

    checkpoint: str | None
    step: int
    state: dict[str, Any] | None


def resume_point(recipe: Recipe, fingerprint: dict[str, Any], world_size: int | None) -> ResumePoint:
    """The checkpoint ``train.resume`` picks, checked against the run's resume fingerprint.

    Args:
        recipe: the recipe.
        fingerprint: ``crlft.checkpoint.resume_fingerprint`` of the run about to start.
        world_size: ranks of the run (None before the launcher has counted them: rows per step are not checked).

    Raises:
        ResumeRefused: the checkpoint differs from the recipe in a field that matters (every one named).
        UserError: ``train.resume`` names no usable checkpoint.
    """
    t = recipe.train
    checkpoint = ckpt.resolve_resume(t.resume, t.output_dir, recipe.where("train", "resume"))
    if checkpoint is None:
        return ResumePoint(None, 0, None)
    state = ckpt.read_trainer_state(checkpoint)
    # Rows per step (ranks × grad_accum) decide the run, not ranks alone: another GPU count resumes (crlft.reshard).
    ignore = () if world_size else ("rows_per_step",)
    saved = {k: v for k, v in reshard.normalise_fingerprint(state.get("fingerprint", {})).items() if k not in ignore}
    current = {k: v for k, v in fingerprint.items() if k not in ignore}
    problems = []
    if world_size:
        try:
            reshard.check_rows_per_step(state, world_size, t.grad_accum, checkpoint,
                                        recipe.where("train", "grad_accum"))
        except UserError as error:
            problems.append(str(error))
            saved.pop("rows_per_step", None)  # said above, with the grad_accum that would fit
            current.pop("rows_per_step", None)
    try:
        ckpt.check_resume_fingerprint(saved, current, checkpoint)
    except UserError as error:
        problems.append(str(error))
    if problems:  # every reason in one message
        raise ResumeRefused("\n".join(problems))
    return ResumePoint(checkpoint, int(state["step"]), state)


def final_export_step(output_dir: str) -> int | None:
    """The step ``export/final`` was exported from (None: no complete final export)."""
    info = os.path.join(output_dir, ckpt.EXPORT_DIR, FINAL_EXPORT, ckpt.EXPORT_INFO_FILE)
    try:
        with open(info, encoding="utf-8") as f:
            return int(json.load(f)["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def complete_message(recipe: Recipe, point: ResumePoint, stop_at: int) -> str | None:
    """What to say when the run is finished (None when there is training or the final export left to do).

    Finished: the checkpoint resumed from has done ``stop_at`` steps and ``export/final`` is of that step.
    """
    if point.checkpoint is None or point.step < stop_at:
        return None
    output_dir = recipe.train.output_dir
    if final_export_step(output_dir) != point.step:
        return None
    final = os.path.join(output_dir, ckpt.EXPORT_DIR, FINAL_EXPORT)
    return (f"{output_dir} is complete: {point.step} of {stop_at} steps done, final export {final}; nothing to "
            "train (raise train.max_steps or train.epochs in a new train.output_dir to train longer)")


def stop_at_from_checkpoint(recipe: Recipe, point: ResumePoint) -> int:
    """Steps the run does in all, from the checkpoint's schedule length (the fingerprint guarantees it still holds)
    and the recipe's ``train.stop_after_steps``, without planning the epochs."""
    schedule_steps = int(point.state["total_steps"]) if point.state else 0
    stop_after = recipe.train.stop_after_steps
    return min(schedule_steps, stop_after) if stop_after else schedule_steps


def needs_eval(recipe: Recipe) -> bool:
    """Whether ``crlft eval`` is still to run for a complete run: prompts configured and no ``eval.json`` as new as
    the final export."""
    if not recipe.eval.prompts:
        return False
    output_dir = recipe.train.output_dir
    results = os.path.join(output_dir, EVAL_FILE)
    info = os.path.join(output_dir, ckpt.EXPORT_DIR, FINAL_EXPORT, ckpt.EXPORT_INFO_FILE)
    try:
        return os.path.getmtime(results) < os.path.getmtime(info)
    except OSError:
        return True


# Exit codes of `crlft preflight` that launch.sh reads.
START = 0
COMPLETE = 10
COMPLETE_EVAL_LEFT = 11


def preflight(recipe: Recipe, world_size: int | None, log=print) -> int:
    """``crlft preflight``: check the resume and report a complete run before any rank starts.

    Args:
        recipe: the recipe (``crlft prepare`` has run: the data fingerprint is read from the prepared dataset).
        world_size: ranks the launcher will start, or None when only the launcher can tell.
        log: where the one line about a complete run goes.

    Returns:
        ``START`` (launch the ranks), ``COMPLETE`` (nothing to do) or ``COMPLETE_EVAL_LEFT`` (only ``crlft eval``).

    Raises:
        ResumeRefused, UserError: as :func:`resume_point`.
    """
    data_hash = ckpt.data_fingerprint(recipe.data.output_dir)
    fingerprint = ckpt.resume_fingerprint(recipe, data_hash, world_size or 0)
    point = resume_point(recipe, fingerprint, world_size)
    message = complete_message(recipe, point, stop_at_from_checkpoint(recipe, point))
    if message is None:
        if point.checkpoint is not None:
            log(f"resuming from {point.checkpoint} (step {point.step})")
        return START
    log(message)
    return COMPLETE_EVAL_LEFT if needs_eval(recipe) else COMPLETE


__all__ = ["COMPLETE", "COMPLETE_EVAL_LEFT", "START", "ResumePoint", "ResumeRefused", "complete_message",
           "final_export_step", "needs_eval", "preflight", "resume_point", "stop_at_from_checkpoint"]
