"""Checkpoints: save (every rank), find the newest complete one, check that a recipe may resume from it.

Layout of a run directory (``train.output_dir``)::

    metrics.jsonl                       one JSON line per optimizer step
    checkpoints/step_00000040/          one complete checkpoint
        COMPLETE                        written last; a directory without it is never resumed from
        trainer_state.json              step, loader position, resume fingerprint, resolved recipe, lr, ...
        rng_state_rank{R}.pt            per-rank Python / numpy / torch RNG states
        hf/                             config.json, generation_config.json, tokenizer (with chat_template)
        mp_rank_00_model_states.pt      DeepSpeed: module weights (or ZeRO-3 shard metadata), scheduler, ...
        *_optim_states.pt               DeepSpeed: one ZeRO shard of the optimizer (fp32 master weights, moments)
    export/epoch_1/ ... export/final/   Hugging Face model directories (safetensors + tokenizer)

Why a crash at any moment leaves a resumable run is in ``docs/design.md`` ("Checkpoints").
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import random
import re
import shutil
import time
from typing import Any

import numpy as np
import torch
from transformers import GenerationConfig

from crlft.config import Recipe
from crlft.errors import UserError
from crlft.prepare import META_FILE

CHECKPOINTS_DIR = "checkpoints"
EXPORT_DIR = "export"
COMPLETE_MARKER = "COMPLETE"
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
    root = checkpoints_dir(output_dir)
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
    """Which checkpoint ``train.resume`` asks for.

    Args:
        resume: ``auto`` (the newest complete checkpoint of ``output_dir``, if any), ``off``, or a checkpoint path.
        output_dir: the run directory.
        where: the recipe location, for error messages.

    Returns:
        The checkpoint directory, or None to start from the base model.

    Raises:
        UserError: a path that is not a complete checkpoint; ``off`` in a run directory that already holds
            checkpoints (they would be mixed with the new run's and pruned by ``keep_last``).
    """
    if resume == "auto":
        return latest_checkpoint(output_dir)
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
    newest = latest_checkpoint(output_dir)
    if newest is not None and os.path.realpath(newest) != os.path.realpath(path):
        # Continuing elsewhere than the newest checkpoint here would mix two timelines in one run directory (and
        # `resume: auto` would later pick the wrong one).
        raise UserError(
            f"{where}: {path} is not the newest checkpoint of train.output_dir, which holds {newest}; resume from "
            "another checkpoint into a new train.output_dir, or move the newer checkpoints away"
        )
    return path


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
# RNG
# --------------------------------------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """This process's Python, numpy and torch (CPU and CUDA) RNG states."""
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore states from :func:`rng_state`."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _rng_file(checkpoint: str, rank: int) -> str:
    return os.path.join(checkpoint, f"rng_state_rank{rank}.pt")


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
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # left by a crash during an earlier save of this step
    barrier()
    frozen = {"exclude_frozen_parameters": True} if exclude_frozen else {}  # (DeepSpeed's default: False)
    engine.save_checkpoint(root, tag=os.path.basename(tmp), client_state={}, save_latest=False, **frozen)
    torch.save(rng_state(), _rng_file(tmp, rank))
    if rank == 0:
        hf_files(os.path.join(tmp, HF_FILES_DIR))
        write_json(os.path.join(tmp, TRAINER_STATE_FILE), {"version": TRAINER_STATE_VERSION, **trainer_state})
    barrier()  # every rank's shard and RNG file is written
    if rank == 0:
        write_json(os.path.join(tmp, COMPLETE_MARKER), {"step": step, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        if os.path.isdir(final):  # a step re-done after resuming from an older checkpoint path
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        older = [path for s, path in list_checkpoints(output_dir) if s < step]
        for old in older[: max(len(older) - (keep_last - 1), 0)]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def load_checkpoint(engine: Any, checkpoint: str, rank: int, strict: bool = True) -> dict[str, Any]:
    """Load model, optimizer and scheduler states into ``engine`` and this rank's RNG states; every rank calls it.

    ``strict=False`` accepts a checkpoint without the frozen parameters (``save_checkpoint(exclude_frozen=True)``).

    Returns:
        The checkpoint's trainer state.

    Raises:
        UserError: a checkpoint DeepSpeed cannot load (e.g. written by another number of ranks).
    """
    state = read_trainer_state(checkpoint)
    root, tag = os.path.split(os.path.normpath(checkpoint))
    lenient = {} if strict else {"load_module_strict": False}  # (DeepSpeed's default: strict)
    load_path, _ = engine.load_checkpoint(root, tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True,
                                          **lenient)
    if load_path is None:
        raise UserError(f"{checkpoint}: DeepSpeed could not load this checkpoint")
    rng_file = _rng_file(checkpoint, rank)
    if os.path.isfile(rng_file):
        set_rng_state(torch.load(rng_file, weights_only=False))
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
    changing the rows must not block a resume (the loader also checks the rows' lengths).
    """
    with open(os.path.join(data_dir, META_FILE), encoding="utf-8") as f:
        inputs = json.load(f).get("inputs", {})
    inputs = dict(inputs)
    inputs.pop("crlft_version", None)
    for source in inputs.get("sources", []):
        if isinstance(source.get("file"), dict):
            source["file"].pop("mtime_ns", None)
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


def resume_fingerprint(recipe: Recipe, data_hash: str, world_size: int) -> dict[str, Any]:
    """What must not change between a checkpoint and the run resuming from it.

    The data, the global batch (rows per rank, ranks, accumulation), the order (seed), what a token means
    (template, dtype) and everything that shapes the update (schedule, optimizer settings, clipping, loss
    normalisation, ``model.lora``). Free to change: ``max_steps``, ``save_every_steps``, ``keep_last``, logging,
    the base path.
    """
    t = recipe.train
    return {
        "data": data_hash,
        "template": recipe.model.template,
        "dtype": recipe.model.dtype,
        "world_size": world_size,
        "batch_max_len": t.batch_max_len,
        "grad_accum": t.grad_accum,
        "seed": t.seed,
        "epochs": t.epochs,
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
]
