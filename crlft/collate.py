"""Packed-row collation: conversations back to back in one padding-free row, labels shifted within each.

A row's ``position_ids`` restart at 0 for every conversation and ``cu_seqlens`` marks the boundaries, so no kernel
attends across conversations; padding is a final segment of its own with zero weight (``docs/design.md``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

IGNORE_INDEX = -100  # labels value ignored by torch's cross-entropy


def pack_row(
    examples: Sequence[tuple[Any, Any]],
    pad_to_multiple_of: int | None = 64,
    pad_token_id: int = 0,
    conditions: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Collates conversations into one padding-free packed row.

    Args:
        examples: ``(input_ids, loss_weights)`` per conversation, each 1-D of the same length >= 1, with the
            dataset's unshifted weights (``loss_weights[i]`` weighs predicting ``input_ids[i]``).
        pad_to_multiple_of: pad the row to a multiple of this many tokens (padding is its own final segment
            with zero weight), or None for no padding. An empty ``examples`` gives a row of
            ``pad_to_multiple_of`` (or 1) padding tokens.
        pad_token_id: token id written into padding positions (never attended by real tokens, never trained).
        conditions: optional condition name per conversation, returned as ``segment_conditions``.

    Returns:
        A dict with ``input_ids``, ``position_ids``, ``labels`` (long ``[1, T]``), ``loss_weights`` (float32
        ``[1, T]``, shifted), ``cu_seqlens`` (int32 ``[num_segments + 1]``, the padding segment last if any),
        ``max_seqlen`` (int, over all segments), ``num_tokens`` (real tokens), ``num_conversations``,
        ``segment_conditions`` (list[str], one per real conversation; empty strings if not given).

    Raises:
        ValueError: if a conversation is empty or its ids and weights differ in length.
    """
    if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
        raise ValueError(f"pad_to_multiple_of must be >= 1 or None, got {pad_to_multiple_of}")
    if conditions is not None and len(conditions) != len(examples):
        raise ValueError(f"got {len(conditions)} conditions for {len(examples)} conversations")
    ids_parts, weight_parts = [], []
    for k, (ids, weights) in enumerate(examples):
        ids, weights = np.asarray(ids).reshape(-1), np.asarray(weights).reshape(-1)
        if len(ids) == 0 or len(ids) != len(weights):
            raise ValueError(
                f"conversation {k} of the row: {len(ids)} input_ids and {len(weights)} loss_weights "
                "(need the same number, at least 1)"
            )
        ids_parts.append(ids)
        weight_parts.append(weights)
    seq_lengths = np.array([len(x) for x in ids_parts], dtype=np.int64)
    num_tokens = int(seq_lengths.sum())
    multiple = pad_to_multiple_of or 1
    num_pad = (-num_tokens) % multiple if num_tokens else multiple
    total = num_tokens + num_pad

    input_ids = np.full(total, pad_token_id, dtype=np.int64)
    shifted_weights = np.zeros(total, dtype=np.float32)
    labels = np.full(total, IGNORE_INDEX, dtype=np.int64)
    position_ids = np.empty(total, dtype=np.int64)
    starts = np.zeros(len(seq_lengths), np.int64)
    if num_tokens:
        np.cumsum(seq_lengths[:-1], out=starts[1:])
        input_ids[:num_tokens] = np.concatenate(ids_parts)
        weights = np.concatenate(weight_parts).astype(np.float32)
        # Target of position t is token t+1 of the same conversation; a conversation's last token has none.
        labels[: num_tokens - 1] = input_ids[1:num_tokens]
        shifted_weights[: num_tokens - 1] = weights[1:]
        last = starts + seq_lengths - 1
        shifted_weights[last] = 0.0
        labels[:num_tokens][shifted_weights[:num_tokens] == 0] = IGNORE_INDEX
        position_ids[:num_tokens] = np.arange(num_tokens) - np.repeat(starts, seq_lengths)
    position_ids[num_tokens:] = np.arange(num_pad)

    segment_lengths = np.concatenate([seq_lengths, [num_pad] if num_pad else []]).astype(np.int64)
    cu_seqlens = np.zeros(len(segment_lengths) + 1, dtype=np.int32)
    np.cumsum(segment_lengths, out=cu_seqlens[1:])
    return {
        "input_ids": torch.from_numpy(input_ids).unsqueeze(0),
        "position_ids": torch.from_numpy(position_ids).unsqueeze(0),
        "labels": torch.from_numpy(labels).unsqueeze(0),
        "loss_weights": torch.from_numpy(shifted_weights).unsqueeze(0),
        "cu_seqlens": torch.from_numpy(cu_seqlens),
        "max_seqlen": int(segment_lengths.max()),
        "num_tokens": num_tokens,
        "num_conversations": len(seq_lengths),
        "segment_conditions": list(conditions) if conditions is not None else [""] * len(seq_lengths),
    }


def flash_attention_kwargs(row: dict[str, Any], device: torch.device | str | None = None) -> dict[str, Any]:
    """Keyword arguments that let transformers' flash_attention_2 use the row's precomputed varlen boundaries.

    Passing them to the model's forward spares the per-layer inference of ``cu_seqlens`` from ``position_ids``;
    sdpa and eager ignore them.

    Args:
        row: a row from :func:`pack_row`.
        device: where to put ``cu_seqlens`` (the model's device).

    Returns:
        ``{"cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k"}``.
    """
    cu_seqlens = row["cu_seqlens"].to(device) if device is not None else row["cu_seqlens"]
    return {
        "cu_seq_lens_q": cu_seqlens,
        "cu_seq_lens_k": cu_seqlens,
        "max_length_q": row["max_seqlen"],
        "max_length_k": row["max_seqlen"],
    }


__all__ = ["IGNORE_INDEX", "flash_attention_kwargs", "pack_row"]
