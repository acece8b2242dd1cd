"""The held-out ``eval`` split of ``crlft prepare``: which conversations of a source are held out, and its files.

A conversation is chosen by a hash of ``(data.eval_seed, source name, record index)``, not by its position among
the kept rows: re-preparing an unchanged recipe holds out the same conversations, and a source that gains or loses
records keeps most of its choice (``docs/design.md``, "The eval split").
"""

from __future__ import annotations

import os
import zlib
from typing import Any

import datasets
import numpy as np

# The split is written as a ``datasets.save_to_disk`` directory of this name inside ``data.output_dir``, beside
# the training rows (which stay ``load_from_disk(data.output_dir)``, a plain ``Dataset``).
EVAL_SPLIT_DIR = "eval"

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser on uint64 (well mixed, the same on every platform)."""
    with np.errstate(over="ignore"):
        x = (x + np.uint64(0x9E3779B97F4A7C15)) & _MASK64
        x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK64
        x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK64
        return x ^ (x >> np.uint64(31))


def num_held_out(num_conversations: int, fraction: float) -> int:
    """How many of a source's ``num_conversations`` are held out at ``fraction``.

    ``round(fraction · n)``, but at least 1 when ``fraction`` > 0 and the source has ≥ 2 conversations, and never
    all of them (a source always keeps one to train on).
    """
    if fraction <= 0 or num_conversations < 2:
        return 0
    return min(max(1, round(fraction * num_conversations)), num_conversations - 1)


def held_out_mask(record_indices: Any, fraction: float, seed: int, source: str) -> np.ndarray:
    """Which of a source's kept conversations (given by their record ``index``) are held out.

    Args:
        record_indices: the ``index`` column of the source's kept rows (record numbers in the source file).
        fraction: ``data.eval_fraction``.
        seed: ``data.eval_seed``.
        source: the source's name (each source gets its own choice).

    Returns:
        A bool array, True for the :func:`num_held_out` conversations of smallest hash.
    """
    indices = np.asarray(record_indices, dtype=np.int64)
    count = num_held_out(len(indices), fraction)
    mask = np.zeros(len(indices), dtype=bool)
    if count:
        # The salt is mixed first: two sources' salts then differ in about half their bits, so their inputs
        # (index XOR salt) never coincide and their choices are independent.
        salt = _splitmix64(np.array([zlib.crc32(f"{int(seed)}\0{source}".encode())], dtype=np.uint64))[0]
        keys = _splitmix64(indices.astype(np.uint64) ^ salt)
        # Ties cannot decide anything: the record indices of one source are distinct, and so are their hashes.
        mask[np.argsort(keys, kind="stable")[:count]] = True
    return mask


def eval_split_path(output_dir: str) -> str:
    """Where the ``eval`` split of a prepared dataset lives."""
    return os.path.join(output_dir, EVAL_SPLIT_DIR)


def load_eval_split(output_dir: str) -> Any:
    """The ``eval`` split of a prepared dataset (``datasets.Dataset``, the training columns), or None."""
    path = eval_split_path(output_dir)
    if not os.path.isdir(path):
        return None
    return datasets.load_from_disk(path)


def split_fingerprint(dataset: Any) -> str:
    """A short hash of what a split holds: every row's source, index, tokens and weights.

    Written into every evaluation record (``eval_split``), so curves of different held-out sets are told apart.
    """
    table = dataset.select_columns(["source", "index", "input_ids", "loss_weights"]).with_format("arrow")[:]
    crc = zlib.crc32("\0".join(map(str, table.column("source").to_pylist())).encode())
    crc = zlib.crc32(table.column("index").to_numpy().astype(np.int64).tobytes(), crc)
    for name, dtype in (("input_ids", np.int32), ("loss_weights", np.float32)):
        column = table.column(name).combine_chunks()
        lengths = np.diff(column.offsets.to_numpy().astype(np.int64))
        crc = zlib.crc32(lengths.tobytes(), crc)
        crc = zlib.crc32(np.ascontiguousarray(column.flatten().to_numpy(), dtype=dtype).tobytes(), crc)
    return f"{crc:08x}-{len(dataset)}"


__all__ = ["EVAL_SPLIT_DIR", "eval_split_path", "held_out_mask", "load_eval_split", "num_held_out",
           "split_fingerprint"]
