"""Checkpoint integrity and trust: the manifest ``COMPLETE`` holds, its verification, and the pickle scan.

The manifest lists every file of a checkpoint (all ranks' shards included) with its size and xxh3-128 hash. The
ranks hash the files in parallel (each a share, balanced by size) after fsyncing everything they see; rank 0 merges
the shares, fsyncs the directories and writes ``COMPLETE`` last (``docs/design.md``, "Checkpoints and export").

Every pickle in a checkpoint (DeepSpeed's ``*.pt`` files) is scanned with ``torch.load(weights_only=True)``,
allowing tensors, containers and the few DeepSpeed types below, before DeepSpeed or ``zero_to_fp32`` loads it
(both call ``torch.load(weights_only=False)``, with no way to change that for every loader). A file that would
build anything else, e.g. call ``os.system``, is refused without running it; the manifest then guarantees that what
DeepSpeed loads is the byte-identical file that passed the scan.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import re
import zipfile
from typing import Any

import torch
import xxhash

COMPLETE_MARKER = "COMPLETE"
MANIFEST_VERSION = 1
HASH_NAME = "xxh3_128"
_PARTIAL_PREFIX = ".manifest_rank"
_CHUNK_BYTES = 8 << 20
_PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".ckpt")
_FULL_BELOW_BYTES = 64 << 20  # free space after a failed write below which the disk counts as full
_PICKLE_MAGIC = (b"PK\x03\x04", b"\x80")  # torch's zip format; a bare pickle (protocol 2+)


# --------------------------------------------------------------------------------------------------------------
# Files, hashes, fsync
# --------------------------------------------------------------------------------------------------------------


def file_hash(path: str) -> str:
    """The xxh3-128 hex digest of a file (read in 8 MiB chunks)."""
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK_BYTES):
            h.update(chunk)
    return h.hexdigest()


def fsync_path(path: str) -> None:
    """fsync a file or a directory (on Linux any process's fsync flushes the file's dirty pages)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def checkpoint_files(directory: str) -> list[str]:
    """Every file under ``directory`` as a sorted relative path, without ``COMPLETE`` and partial manifests."""
    found = []
    for root, _dirs, files in os.walk(directory):
        for name in files:
            rel = os.path.relpath(os.path.join(root, name), directory)
            if rel != COMPLETE_MARKER and not name.startswith(_PARTIAL_PREFIX):
                found.append(rel)
    return sorted(found)


def _share(directory: str, files: list[str], rank: int, world_size: int) -> list[str]:
    """This rank's files to hash: the largest first, each to the rank with the fewest bytes so far."""
    sizes = {f: os.path.getsize(os.path.join(directory, f)) for f in files}
    loads = [0] * world_size
    mine = []
    for f in sorted(files, key=lambda f: (-sizes[f], f)):
        r = min(range(world_size), key=lambda i: (loads[i], i))
        loads[r] += sizes[f]
        if r == rank:
            mine.append(f)
    return mine


def _entry(directory: str, rel: str) -> dict[str, Any]:
    path = os.path.join(directory, rel)
    return {"size": os.path.getsize(path), "hash": file_hash(path)}


# --------------------------------------------------------------------------------------------------------------
# Writing (every rank, then rank 0)
# --------------------------------------------------------------------------------------------------------------


