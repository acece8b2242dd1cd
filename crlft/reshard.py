"""Resuming on another number of ranks: rows per step decide the run, DeepSpeed's universal checkpoint reshards ZeRO.

The packing plan is made for ``ranks × grad_accum`` virtual ranks and the loss is normalised over the whole step, so
a checkpoint written by R ranks × A micro-batches continues exactly on R' × A' whenever R'·A' = R·A (same batches,
losses and weights). What does depend on R is how ZeRO partitions the fp32 master weights and Adam moments. We use
DeepSpeed's own universal checkpoint (``deepspeed.checkpoint.ds_to_universal``, then ``checkpoint.load_universal``)
rather than a consolidation of our own: it knows DeepSpeed's flat-buffer layout, padding and alignment for ZeRO-1/2
and ZeRO-3 and follows it across DeepSpeed versions; ours would re-implement that layout and silently break with it.
The conversion runs once, on global rank 0, into ``checkpoints/.universal/step_N`` beside the checkpoint (which is
left as it was), and is removed after every rank has loaded it.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
from typing import Any

from crlft.errors import UserError

logger = logging.getLogger(__name__)

UNIVERSAL_DIR = ".universal"
_DONE_MARKER = "CONVERTED"


def saved_rows_per_step(fingerprint: dict[str, Any]) -> int | None:
    """Rows per step of a saved fingerprint (older checkpoints recorded ``world_size`` and ``grad_accum``)."""
    if "rows_per_step" in fingerprint:
        return int(fingerprint["rows_per_step"])
    if "world_size" in fingerprint:
        return int(fingerprint["world_size"]) * int(fingerprint.get("grad_accum", 1))
    return None


def normalise_fingerprint(fingerprint: dict[str, Any]) -> dict[str, Any]:
    """A saved fingerprint in today's form: ``rows_per_step`` in place of ``world_size`` and ``grad_accum``."""
    rows = saved_rows_per_step(fingerprint)
    out = {k: v for k, v in fingerprint.items() if k not in ("world_size", "grad_accum")}
    if rows is not None:
        out["rows_per_step"] = rows
    return out


def check_rows_per_step(trainer_state: dict[str, Any], world_size: int, grad_accum: int, checkpoint: str,
                        where: str = "train.grad_accum") -> None:
    """Refuse a resume whose rows per step (ranks × ``grad_accum``) differ from the checkpoint's.

    Args:
        trainer_state: the checkpoint's ``trainer_state.json``.
        world_size: ranks of the run about to start.
        grad_accum: its ``train.grad_accum``.
        checkpoint: the checkpoint path, for the message.
        where: the recipe location of ``train.grad_accum``.

    Raises:
        UserError: naming both products and the ``grad_accum`` that would fit on ``world_size`` ranks (or that none
            does, and which rank counts would).
    """
    rows = saved_rows_per_step(trainer_state.get("fingerprint", {}))
    now = world_size * grad_accum
    if rows is None or rows == now:
        return
    if rows % world_size == 0:
        fix = f"set train.grad_accum={rows // world_size} ({world_size} ranks × {rows // world_size} = {rows})"
    else:
        fits = [r for r in range(1, rows + 1) if rows % r == 0]
        fix = (f"no train.grad_accum fits {world_size} ranks; run on {', '.join(map(str, fits))} ranks with "
               f"train.grad_accum = {rows} / ranks")
    raise UserError(
        f"{where}: cannot resume from {checkpoint}: it was written with {rows} rows per step "
        f"({_ranks_times_accum(trainer_state)}), this run has {now} ({world_size} ranks × grad_accum "
        f"{grad_accum}); the batches, the losses and the learning rate follow from rows per step. To continue "
        f"exactly, {fix}; or start a new run in another train.output_dir."
    )


def _ranks_times_accum(trainer_state: dict[str, Any]) -> str:
    saved_accum = trainer_state.get("recipe", {}).get("train", {}).get("grad_accum", "?")
    return f"{trainer_state.get('world_size', '?')} ranks × grad_accum {saved_accum}"


