"""Checkpoints: save (every rank), find the newest complete one, check that a recipe may resume from it.

Layout of a run directory (``train.output_dir``)::

    metrics.jsonl                       one JSON line per optimizer step
    checkpoints/step_00000040/          one complete checkpoint
        COMPLETE                        written last: the manifest (size and hash of every file, ``crlft.manifest``)
        trainer_state.json              step, loader position, resume fingerprint, resolved recipe, lr, ...
        rng_state_rank{R}.json          per-rank Python / numpy / torch RNG states
        hf/                             config.json, generation_config.json, tokenizer (with chat_template)
        mp_rank_00_model_states.pt      DeepSpeed: module weights (or ZeRO-3 shard metadata), scheduler, ...
        *_optim_states.pt               DeepSpeed: one ZeRO shard of the optimizer (fp32 master weights, moments)
    export/epoch_1/ ... export/final/   Hugging Face model directories (safetensors + tokenizer)

Why a crash at any moment leaves a resumable run is in ``docs/design.md`` ("Checkpoints").
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import time
from typing import Any

import torch

from crlft import manifest
from crlft.config import Recipe
from crlft.errors import UserError
from crlft.prepare import META_FILE
from crlft.rng import read_rng_file, rng_file, rng_state, rng_state_to_json, set_rng_state

logger = logging.getLogger("crlft.checkpoint")

CHECKPOINTS_DIR = "checkpoints"
EXPORT_DIR = "export"
COMPLETE_MARKER = manifest.COMPLETE_MARKER
DAMAGED_SUFFIX = ".damaged"
TRAINER_STATE_FILE = "trainer_state.json"
HF_FILES_DIR = "hf"
EXPORT_INFO_FILE = "crlft_export.json"
TRAINER_STATE_VERSION = 1

_STEP_DIR = re.compile(r"^step_(\d{8})$")


# --------------------------------------------------------------------------------------------------------------
# Names and discovery
# --------------------------------------------------------------------------------------------------------------


def checkpoints_dir(output_dir: str) -> str:
    """``output_dir/checkpoints``."""
    return os.path.join(output_dir, CHECKPOINTS_DIR)


def step_dir_name(step: int) -> str:
    """The directory name of the checkpoint after optimizer step ``step`` (``step_00000040``)."""
    return f"step_{step:08d}"


def is_complete(path: str) -> bool:
    """Whether ``path`` is a complete checkpoint directory (named ``step_N`` and holding ``COMPLETE``)."""
    return bool(_STEP_DIR.match(os.path.basename(os.path.normpath(path)))) and os.path.isfile(
        os.path.join(path, COMPLETE_MARKER)
    )


def list_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """The complete checkpoints of a run, oldest first, as ``(step, path)``; ``.tmp`` and unmarked dirs are skipped."""
    return _complete_in(checkpoints_dir(output_dir))


def _complete_in(root: str) -> list[tuple[int, str]]:
    """The complete ``step_N`` directories in ``root``, oldest first."""
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        match = _STEP_DIR.match(name)
        path = os.path.join(root, name)
        if match and os.path.isfile(os.path.join(path, COMPLETE_MARKER)):
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(output_dir: str) -> str | None:
    """The newest complete checkpoint of a run, or None."""
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def resolve_resume(resume: str, output_dir: str, where: str = "train.resume") -> str | None:
    """Which checkpoint ``train.resume`` asks for, verified against its manifest; every rank calls it.

    Args:
        resume: ``auto`` (the newest intact checkpoint of ``output_dir``, if any), ``off``, or a checkpoint path.
        output_dir: the run directory.
        where: the recipe location, for error messages.

    Returns:
        The checkpoint directory, or None to start from the base model.

    Raises:
        UserError: a path that is not a complete checkpoint, or a damaged one (naming the newest intact one
            beside it); ``auto`` where every checkpoint is damaged; ``off`` in a run directory that already holds
            checkpoints (they would be mixed with the new run's and pruned by ``keep_last``).
    """
    if resume == "auto":
        return _newest_intact(output_dir)
    if resume == "off":
        existing = list_checkpoints(output_dir)
        if existing:
            raise UserError(
                f"{where}: 'off', but {checkpoints_dir(output_dir)} already holds {len(existing)} checkpoint(s) of "
                "an earlier run; choose another train.output_dir, delete them, or resume with train.resume=auto"
            )
        return None
    path = os.path.expanduser(resume)
    if not os.path.isdir(path):
        raise UserError(f"{where}: checkpoint directory not found: {path}")
    if not is_complete(path):
        raise UserError(f"{where}: {path} is not a complete crlft checkpoint "
                        f"(a step_N directory with {COMPLETE_MARKER})")
    problems = verify_checkpoint(path)
    if problems:
        intact = _newest_intact_of(os.path.dirname(os.path.normpath(path)), before=path)
        raise UserError(
            f"{where}: {path} is damaged: {manifest.describe(problems)}. "
            + (f"The newest intact checkpoint beside it is {intact}; resume from that one (move the damaged one "
               "away for train.resume=auto)." if intact else "No intact checkpoint is beside it.")
        )
    newest = latest_checkpoint(output_dir)
    if newest is not None and os.path.realpath(newest) != os.path.realpath(path):
        # Continuing elsewhere than the newest checkpoint here would mix two timelines in one run directory (and
        # `resume: auto` would later pick the wrong one).
        raise UserError(
            f"{where}: {path} is not the newest checkpoint of train.output_dir, which holds {newest}; resume from "
            "another checkpoint into a new train.output_dir, or move the newer checkpoints away"
        )
    return path


def verify_checkpoint(checkpoint: str) -> list[str]:
    """What is wrong with a checkpoint (manifest, hashes, pickles; every rank checks a share); empty if intact."""
    dist = torch.distributed.is_available() and torch.distributed.is_initialized()
    rank, world_size = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if dist else (0, 1)
    if rank == 0 and not manifest.has_manifest(manifest.read_marker(checkpoint)):
        logger.warning(f"{checkpoint}: written without a manifest (crlft 0.1); its files are not verified, only "
                       "scanned for pickles that could run code")
    return manifest.gather_problems(manifest.find_problems(checkpoint, rank=rank, world_size=world_size))


def _newest_intact(output_dir: str) -> str | None:
    """``train.resume: auto``: the newest checkpoint that verifies; damaged newer ones are reported and renamed
    ``step_N.damaged`` (kept for inspection, never resumed or counted by ``keep_last``)."""
    found = list_checkpoints(output_dir)
    damaged = []
    for _step, path in reversed(found):
        problems = verify_checkpoint(path)
        if not problems:
            if damaged:
                logger.warning(f"resuming from {path}, the newest intact checkpoint")
            return path
        damaged.append(path)
        is_rank_zero = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
        if is_rank_zero:
            logger.warning(f"{path} is damaged, skipping it: {manifest.describe(problems)}; renamed to "
                           f"{os.path.basename(path)}{DAMAGED_SUFFIX} (delete it once you no longer need it)")
            os.replace(path, path + DAMAGED_SUFFIX)
    if damaged:
        raise UserError(f"{checkpoints_dir(output_dir)}: every checkpoint is damaged ({', '.join(damaged)}, renamed "
                        f"*{DAMAGED_SUFFIX}); nothing to resume from. Start a new run with train.resume=off in "
                        "another train.output_dir, or restore the files")
    return None


def _newest_intact_of(root: str, before: str) -> str | None:
    """The newest checkpoint in ``root`` older than ``before`` that verifies (nothing is renamed)."""
    limit = _STEP_DIR.match(os.path.basename(os.path.normpath(before)))
    for step, path in reversed(_complete_in(root)):
        if (limit is None or step < int(limit.group(1))) and not verify_checkpoint(path):
            return path
    return None


def read_trainer_state(checkpoint: str) -> dict[str, Any]:
    """The ``trainer_state.json`` of a checkpoint.

    Raises:
        UserError: not a crlft checkpoint, or one written by an incompatible crlft.
    """
    path = os.path.join(checkpoint, TRAINER_STATE_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            state = json.load(f)
    except FileNotFoundError:
        raise UserError(f"{checkpoint}: not a crlft checkpoint (no {TRAINER_STATE_FILE})") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
    if state.get("version") != TRAINER_STATE_VERSION:
        raise UserError(f"{path}: trainer state version {state.get('version')!r}, this crlft reads "
                        f"{TRAINER_STATE_VERSION}")
    return state


# --------------------------------------------------------------------------------------------------------------
# Resume compatibility
# --------------------------------------------------------------------------------------------------------------


def check_resume_fingerprint(saved: dict[str, Any], current: dict[str, Any], checkpoint: str) -> None:
    """Refuse to resume when something that decides the batches or the update changed since the checkpoint.

    Args:
        saved: the checkpoint's ``trainer_state["fingerprint"]``.
        current: the fingerprint of the run about to start (same keys).
        checkpoint: the checkpoint path, for the message.

    Raises:
        UserError: naming every field that changed, its old and its new value.
    """
    changed = [
        f"{key}: checkpoint {saved.get(key)!r}, now {current.get(key)!r}"
        for key in sorted(set(saved) | set(current))
        if saved.get(key) != current.get(key)
    ]
    if changed:
        raise UserError(
            f"cannot resume from {checkpoint}: the run changed in ways that alter the batches or the updates:\n  "
            + "\n  ".join(changed)
            + "\nRestore those settings, or start a new run in another train.output_dir."
        )


# --------------------------------------------------------------------------------------------------------------
# Save and load (every rank calls these)
# --------------------------------------------------------------------------------------------------------------


def write_json(path: str, data: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.flush()
        os.fsync(f.fileno())


def save_hf_files(model: Any, tokenizer: Any, template: Any, out_dir: str, max_context: int | None = None) -> None:
    """Write what an export needs besides the weights: config, generation config (eos = end of turn), tokenizer.

    ``config.json`` gets ``eos_token_id`` = the end-of-turn id and, when ``max_context`` is smaller than the base's,
    ``max_position_embeddings`` = ``max_context``, as OpenChat's releases have them (so a consumer that reads only
    config.json stops at the end of a turn and does not promise a context the model never saw).

    Args:
        model: the Hugging Face model (its config; the weights are not written).
        tokenizer: the training tokenizer (from ``crlft.tokenizer.load_tokenizer``: chat_template, eos = end of turn).
        template: the ``crlft.templates.Template``.
        out_dir: the directory to fill.
        max_context: ``model.max_context`` of the recipe (None: keep the base's ``max_position_embeddings``).
    """
    os.makedirs(out_dir, exist_ok=True)
    end_of_turn_id = tokenizer.convert_tokens_to_ids(template.eot)
    config = copy.deepcopy(model.config)
    config.use_cache = True  # training turns the KV cache off; generation wants it
    config.eos_token_id = end_of_turn_id
    base_positions = getattr(config, "max_position_embeddings", None)
    if max_context is not None and base_positions is not None and max_context < base_positions:
        config.max_position_embeddings = max_context
    config.save_pretrained(out_dir)
    from transformers import GenerationConfig  # here: `crlft preflight` reads checkpoints without transformers

    generation = copy.deepcopy(model.generation_config) if model.generation_config is not None else GenerationConfig()
    generation.bos_token_id = tokenizer.bos_token_id
    generation.eos_token_id = end_of_turn_id  # stop at the end of the turn
    generation.pad_token_id = tokenizer.pad_token_id
    generation.use_cache = True
    generation.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def save_checkpoint(
    engine: Any,
    output_dir: str,
    step: int,
    trainer_state: dict[str, Any],
    hf_files: Any,
    keep_last: int,
    rank: int,
    barrier: Any,
    exclude_frozen: bool = False,
) -> str:
    """Write the checkpoint after optimizer step ``step``; every rank must call it.

    Args:
        engine: the DeepSpeed engine.
        output_dir: the run directory.
        step: optimizer steps done.
        trainer_state: JSON-able trainer state (written by rank 0).
        hf_files: ``callable(dir)`` writing the ``hf/`` files (called on rank 0), see :func:`save_hf_files`.
        keep_last: complete checkpoints to keep; older ones are deleted after this one is complete.
        rank: this process's global rank.
        barrier: ``callable()`` synchronising all ranks.
        exclude_frozen: leave out parameters that do not train (a LoRA run's base, reloaded from ``model.base``).

    Returns:
        The complete checkpoint's path.
    """
    root = checkpoints_dir(output_dir)
    name = step_dir_name(step)
    final = os.path.join(root, name)
    tmp = final + ".tmp"
    world_size = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # left by a crash during an earlier save of this step
    barrier()
    frozen = {"exclude_frozen_parameters": True} if exclude_frozen else {}  # (DeepSpeed's default: False)
    with _disk_full_reported(tmp, output_dir):
        engine.save_checkpoint(root, tag=os.path.basename(tmp), client_state={}, save_latest=False, **frozen)
        write_json(rng_file(tmp, rank), rng_state_to_json(rng_state()))
        if rank == 0:
            hf_files(os.path.join(tmp, HF_FILES_DIR))
            write_json(os.path.join(tmp, TRAINER_STATE_FILE), {"version": TRAINER_STATE_VERSION, **trainer_state})
    barrier()  # every rank's shard and RNG file is written
    with _disk_full_reported(tmp, output_dir):
        manifest.write_partial_manifest(tmp, rank, world_size)  # fsync everything, hash this rank's share
    barrier()
    if rank == 0:
        with _disk_full_reported(tmp, output_dir):
            marker = {"step": step, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **manifest.build_manifest(tmp)}
            write_json(os.path.join(tmp, COMPLETE_MARKER), marker)
        if os.path.isdir(final):  # a step re-done after resuming from an older checkpoint path
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        _prune(output_dir, step, keep_last)
    barrier()
    return final


def _prune(output_dir: str, step: int, keep_last: int) -> None:
    """Keep the newest ``keep_last - 1`` older checkpoints that pass the quick check (files present, sizes as in
    the manifest) besides the new one; delete every checkpoint older than the oldest kept."""
    older = [(s, path) for s, path in list_checkpoints(output_dir) if s < step]
    intact = [s for s, path in older if not manifest.find_problems(path, deep=False)]
    kept = intact[len(intact) - (keep_last - 1):] if keep_last > 1 else []
    oldest_kept = kept[0] if kept else step
    for s, path in older:
        if s < oldest_kept:
            shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def _disk_full_reported(path: str, output_dir: str):
    """Turn a full disk while writing under ``path`` into a UserError naming it and the last good checkpoint."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        if not manifest.is_disk_full(e, os.path.dirname(path)):
            raise
        last = latest_checkpoint(output_dir)
        raise UserError(
            f"no space left on device at {path} while saving a checkpoint ({type(e).__name__}: {str(e)[:120]}). "
            + (f"The last good checkpoint is {last}." if last else "No earlier checkpoint exists.")
            + f" Free space (the partial {os.path.basename(path)} can be deleted) and run again."
        ) from None


def load_checkpoint(engine: Any, checkpoint: str, rank: int,
                    deepspeed_location: tuple[str, str] | None = None, strict: bool = True) -> dict[str, Any]:
    """Load model, optimizer and scheduler states into ``engine`` and this rank's RNG states; every rank calls it.

    Args:
        engine: the DeepSpeed engine.
        checkpoint: the crlft checkpoint directory.
        rank: this process's global rank.
        deepspeed_location: ``(load_dir, tag)`` of DeepSpeed's states when they are read from elsewhere (the
            universal form of a checkpoint written by another number of ranks, ``crlft.reshard``).
        strict: False accepts a checkpoint without the frozen parameters (``save_checkpoint(exclude_frozen=True)``).

    Returns:
        The checkpoint's trainer state.

    Raises:
        UserError: a checkpoint DeepSpeed cannot load (e.g. written by another number of ranks).
    """
    state = read_trainer_state(checkpoint)
    root, tag = deepspeed_location or os.path.split(os.path.normpath(checkpoint))
    lenient = {} if strict else {"load_module_strict": False}  # (DeepSpeed's default: strict)
    load_path, _ = engine.load_checkpoint(root, tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True,
                                          **lenient)
    if load_path is None:
        raise UserError(f"{checkpoint}: DeepSpeed could not load this checkpoint")
    rng = read_rng_file(checkpoint, rank)
    if rng is not None:
        set_rng_state(rng)
    return state


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------------------------
# Resume fingerprint
# --------------------------------------------------------------------------------------------------------------


def data_fingerprint(data_dir: str) -> str:
    """A hash of what the prepared dataset was made from (its ``crlft_meta.json`` inputs).

    File modification times and the crlft version are left out: touching a file, or upgrading crlft, without
    changing the rows must not block a resume (the loader also checks the rows' lengths). So are the held-out files
    (``data.eval_sources``): they change only the eval split, which the trainer tells apart by its own hash
    (``eval_split``); ``data.eval_fraction`` and ``eval_seed`` stay, because they choose the training rows too.
    """
    with open(os.path.join(data_dir, META_FILE), encoding="utf-8") as f:
        inputs = json.load(f).get("inputs", {})
    inputs = dict(inputs)
    inputs.pop("crlft_version", None)
    for source in inputs.get("sources", []):
        if isinstance(source.get("file"), dict):
            source["file"].pop("mtime_ns", None)
    held_out = inputs.pop("eval", None)
    if isinstance(held_out, dict) and held_out.get("fraction"):
        inputs["eval"] = {"fraction": held_out["fraction"], "seed": held_out.get("seed")}
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


def resume_fingerprint(recipe: Recipe, data_hash: str, world_size: int) -> dict[str, Any]:
    """What must not change between a checkpoint and the run resuming from it.

    The data, the global batch (tokens per row and rows per step = ranks × accumulation: the plan and the loss
    depend on the product only, so R × A may resume as R' × A' with R'·A' = R·A, ``crlft.reshard``), the order
    (seed), what a token means (template, dtype) and everything that shapes the update (schedule, optimizer
    settings, clipping, loss normalisation, the schedule's length ``max_steps``, ``model.lora``). Free to change:
    ``stop_after_steps``, ``save_every_steps``, ``keep_last``, exports, logging, the base path.
    """
    t = recipe.train
    return {
        "data": data_hash,
        "template": recipe.model.template,
        "dtype": recipe.model.dtype,
        "rows_per_step": world_size * t.grad_accum,
        "batch_max_len": t.batch_max_len,
        "seed": t.seed,
        "epochs": t.epochs,
        "max_steps": t.max_steps,
        "lr": t.lr,
        "lr_warmup_ratio": t.lr_warmup_ratio,
        "lr_min_ratio": t.lr_min_ratio,
        "weight_decay": t.weight_decay,
        "betas": list(t.betas),
        "eps": t.eps,
        "grad_clip": t.grad_clip,
        "loss_normalization": t.loss_normalization,
        "zero_stage": recipe.deepspeed.zero_stage,
        **({"lora": dataclasses.asdict(recipe.model.lora)} if recipe.model.lora is not None else {}),
    }


__all__ = [
    "DAMAGED_SUFFIX",
    "data_fingerprint",
    "resume_fingerprint",
    "CHECKPOINTS_DIR",
    "COMPLETE_MARKER",
    "EXPORT_DIR",
    "TRAINER_STATE_FILE",
    "check_resume_fingerprint",
    "checkpoints_dir",
    "is_complete",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "read_trainer_state",
    "resolve_resume",
    "rng_state",
    "save_checkpoint",
    "save_hf_files",
    "set_rng_state",
    "step_dir_name",
    "verify_checkpoint",
]
