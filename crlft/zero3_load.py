"""ZeRO-3 loading without a full copy of the model on any rank, and the memory each rank holds afterwards.

Under ``zero_stage: 3`` the model is built inside ``deepspeed.zero.Init`` (transformers does so while an
``HfDeepSpeedConfig`` is alive): every parameter is partitioned as soon as its module exists, so a rank holds
``1/N`` of the weights plus one parameter at a time. transformers' random re-initialisation of that model (gather
each module, rank 0 draws it, broadcast, partition again) is skipped, since every parameter is read next. The
checkpoint is read *per partition*: each rank reads only the flat slice ``[rank·p, (rank+1)·p)`` of each tensor
(one contiguous byte range of the row-major data) from the safetensors files into its own ``ds_tensor``. No rank
reads the whole checkpoint or gathers a parameter, and the values are exactly those ``from_pretrained`` would load
(the same ``.to(dtype)`` cast). The mean rows of new tokens are reduced from the partitions as well
(:func:`row_mean`, :func:`fill_rows`). transformers' own ZeRO-3 loading (used for checkpoints that are not
safetensors, or whose names do not match the model's parameters) has rank 0 read the whole state dict and
broadcast it layer by layer: correct, but rank 0 then holds a full copy for a while.
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
def without_random_init():
    """While a model is built under ZeRO-3, skip the work that only serves a random initialisation of its parameters.

    Every parameter is overwritten from the checkpoint next, so two steps are waste: (1) transformers (5.x)
    re-initialises a model built under ``zero.Init`` module by module (gather each module's parameters, rank 0 draws
    them, broadcast, partition again): at 1.1B parameters on 2 CPU ranks 19 s of the 22 s build, and 0.3 GiB of freed
    heap left resident on each rank; (2) ``zero.Init`` broadcasts each new parameter whole from rank 0 so that the
    ranks agree on its initial values, which makes every other rank write a full copy of the largest parameter (the
    embedding) and sends the whole model over the network. Modules without parameters (rotary frequencies: buffers)
    are still initialised as transformers does; buffers are never broadcast. Without these hooks (other versions)
    loading stays correct, only slower.
    """
    import deepspeed.comm

    try:
        from transformers.integrations import deepspeed as hf_deepspeed
    except ImportError:
        hf_deepspeed = None
    original_init = getattr(hf_deepspeed, "initialize_weights_zero3", None)
    original_broadcast = deepspeed.comm.broadcast
    if original_init is not None:
        hf_deepspeed.initialize_weights_zero3 = _initialize_buffers_only
    deepspeed.comm.broadcast = _no_broadcast
    try:
        yield
    finally:
        deepspeed.comm.broadcast = original_broadcast
        if original_init is not None:
            hf_deepspeed.initialize_weights_zero3 = original_init


def _no_broadcast(*args: Any, **kwargs: Any) -> None:
    """``deepspeed.comm.broadcast`` while a model to be overwritten is built: its values need not agree."""
    return None


def _initialize_buffers_only(model: torch.nn.Module) -> None:
    """transformers' ``_init_weights`` on the modules that hold buffers and no parameters (every rank alike)."""
    with torch.no_grad():
        for module in model.modules():
            if next(module.parameters(), None) is None and next(module.buffers(recurse=False), None) is not None:
                model._init_weights(module)


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


# Elements read or reduced at a time: bounds the temporary buffers (a 7B embedding partition is 16M elements).
_CHUNK_ELEMENTS = 1 << 22


def _copy_flat_slice(path: str, data_offset: int, entry: dict[str, Any], start: int, out: torch.Tensor) -> None:
    """``out`` := elements ``[start, start + out.numel())`` of a row-major tensor in a safetensors file.

    Read with ``pread`` in chunks through one small buffer, not a memory map (mapped pages a rank touched would count
    in its resident set until unmapped) and not the whole slice at once (that would hold a second copy of it).
    ``copy_`` applies the same cast ``from_pretrained(dtype=...)`` does.
    """
    dtype = _SAFETENSORS_DTYPES[entry["dtype"]]
    size = torch.empty((), dtype=dtype).element_size()
    first = data_offset + entry["data_offsets"][0] + start * size
    buffer = bytearray(min(out.numel(), _CHUNK_ELEMENTS) * size)
    with open(path, "rb", buffering=0) as f:
        for begin in range(0, out.numel(), _CHUNK_ELEMENTS):
            count = min(_CHUNK_ELEMENTS, out.numel() - begin)
            view, done = memoryview(buffer)[: count * size], 0
            while done < len(view):
                n = os.preadv(f.fileno(), [view[done:]], first + begin * size + done)
                if n <= 0:
                    raise OSError(f"{path}: unexpected end of file")
                done += n
            out[begin: begin + count].copy_(torch.frombuffer(view, dtype=dtype))