def check_resume(recipe: Any, fingerprint: dict[str, Any], checkpoint: str, world_size: int) -> bool:
    """Whether the run may resume from ``checkpoint`` (else ``UserError``), and whether its ZeRO state needs resharding.

    Args:
        recipe: the run's ``crlft.config.Recipe``.
        fingerprint: the run's ``crlft.checkpoint.resume_fingerprint``.
        checkpoint: the checkpoint chosen by ``train.resume``.
        world_size: ranks of this run.

    Returns:
        True when the checkpoint was written by another number of ranks (same rows per step).

    Raises:
        UserError: other rows per step (:func:`check_rows_per_step`), or any other change that matters.
    """
    from crlft.checkpoint import check_resume_fingerprint, read_trainer_state

    state = read_trainer_state(checkpoint)
    check_rows_per_step(state, world_size, recipe.train.grad_accum, checkpoint, recipe.where("train", "grad_accum"))
    check_resume_fingerprint(normalise_fingerprint(state["fingerprint"]), fingerprint, checkpoint)
    resharding = needs_reshard(state, world_size)
    if resharding:
        logger.info(f"resume: {checkpoint} was written by {state['world_size']} ranks, this run has {world_size}; "
                    "its ZeRO state is resharded through DeepSpeed's universal checkpoint")
    return resharding


def needs_reshard(trainer_state: dict[str, Any], world_size: int) -> bool:
    """Whether a checkpoint's ZeRO shards were written by another number of ranks than ``world_size``."""
    return int(trainer_state.get("world_size", world_size)) != world_size


def universal_load_config(ds_config: dict[str, Any]) -> dict[str, Any]:
    """``ds_config`` with DeepSpeed's ``checkpoint.load_universal`` on (it must be set before the engine exists)."""
    out = dict(ds_config)
    out["checkpoint"] = {**ds_config.get("checkpoint", {}), "load_universal": True}
    return out


def universal_dir(checkpoint: str) -> str:
    """Where the universal form of ``checkpoints/step_N`` goes: ``checkpoints/.universal/step_N``."""
    root, tag = os.path.split(os.path.normpath(checkpoint))
    return os.path.join(root, UNIVERSAL_DIR, tag)


def convert_to_universal(checkpoint: str, rank: int, barrier: Any, workers: int = 1) -> tuple[str, str]:
    """Write the universal form of ``checkpoint`` on global rank 0 (once); every rank calls it.

    Args:
        checkpoint: a complete crlft checkpoint directory.
        rank: this process's global rank.
        barrier: ``callable()`` synchronising all ranks (the others wait for rank 0's conversion).
        workers: processes DeepSpeed's converter uses to extract and merge the shards.

    Returns:
        ``(load_dir, tag)`` for ``engine.load_checkpoint`` with ``load_universal`` on.

    Raises:
        UserError: DeepSpeed's converter failed on this checkpoint.
    """
    out = universal_dir(checkpoint)
    error = None
    if rank == 0 and not os.path.isfile(os.path.join(out, _DONE_MARKER)):
        from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

        shutil.rmtree(out, ignore_errors=True)  # a conversion interrupted earlier
        args = argparse.Namespace(input_folder=checkpoint, output_folder=out, num_extract_workers=workers,
                                  num_merge_workers=workers, keep_temp_folder=False, strict=True,
                                  # DeepSpeed writes this key only for Megatron clients; its default is ours.
                                  inject_missing_state=True)
        try:
            ds_to_universal(args)
            with open(os.path.join(out, _DONE_MARKER), "w", encoding="utf-8") as f:
                f.write("ok\n")
        except Exception as e:  # noqa: BLE001 - reported to every rank below
            error = e
    barrier()
    if error is not None or not os.path.isfile(os.path.join(out, _DONE_MARKER)):
        raise UserError(f"{checkpoint}: DeepSpeed's universal-checkpoint conversion failed"
                        + (f": {error}" if error is not None else " on rank 0 (see its log)"))
    return os.path.split(out)


def remove_universal(checkpoint: str, rank: int, barrier: Any) -> None:
    """Delete the universal form once every rank has loaded it (it is as large as the optimizer state)."""
    barrier()
    if rank == 0:
        shutil.rmtree(universal_dir(checkpoint), ignore_errors=True)
        parent = os.path.dirname(universal_dir(checkpoint))
        # ds_to_universal also writes `latest_universal` beside its output; nothing else lives in .universal.
        if os.path.isdir(parent) and set(os.listdir(parent)) <= {"latest_universal"}:
            shutil.rmtree(parent, ignore_errors=True)


__all__ = [
    "check_resume",
    "check_rows_per_step",
    "convert_to_universal",
    "needs_reshard",
    "normalise_fingerprint",
    "remove_universal",
    "saved_rows_per_step",
    "universal_dir",
    "universal_load_config",
]
