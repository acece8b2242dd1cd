"""ZeRO-3 loading without a full copy of the model on any rank, and the memory each rank holds afterwards.

Under ``zero_stage: 3`` the model is built inside ``deepspeed.zero.Init`` (transformers does so while an
``HfDeepSpeedConfig`` is alive): every parameter is partitioned as soon as its module exists, so a rank holds
``1/N`` of the weights plus one module at a time. The checkpoint is then read *per partition*: each rank opens
the safetensors files and reads only the flat slice ``[rank·p, (rank+1)·p)`` of each tensor (one contiguous byte
range of the row-major data) into its own ``ds_tensor``. No rank reads the whole checkpoint, no collective is
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


_SAFETENSORS_DTYPES = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _safetensors_header(path: str) -> tuple[int, dict[str, Any]]:
    """``(offset of the data, {name: {"dtype", "shape", "data_offsets"}})`` of a safetensors file (JSON only)."""
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    return 8 + length, header


def _safetensors_index(model_dir: str) -> dict[str, tuple[str, int, dict[str, Any]]] | None:
    """Tensor name → (file, data offset, header entry) of a model directory; None without safetensors weights."""
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.isfile(os.path.join(model_dir, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        return None
    out = {}
    for file in files:
        path = os.path.join(model_dir, file)
        offset, header = _safetensors_header(path)
        out.update({name: (path, offset, entry) for name, entry in header.items()})
    return out


def _read_flat_slice(path: str, data_offset: int, entry: dict[str, Any], start: int, end: int) -> torch.Tensor:
    """Elements ``[start, end)`` of a row-major tensor, read with ``pread`` (a contiguous byte range).

    A plain read, not a memory map: mapped pages a rank touched would count in its resident set until unmapped.
    """
    dtype = _SAFETENSORS_DTYPES[entry["dtype"]]
    size = torch.empty((), dtype=dtype).element_size()
    first = data_offset + entry["data_offsets"][0] + start * size
    buffer = bytearray((end - start) * size)
    with open(path, "rb", buffering=0) as f:
        view, done = memoryview(buffer), 0
        while done < len(buffer):
            n = os.preadv(f.fileno(), [view[done:]], first + done)
            if n <= 0:
                raise OSError(f"{path}: unexpected end of file")
            done += n
    return torch.frombuffer(buffer, dtype=dtype) if buffer else torch.empty(0, dtype=dtype)


def load_partitioned_weights(model: torch.nn.Module, model_dir: str, grown: frozenset[str] = frozenset()) -> bool:
    """Copy this rank's partition of every parameter from ``model_dir``'s safetensors files into ``ds_tensor``.

    Args:
        model: a model built under ``deepspeed.zero.Init`` (every parameter partitioned).
        model_dir: the Hugging Face model directory.
        grown: parameters (the embeddings) that may have more rows than the checkpoint; only the checkpoint's
            rows are loaded into them, the others keep their values (the caller sets them).

    Returns:
        False (nothing loaded) when the directory has no safetensors weights or a parameter's name, shape or dtype
        is not in them; the caller then uses transformers' own loading.
    """
    index = _safetensors_index(model_dir)
    params = dict(model.named_parameters())  # tied weights appear once
    if index is None or not all(is_partitioned(p) for p in params.values()):
        return False
    for name, param in params.items():
        if name not in index or index[name][2]["dtype"] not in _SAFETENSORS_DTYPES:
            return False
        saved, wanted = list(index[name][2]["shape"]), list(full_shape(param))
        if saved != wanted and not (name in grown and saved[1:] == wanted[1:] and saved[0] < wanted[0]):
            return False
    for name, param in params.items():
        path, offset, entry = index[name]
        rank = torch.distributed.get_rank(group=param.ds_process_group)
        part = param.ds_tensor.numel()
        start = rank * part
        end = min(start + part, full_numel(param))
        stored = min(end, math.prod(entry["shape"]))  # rows past the checkpoint's (grown embeddings) stay as they are
        with torch.no_grad():
            if end < start + part:
                param.ds_tensor.data[max(end - start, 0):].zero_()  # the padding of the last partition
            if stored > start:
                # The same cast from_pretrained(dtype=...) applies.
                param.ds_tensor.data[: stored - start].copy_(_read_flat_slice(path, offset, entry, start, stored))
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