def _flat_view(param: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``(flat, first)``: the row-major elements this rank holds of ``param`` and the flat index of the first.

    A ZeRO-3 parameter's partition is the flat slice ``[rank·p, (rank+1)·p)`` (the padding of the last one past
    ``numel`` left out); any other tensor is held whole.
    """
    if not is_partitioned(param):
        return param.data.view(-1), 0
    rank = torch.distributed.get_rank(group=param.ds_process_group)
    part = param.ds_tensor.numel()
    first = rank * part
    return param.ds_tensor.data[: max(min(part, full_numel(param) - first), 0)], first


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
        held, start = _flat_view(param)
        # Rows past the checkpoint's (grown embeddings) stay as they are; the caller sets them.
        stored = min(start + held.numel(), math.prod(entry["shape"]))
        with torch.no_grad():
            param.ds_tensor.data[held.numel():].zero_()  # the padding of the last partition (empty elsewhere)
            if stored > start:
                _copy_flat_slice(path, offset, entry, start, held[: stored - start])
    return True


def _row_pieces(first: int, stop: int, width: int):
    """Split the flat range ``[first, stop)`` of a ``[rows, width]`` matrix into pieces within one row or whole rows.

    Yields ``(offset in the range, number of elements, column of the first element)``; a piece that starts at column
    0 with a multiple of ``width`` elements is whole rows (at most ``_CHUNK_ELEMENTS``, rounded to rows).
    """
    rows_per_chunk = max(_CHUNK_ELEMENTS // width, 1)
    position = first
    while position < stop:
        column = position % width
        if column or stop - position < width:  # the part of one row
            count = min(width - column, stop - position)
        else:
            count = min((stop - position) // width, rows_per_chunk) * width
        yield position - first, count, column
        position += count


def column_sums(flat: torch.Tensor, first: int, width: int, num_rows: int) -> torch.Tensor:
    """Float64 column sums over rows ``:num_rows`` of the elements ``flat`` holds of a ``[rows, width]`` matrix.

    Args:
        flat: the elements ``[first, first + flat.numel())`` of the row-major matrix (a ZeRO-3 partition).
        first: the flat index of ``flat[0]``.
        width: the row length.
        num_rows: only rows ``:num_rows`` count.
    """
    sums = torch.zeros(width, dtype=torch.float64, device=flat.device)
    for offset, count, column in _row_pieces(first, min(first + flat.numel(), num_rows * width), width):
        piece = flat[offset: offset + count].double()
        if column == 0 and count % width == 0:  # whole rows
            sums += piece.view(-1, width).sum(dim=0)
        else:
            sums[column: column + count] += piece
    return sums


def fill_flat_rows(flat: torch.Tensor, first: int, width: int, first_row: int, row: torch.Tensor) -> None:
    """Rows ``first_row:`` := ``row`` (``width`` values) on the elements ``flat`` holds (see :func:`column_sums`)."""
    row = row.reshape(-1).to(device=flat.device, dtype=flat.dtype)
    begin = max(first, first_row * width)
    for offset, count, column in _row_pieces(begin, first + flat.numel(), width):
        target = flat[begin - first + offset: begin - first + offset + count]
        if column == 0 and count % width == 0:
            target.view(-1, width).copy_(row.expand(count // width, width))
        else:
            target.copy_(row[column: column + count])


def row_mean(param: torch.Tensor, num_rows: int) -> torch.Tensor:
    """The mean of rows ``:num_rows`` of a ``[rows, ...]`` parameter, in float64, on the parameter's device.

    A ZeRO-3 parameter is never gathered: each rank sums the columns of the rows it holds and the ``width`` sums are
    all-reduced. The partitioning decides the order of summation; in float64 that order moves only bits far below
    any training dtype's rounding, so a plain tensor and its ZeRO-3 partitions get the same mean rows.
    """
    shape = full_shape(param)
    flat, first = _flat_view(param)
    sums = column_sums(flat, first, math.prod(shape[1:]), num_rows)
    if is_partitioned(param):
        torch.distributed.all_reduce(sums, group=param.ds_process_group)
    return (sums / num_rows).view(shape[1:])


def fill_rows(param: torch.Tensor, first_row: int, row: torch.Tensor) -> None:
    """Rows ``first_row:`` of a ``[rows, ...]`` parameter := ``row``, on the elements this rank holds."""
    flat, first = _flat_view(param)
    with torch.no_grad():
        fill_flat_rows(flat, first, math.prod(full_shape(param)[1:]), first_row, row)


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


def memory_line(model: torch.nn.Module, rank: int, device: torch.device | str, rss_before: int = 0,
                seconds: float | None = None) -> str:
    """One line: this rank's host, parameters held, host memory now, peak and before loading, device memory, and
    how long loading took (``seconds``)."""
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
    if seconds is not None:
        line += f"; loaded in {seconds:.1f} s"
    return line


__all__ = [
    "column_sums",
    "fill_flat_rows",
    "fill_rows",
    "forget_hf_deepspeed_config",
    "full_numel",
    "full_shape",
    "hf_deepspeed_config",
    "host_memory_bytes",
    "is_partitioned",
    "load_partitioned_weights",
    "memory_line",
    "row_mean",
    "without_random_init",
]