def write_partial_manifest(directory: str, rank: int, world_size: int) -> None:
    """fsync every file this rank sees in ``directory``, hash its share of them, write that share (fsynced)."""
    files = checkpoint_files(directory)
    for rel in files:
        fsync_path(os.path.join(directory, rel))
    entries = {rel: _entry(directory, rel) for rel in _share(directory, files, rank, world_size)}
    path = os.path.join(directory, f"{_PARTIAL_PREFIX}{rank}.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(entries, f)
        f.flush()
        os.fsync(f.fileno())


def build_manifest(directory: str) -> dict[str, Any]:
    """Rank 0, after every rank's :func:`write_partial_manifest`: the merged manifest of ``directory``.

    Files no rank hashed (a rank that listed the directory early) are hashed here; the partial manifests are
    removed and every directory is fsynced, so the manifest only vouches for what is on disk.
    """
    entries: dict[str, Any] = {}
    for name in sorted(os.listdir(directory)):
        if name.startswith(_PARTIAL_PREFIX):
            with open(os.path.join(directory, name), encoding="utf-8") as f:
                entries.update(json.load(f))
            os.remove(os.path.join(directory, name))
    for rel in checkpoint_files(directory):
        if rel not in entries:
            fsync_path(os.path.join(directory, rel))
            entries[rel] = _entry(directory, rel)
    for root, _dirs, _files in os.walk(directory):
        fsync_path(root)
    return {"manifest_version": MANIFEST_VERSION, "hash": HASH_NAME, "files": dict(sorted(entries.items()))}


# --------------------------------------------------------------------------------------------------------------
# Verifying
# --------------------------------------------------------------------------------------------------------------


def read_marker(directory: str) -> dict[str, Any] | None:
    """The parsed ``COMPLETE`` of a checkpoint (None when it is missing or not a JSON object)."""
    try:
        with open(os.path.join(directory, COMPLETE_MARKER), encoding="utf-8") as f:
            marker = json.load(f)
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def has_manifest(marker: dict[str, Any] | None) -> bool:
    """Whether a ``COMPLETE`` marker holds a manifest (checkpoints of crlft before 0.2 have none)."""
    return bool(marker) and isinstance(marker.get("files"), dict)


def find_problems(directory: str, *, deep: bool = True, rank: int = 0, world_size: int = 1) -> list[str]:
    """What is wrong with a checkpoint directory against its manifest; empty when it is intact.

    Args:
        directory: the checkpoint.
        deep: also compare hashes and scan pickles (this rank's share of the files); otherwise only presence,
            sizes and files the manifest does not list (cheap: ``stat`` only).
        rank, world_size: which share of the files this process hashes and scans.

    Returns:
        One line per problem, each naming the file.
    """
    marker = read_marker(directory)
    if marker is None:
        return [f"{COMPLETE_MARKER} is missing or not valid JSON"]
    problems = []
    present = checkpoint_files(directory)
    if has_manifest(marker):
        if marker.get("hash") != HASH_NAME:
            return [f"{COMPLETE_MARKER}: unknown hash {marker.get('hash')!r} (this crlft checks {HASH_NAME})"]
        listed = marker["files"]
        for rel in sorted(set(present) - set(listed)):
            problems.append(f"{rel}: not in the manifest (not written by this run)")
        for rel, entry in listed.items():
            path = os.path.join(directory, rel)
            if not os.path.isfile(path):
                problems.append(f"{rel}: missing")
            elif os.path.getsize(path) != entry.get("size"):
                problems.append(f"{rel}: {os.path.getsize(path)} bytes, the manifest says {entry.get('size')}")
        if problems or not deep:
            return problems
        mine = _share(directory, sorted(listed), rank, world_size)
        problems += [
            f"{rel}: contents differ from the manifest (hash)"
            for rel in mine
            if file_hash(os.path.join(directory, rel)) != listed[rel]["hash"]
        ]
        if problems:
            return problems
    else:
        mine = _share(directory, present, rank, world_size)
    return problems + (scan_pickles(directory, mine) if deep else [])


def gather_problems(problems: list[str]) -> list[str]:
    """Every rank's problems, on every rank (a collective when a process group of more than one exists)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return problems
    if torch.distributed.get_world_size() == 1:
        return problems
    gathered: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, problems)  # our own ranks' strings, not a file
    return sorted({p for ranks_problems in gathered for p in ranks_problems})


# --------------------------------------------------------------------------------------------------------------
# Pickles
# --------------------------------------------------------------------------------------------------------------


def _deepspeed_safe_globals() -> list[Any]:
    """The non-tensor types DeepSpeed's checkpoint files hold (ZeRO 1-3, fp32 / bf16 / fp16)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [fragment_address, ZeroStageEnum, LossScaler, DynamicLossScaler]


def _numpy_safe_globals() -> list[Any]:
    """What a pickled numpy array needs (the RNG files of crlft 0.1 hold numpy's RNG state)."""
    import numpy as np

    multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    return [np.ndarray, np.dtype, type(np.dtype(np.uint32)), multiarray._reconstruct]


def load_weights_only(path: str, mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True)`` allowing DeepSpeed's few types and numpy arrays, nothing else."""
    allowed = _deepspeed_safe_globals() + _numpy_safe_globals()
    with torch.serialization.safe_globals(allowed):
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


def _looks_like_pickle(path: str) -> bool:
    if path.endswith(_PICKLE_SUFFIXES):
        return True
    with open(path, "rb") as f:
        head = f.read(4)
    return head.startswith(_PICKLE_MAGIC)


def scan_pickles(directory: str, files: list[str]) -> list[str]:
    """Problems of the pickles among ``files``: each is loaded with ``weights_only=True`` (tensors memory-mapped,
    so little is read); one that needs anything beyond tensors, containers and DeepSpeed's types is refused."""
    problems = []
    for rel in files:
        path = os.path.join(directory, rel)
        if not _looks_like_pickle(path):
            continue
        try:
            load_weights_only(path, mmap=zipfile.is_zipfile(path))
        except pickle.UnpicklingError as e:
            names = sorted(set(re.findall(r"GLOBAL (\S+)", str(e))))
            problems.append(
                f"{rel}: refused without loading it: its pickle would build "
                + (", ".join(names) if names else "objects other than tensors and plain data")
                + " (only tensors, containers, numpy arrays and DeepSpeed's checkpoint types are allowed)"
            )
        except Exception as e:  # a damaged file: truncated zip, bad header
            problems.append(f"{rel}: cannot be read as a torch file ({type(e).__name__}: {str(e)[:200]})")
    return problems


def is_disk_full(error: BaseException, path: str) -> bool:
    """Whether ``error`` from writing under ``path`` means its filesystem is full.

    torch's zip writer reports a full disk as ``RuntimeError: ... unexpected pos``, without the errno, so a
    filesystem with (almost) nothing free after the failure counts as full too.
    """
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return True
    try:
        stat = os.statvfs(path)
    except OSError:
        return False
    return stat.f_bavail * stat.f_frsize < _FULL_BELOW_BYTES


def describe(problems: list[str], limit: int = 5) -> str:
    """Problems as one message part: the first ``limit`` and how many more."""
    shown = "; ".join(problems[:limit])
    return shown + (f"; and {len(problems) - limit} more" if len(problems) > limit else "")


__all__ = [
    "COMPLETE_MARKER",
    "HASH_NAME",
    "build_manifest",
    "checkpoint_files",
    "describe",
    "file_hash",
    "find_problems",
    "fsync_path",
    "gather_problems",
    "has_manifest",
    "is_disk_full",
    "load_weights_only",
    "read_marker",
    "scan_pickles",
    "write_partial_manifest",
]
