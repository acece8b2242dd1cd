"""Export: a Hugging Face model directory (safetensors + tokenizer + chat template) from any crlft checkpoint.

The weights are consolidated from the ZeRO shards with DeepSpeed's ``zero_to_fp32`` (lazily, one tensor at a time);
the trainer and ``crlft export`` run the same function, so both give identical directories.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time

import torch
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
from transformers import AutoConfig, AutoModelForCausalLM

from crlft import lora
from crlft.checkpoint import (
    COMPLETE_MARKER,
    EXPORT_INFO_FILE,
    HF_FILES_DIR,
    is_complete,
    read_trainer_state,
    write_json,
)
from crlft.errors import UserError
from crlft.manifest import describe, find_problems, load_weights_only
from crlft.model import DTYPES


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
    module = load_weights_only(os.path.join(checkpoint, "mp_rank_00_model_states.pt"))["module"]
    return {(k[len(prefix):] if k.startswith(prefix) else k): v.to(dtype) for k, v in module.items()}


def export_checkpoint(checkpoint: str, out_dir: str, dtype: str | None = None, log=print) -> str:
    """Write a Hugging Face model directory from a crlft checkpoint.

    The directory holds ``model.safetensors`` (sharded above 5 GB), ``config.json``, ``generation_config.json``
    (eos = the template's end-of-turn token), the tokenizer with the template's ``chat_template``, and
    ``crlft_export.json`` (where it came from). A LoRA run's export holds the merged model, and the adapter alone
    in ``adapter/`` (peft's files and the tokenizer; its base is read from ``model.base``). It is written as
    ``OUT.tmp`` and renamed, so it is never half there; an existing ``OUT`` is replaced.

    Args:
        checkpoint: a complete checkpoint directory (``.../checkpoints/step_N``).
        out_dir: the directory to write.
        dtype: ``bfloat16``, ``float32`` or ``float16``; default: the training dtype.
        log: where the progress line goes.

    Returns:
        ``out_dir``.

    Raises:
        UserError: not a complete crlft checkpoint, a damaged one (manifest, or a pickle that could run code:
            refused before anything is loaded), non-finite weights, or an unknown dtype.
    """
    if not is_complete(checkpoint):
        raise UserError(f"{checkpoint}: not a complete crlft checkpoint (a step_N directory with {COMPLETE_MARKER})")
    problems = find_problems(checkpoint)  # before zero_to_fp32, which loads with weights_only=False
    if problems:
        raise UserError(f"{checkpoint} is damaged, not exported: {describe(problems)}")
    state = read_trainer_state(checkpoint)
    dtype_name = dtype or state.get("dtype", "bfloat16")
    if dtype_name not in DTYPES:
        raise UserError(f"unknown dtype {dtype_name!r}; one of {', '.join(DTYPES)}")
    torch_dtype = DTYPES[dtype_name]
    t0 = time.perf_counter()
    hf_dir = os.path.join(checkpoint, HF_FILES_DIR)
    tensors = consolidated_state_dict(checkpoint, torch_dtype)
    num_params = sum(t.numel() for t in {id(t): t for t in tensors.values()}.values())
    nonfinite = sorted(name for name, t in tensors.items() if not bool(torch.isfinite(t).all()))
    if nonfinite:
        raise UserError(f"{checkpoint}: {len(nonfinite)} weight tensor(s) hold NaN or infinity "
                        f"({', '.join(nonfinite[:5])}); nothing exported to {out_dir}")

    out_dir = os.path.normpath(out_dir)
    tmp = out_dir + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    # adapter_config.json stays out of the merged model: transformers would load the directory as an adapter.
    shutil.copytree(hf_dir, tmp, ignore=shutil.ignore_patterns(lora.ADAPTER_CONFIG_FILE))
    if lora.is_lora_checkpoint(hf_dir):  # a LoRA run: the merged model here, the adapter alone in adapter/
        tensors = lora.export_lora(checkpoint, hf_dir, tensors, torch_dtype, os.path.join(tmp, lora.ADAPTER_DIR))
        num_params = sum(t.numel() for t in {id(t): t for t in tensors.values()}.values())
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
    write_json(os.path.join(tmp, EXPORT_INFO_FILE), {
        "checkpoint": os.path.abspath(checkpoint),
        "step": state.get("step"),
        "epoch": state.get("epoch_progress"),
        "dtype": dtype_name,
        "template": state.get("template"),
        **({"adapter": lora.ADAPTER_DIR} if lora.is_lora_checkpoint(hf_dir) else {}),
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


__all__ = ["consolidated_state_dict", "export_checkpoint", "link_or_copy_tree"]
