"""ZeRO-3 loading without a full copy of the model on any rank, and the memory each rank holds afterwards.

Under ``zero_stage: 3`` the model is built inside ``deepspeed.zero.Init`` (transformers does so while an
``HfDeepSpeedConfig`` is alive): every parameter is partitioned as soon as its module exists, so a rank holds
``1/N`` of the weights plus one module at a time. The checkpoint is then read *per partition*: each rank opens
the safetensors files (memory-mapped) and copies only the flat slice ``[rank·p, (rank+1)·p)`` of each tensor
into its own ``ds_tensor``, reading the rows that hold it. No rank reads the whole checkpoint, no collective is
needed, and the values are exactly those ``from_pretrained`` would load (the same ``.to(dtype)`` cast).
transformers' own ZeRO-3 loading (used for checkpoints that are not safetensors, or whose names do not match the
model's parameters) has rank 0 read the whole state dict and broadcast it layer by layer: correct, but rank 0
then holds a full copy for a while.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
from contextlib import contextmanager
from typing import Any

import torch

logger = logging.getLogger(__name__)
# Every rank reports its own memory after loading (crlft's other INFO lines are rank 0's only), any ZeRO stage.
memory_logger = logging.getLogger("crlft.zero3_load.memory")
memory_logger.setLevel(logging.INFO)


def hf_deepspeed_config(ds_config: dict[str, Any]) -> Any:
    """An ``HfDeepSpeedConfig``; while it is referenced, transformers builds and resizes models under ZeRO-3.

    ``auto`` values are not used by crlft's generated config; the batch keys are completed as DeepSpeed would
    (``train_batch_size`` = micro-batch × accumulation × world size).
    """
    from transformers.integrations import HfDeepSpeedConfig

    config = json.loads(json.dumps(ds_config))  # HfDeepSpeedConfig keeps (and may edit) the dict
    return HfDeepSpeedConfig(config)


def forget_hf_deepspeed_config(config: Any) -> None:
    """Turn transformers' ZeRO-3 mode off again (it lasts while an ``HfDeepSpeedConfig`` is referenced)."""
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    del config
    unset_hf_deepspeed_config()


def is_partitioned(param: torch.nn.Parameter) -> bool:
    """Whether ``param`` is a ZeRO-3 parameter whose data is this rank's partition only."""
    return hasattr(param, "ds_tensor") and hasattr(param, "ds_numel")


def full_shape(param: torch.nn.Parameter) -> torch.Size:
    """The unpartitioned shape of a parameter (ZeRO-3's ``ds_shape``), else its shape."""
    return getattr(param, "ds_shape", param.shape)


def full_numel(param: torch.nn.Parameter) -> int:
    """The unpartitioned number of elements of a parameter."""
    return int(getattr(param, "ds_numel", param.numel()))


@contextmanager
def gathered(params: list[torch.nn.Parameter], modifier_rank: int | None = 0):
    """``deepspeed.zero.GatheredParameters`` for ZeRO-3 parameters, a no-op for others."""
    partitioned = [p for p in params if is_partitioned(p)]
    if not partitioned:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=modifier_rank):
        yield


def _safetensors_index(model_dir: str) -> dict[str, str] | None:
    """Tensor name → safetensors file of a model directory, or None when it has no safetensors weights."""
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            return {name: os.path.join(model_dir, file) for name, file in json.load(f)["weight_map"].items()}
    single = os.path.join(model_dir, "model.safetensors")
    if os.path.isfile(single):
        from safetensors import safe_open

        with safe_open(single, framework="pt") as f:
            return {name: single for name in f.keys()}
    return None


def _read_flat_slice(handle: Any, name: str, start: int, end: int) -> torch.Tensor:
    """Elements ``[start, end)`` of tensor ``name`` flattened, reading only the rows that hold them."""
    sliced = handle.get_slice(name)
    shape = sliced.get_shape()
    if len(shape) <= 1:
        return sliced[start:end].reshape(-1) if shape else handle.get_tensor(name).reshape(-1)[start:end]
    row = math.prod(shape[1:])
    first, last = start // row, -(-end // row)
    rows = sliced[first:last].reshape(-1)
    return rows[start - first * row : end - first * row]


