"""Checkpoints (save, find the newest complete one, resume) and export to a Hugging Face model directory.

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

Crash safety. A checkpoint is written as ``step_N.tmp`` by every rank (DeepSpeed's ``save_checkpoint``), then
rank 0 adds ``COMPLETE`` and renames the directory to ``step_N`` once every rank is done (a barrier). A crash at
any moment therefore leaves either the previous complete checkpoints untouched plus a ``.tmp`` directory that is
ignored (and replaced by the next save of that step), or the new complete one. Older checkpoints beyond
``keep_last`` are deleted only after the new one is complete. Exports are written the same way
(``NAME.tmp`` → ``NAME``).

Export. ``export_checkpoint`` consolidates the weights from the checkpoint's ZeRO shards with DeepSpeed's
``zero_to_fp32`` (lazily: the fp32 master weights only, one tensor at a time, no optimizer moments), casts them to
the training dtype and writes ``model.safetensors`` (sharded when large) next to the ``hf/`` files. The trainer
exports from the checkpoint it just wrote, and ``crlft export CHECKPOINT OUT`` runs the very same function, so
both give identical directories; it needs neither GPUs nor the ranks that trained.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import random
import re
import shutil
import time
from typing import Any

import numpy as np
import torch

from crlft.errors import UserError

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


def _write_json(path: str, data: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.flush()
        os.fsync(f.fileno())


def save_hf_files(model: Any, tokenizer: Any, template: Any, out_dir: str) -> None:
    """Write what an export needs besides the weights: config, generation config (eos = end of turn), tokenizer.

    Args:
        model: the Hugging Face model (its config; the weights are not written).
        tokenizer: the training tokenizer (from ``crlft.templates.load_tokenizer``: chat_template, eos = end of turn).
        template: the ``crlft.templates.Template``.
        out_dir: the directory to fill.
    """
    from transformers import GenerationConfig

    os.makedirs(out_dir, exist_ok=True)
    config = copy.deepcopy(model.config)
    config.use_cache = True  # training turns the KV cache off; generation wants it
    config.save_pretrained(out_dir)
    generation = copy.deepcopy(model.generation_config) if model.generation_config is not None else GenerationConfig()
    generation.bos_token_id = tokenizer.bos_token_id
    generation.eos_token_id = tokenizer.convert_tokens_to_ids(template.eot)  # stop at the end of the turn
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
    engine.save_checkpoint(root, tag=os.path.basename(tmp), client_state={}, save_latest=False)
    torch.save(rng_state(), _rng_file(tmp, rank))
    if rank == 0:
        hf_files(os.path.join(tmp, HF_FILES_DIR))
        _write_json(os.path.join(tmp, TRAINER_STATE_FILE), {"version": TRAINER_STATE_VERSION, **trainer_state})
    barrier()  # every rank's shard and RNG file is written
    if rank == 0:
        _write_json(os.path.join(tmp, COMPLETE_MARKER), {"step": step, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        if os.path.isdir(final):  # a step re-done after resuming from an older checkpoint path
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        older = [path for s, path in list_checkpoints(output_dir) if s < step]
        for old in older[: max(len(older) - (keep_last - 1), 0)]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def load_checkpoint(engine: Any, checkpoint: str, rank: int) -> dict[str, Any]:
    """Load model, optimizer and scheduler states into ``engine`` and this rank's RNG states; every rank calls it.

    Returns:
        The checkpoint's trainer state.

    Raises:
        UserError: a checkpoint DeepSpeed cannot load (e.g. written by another number of ranks).
    """
    state = read_trainer_state(checkpoint)
    root, tag = os.path.split(os.path.normpath(checkpoint))
    load_path, _ = engine.load_checkpoint(root, tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True)
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
# Export
# --------------------------------------------------------------------------------------------------------------

_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


def consolidated_state_dict(checkpoint: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The full model weights of a checkpoint, consolidated from its ZeRO shards, in ``dtype``, Hugging Face names.

    ZeRO stages 1-3: the fp32 master weights via DeepSpeed's ``zero_to_fp32`` (lazy: optimizer moments are never
    loaded). Stage 0: the module weights DeepSpeed saved.
    """
    state = read_trainer_state(checkpoint)
    prefix = state.get("param_prefix", "")
    root, tag = os.path.split(os.path.normpath(checkpoint))
    optim_files = [f for f in os.listdir(checkpoint) if f.endswith("_optim_states.pt")]
    if optim_files and state.get("zero_stage", 1) > 0:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        # zero_to_fp32 prints its progress; the caller logs one line instead.
        with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull), contextlib.redirect_stderr(devnull):
            lazy = get_fp32_state_dict_from_zero_checkpoint(root, tag=tag, lazy_mode=True)
        tensors = {}
        shared: dict[int, str] = {}
        for name, lazy_tensor in lazy.items():
            key = name[len(prefix):] if name.startswith(prefix) else name
            if id(lazy_tensor) in shared:  # tied weights stay one tensor
                tensors[key] = tensors[shared[id(lazy_tensor)]]
                continue
            shared[id(lazy_tensor)] = key
            tensors[key] = lazy_tensor.contiguous().to(dtype)
        return tensors
    module = torch.load(os.path.join(checkpoint, "mp_rank_00_model_states.pt"), map_location="cpu",
                        weights_only=False)["module"]
    return {(k[len(prefix):] if k.startswith(prefix) else k): v.to(dtype) for k, v in module.items()}