def load_partitioned_weights(model: torch.nn.Module, model_dir: str, grown: frozenset[str] = frozenset()) -> bool:
    """Copy this rank's partition of every parameter from ``model_dir``'s safetensors files into ``ds_tensor``.

    Args:
        model: a model built under ``deepspeed.zero.Init`` (every parameter partitioned).
        model_dir: the Hugging Face model directory.
        grown: parameters (the embeddings) that may have more rows than the checkpoint; only the checkpoint's
            rows are loaded into them, the others keep their values (the caller sets them).

    Returns:
        False (nothing loaded) when the directory has no safetensors weights or a parameter's name or shape is not
        in them; the caller then uses transformers' own loading.
    """
    from safetensors import safe_open

    index = _safetensors_index(model_dir)
    params = dict(model.named_parameters())  # tied weights appear once
    if index is None or not all(is_partitioned(p) for p in params.values()):
        return False
    handles: dict[str, Any] = {}
    try:
        plan = []
        for name, param in params.items():
            if name not in index:
                return False
            handle = handles.get(index[name]) or handles.setdefault(index[name],
                                                                     safe_open(index[name], framework="pt"))
            saved, wanted = list(handle.get_slice(name).get_shape()), list(full_shape(param))
            if saved != wanted and not (name in grown and saved[1:] == wanted[1:] and saved[0] < wanted[0]):
                return False
            plan.append((name, param, handle, math.prod(saved)))
        for name, param, handle, saved_numel in plan:
            rank = torch.distributed.get_rank(group=param.ds_process_group)
            part = param.ds_tensor.numel()
            start = rank * part
            end = min(start + part, full_numel(param))
            stored = min(end, saved_numel)  # rows past the checkpoint's (grown embeddings) are left as they are
            with torch.no_grad():
                if end < start + part:
                    param.ds_tensor.data[max(end - start, 0):].zero_()  # the padding of the last partition
                if stored > start:
                    param.ds_tensor.data[: stored - start].copy_(_read_flat_slice(handle, name, start, stored))
    finally:
        handles.clear()  # safe_open handles unmap when collected
    return True


def host_memory_bytes() -> tuple[int, int]:
    """This process's resident set now and its peak (``VmRSS``, ``VmHWM`` of ``/proc/self/status``), in bytes."""
    values = {}
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    values[key] = int(rest.split()[0]) * 1024
    except OSError:
        pass
    return values.get("VmRSS", 0), values.get("VmHWM", 0)


def memory_line(model: torch.nn.Module, rank: int, device: torch.device | str, rss_before: int = 0) -> str:
    """One line: this rank's host, parameters held, host memory now, peak and before loading, device memory."""
    held = sum(p.ds_tensor.numel() if is_partitioned(p) else p.numel() for p in model.parameters())
    total = sum(full_numel(p) for p in model.parameters())
    rss, peak = host_memory_bytes()
    line = (f"memory after loading, rank {rank} on {socket.gethostname()}: holds {held / 1e6:,.1f}M of "
            f"{total / 1e6:,.1f}M parameters; host RSS {rss / 2**30:.2f} GiB (peak {peak / 2**30:.2f} GiB, "
            f"before loading {rss_before / 2**30:.2f} GiB)")
    if torch.device(device).type == "cuda":
        line += (f"; device {torch.cuda.memory_allocated(device) / 2**30:.2f} GiB allocated "
                 f"(peak {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB)")
    else:
        line += "; device: the host (CPU rank)"
    return line


__all__ = [
    "forget_hf_deepspeed_config",
    "full_numel",
    "full_shape",
    "gathered",
    "hf_deepspeed_config",
    "host_memory_bytes",
    "is_partitioned",
    "load_partitioned_weights",
    "memory_line",
]