def export_checkpoint(checkpoint: str, out_dir: str, dtype: str | None = None, log=print) -> str:
    """Write a Hugging Face model directory from a crlft checkpoint.

    The directory holds ``model.safetensors`` (sharded above 5 GB), ``config.json``, ``generation_config.json``
    (eos = the template's end-of-turn token), the tokenizer with the template's ``chat_template``, and
    ``crlft_export.json`` (where it came from). It is written as ``OUT.tmp`` and renamed, so it is never half
    there; an existing ``OUT`` is replaced.

    Args:
        checkpoint: a complete checkpoint directory (``.../checkpoints/step_N``).
        out_dir: the directory to write.
        dtype: ``bfloat16``, ``float32`` or ``float16``; default: the training dtype.
        log: where the progress line goes.

    Returns:
        ``out_dir``.

    Raises:
        UserError: not a complete crlft checkpoint, or an unknown dtype.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    if not is_complete(checkpoint):
        raise UserError(f"{checkpoint}: not a complete crlft checkpoint (a step_N directory with {COMPLETE_MARKER})")
    state = read_trainer_state(checkpoint)
    dtype_name = dtype or state.get("dtype", "bfloat16")
    if dtype_name not in _DTYPES:
        raise UserError(f"unknown dtype {dtype_name!r}; one of {', '.join(_DTYPES)}")
    torch_dtype = _DTYPES[dtype_name]
    t0 = time.perf_counter()
    hf_dir = os.path.join(checkpoint, HF_FILES_DIR)
    tensors = consolidated_state_dict(checkpoint, torch_dtype)
    num_params = sum(t.numel() for t in {id(t): t for t in tensors.values()}.values())

    out_dir = os.path.normpath(out_dir)
    tmp = out_dir + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(hf_dir, tmp)
    config = AutoConfig.from_pretrained(hf_dir)
    config.dtype = torch_dtype
    with torch.device("meta"):  # only for save_pretrained's bookkeeping: the weights come from `tensors`
        skeleton = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    missing = sorted(set(skeleton.state_dict()) - set(tensors))
    unexpected = sorted(set(tensors) - set(skeleton.state_dict()))
    if missing or unexpected:
        raise RuntimeError(f"{checkpoint}: weights do not match the model: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    with open(os.devnull, "w") as devnull, contextlib.redirect_stderr(devnull):  # its progress bar
        skeleton.save_pretrained(tmp, state_dict=dict(tensors), max_shard_size="5GB")
    _write_json(os.path.join(tmp, EXPORT_INFO_FILE), {
        "checkpoint": os.path.abspath(checkpoint),
        "step": state.get("step"),
        "epoch": state.get("epoch_progress"),
        "dtype": dtype_name,
        "template": state.get("template"),
    })
    _readable_by_all(tmp)
    if os.path.isdir(out_dir):
        shutil.rmtree(out_dir)
    os.makedirs(os.path.dirname(os.path.abspath(out_dir)), exist_ok=True)
    os.replace(tmp, out_dir)
    log(f"exported {checkpoint} → {out_dir} ({num_params / 1e6:.1f}M parameters, {dtype_name}, "
        f"{time.perf_counter() - t0:.1f}s)")
    return out_dir


def _readable_by_all(directory: str) -> None:
    """Give files the usual mode (0644 under the umask): some writers create them 0600 through temporary files."""
    umask = os.umask(0)
    os.umask(umask)
    for name in os.listdir(directory):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            os.chmod(path, 0o666 & ~umask)


def link_or_copy_tree(src: str, dst: str) -> None:
    """Copy a directory of files written once (an export) as hard links where possible, else as copies."""

    def link(a: str, b: str) -> None:
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    tmp = os.path.normpath(dst) + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp, copy_function=link)
    if os.path.isdir(dst):
        shutil.rmtree(dst)
    os.replace(tmp, dst)


def export_main(argv: list[str]) -> int:
    """``crlft export CHECKPOINT OUT [--dtype D]``: a Hugging Face model directory from any crlft checkpoint.

    ``CHECKPOINT`` may also be a run directory (``train.output_dir``): its newest complete checkpoint is used.
    """
    parser = argparse.ArgumentParser(prog="crlft export", description=export_main.__doc__)
    parser.add_argument("checkpoint", help="a checkpoint directory (run/checkpoints/step_N) or a run directory")
    parser.add_argument("out", help="the Hugging Face model directory to write")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default=None, help="default: the training dtype")
    args = parser.parse_args(argv)
    checkpoint = args.checkpoint
    if not is_complete(checkpoint) and os.path.isdir(checkpoints_dir(checkpoint)):
        latest = latest_checkpoint(checkpoint)
        if latest is None:
            raise UserError(f"{checkpoint}: the run has no complete checkpoint yet")
        checkpoint = latest
    export_checkpoint(checkpoint, args.out, dtype=args.dtype)
    return 0


__all__ = [
    "CHECKPOINTS_DIR",
    "COMPLETE_MARKER",
    "EXPORT_DIR",
    "TRAINER_STATE_FILE",
    "check_resume_fingerprint",
    "checkpoints_dir",
    "consolidated_state_dict",
    "export_checkpoint",
    "export_main",
    "is_complete",
    "latest_checkpoint",
    "link_or_copy_tree",
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
