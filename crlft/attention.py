"""Attention for packed rows: which kernel to use, and a padding-free varlen kernel transformers can call.

Each conversation of a packed row must attend only to itself; ``auto`` never picks a backend that builds a dense
``[T, T]`` mask for training. The backends, how each keeps conversations apart, and the order ``auto`` tries them
are in ``docs/design.md`` ("Attention backends").
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.utils import is_flash_attn_2_available, is_torch_flex_attn_available

from crlft.collate import flash_attention_kwargs
from crlft.errors import UserError

logger = logging.getLogger(__name__)

VARLEN_ATTENTION = "crlft_varlen"
"""The name :func:`register_varlen_attention` registers :func:`varlen_attention_forward` under."""

ATTN_IMPLEMENTATIONS = ("auto", "flash_attention_2", VARLEN_ATTENTION, "flex_attention", "sdpa", "eager")
"""Values ``model.attn_implementation`` may take."""

# Backends that read the row's precomputed conversation boundaries from keyword arguments.
_VARLEN_KWARGS_BACKENDS = ("flash_attention_2", VARLEN_ATTENTION)
# Backends for which transformers materialises a dense [T, T] mask for a packed row.
_DENSE_MASK_BACKENDS = ("sdpa", "eager")
_HALF_DTYPES = (torch.bfloat16, torch.float16)


# ----------------------------------------------------------------------------------------------------------------
# What is available
# ----------------------------------------------------------------------------------------------------------------


def _device(device: torch.device | str | int) -> torch.device:
    device = torch.device(device) if not isinstance(device, torch.device) else device
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _compute_capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def _flash_attn_usable(device: torch.device, dtype: torch.dtype) -> bool:
    """flash-attn (the package) runs here: CUDA, half precision, and transformers finds it importable."""
    if device.type != "cuda" or dtype not in _HALF_DTYPES or importlib.util.find_spec("flash_attn") is None:
        return False

    return bool(is_flash_attn_2_available())


@functools.lru_cache(maxsize=16)  # asked in every layer's forward
def _torch_varlen_usable(device: torch.device, dtype: torch.dtype) -> bool:
    """PyTorch's varlen FlashAttention kernel runs here (recent torch only; CUDA, sm80+, half precision)."""
    if device.type != "cuda" or dtype not in _HALF_DTYPES:
        return False
    if importlib.util.find_spec("torch.nn.attention.varlen") is None:
        return False
    return _compute_capability(device) >= (8, 0)


def _flex_usable(device: torch.device, dtype: torch.dtype) -> bool:
    """FlexAttention can train here: it compiles to Triton on CUDA; on CPU torch 2.13 has no backward for it."""
    if device.type != "cuda":
        return False

    return bool(is_torch_flex_attn_available())


def available_attn_implementations(device: torch.device | str, dtype: torch.dtype = torch.bfloat16) -> list[str]:
    """The padding-free backends that can train packed rows on ``device``, fastest first.

    ``sdpa`` and ``eager`` are never listed: they attend packed rows through a dense ``[T, T]`` mask.

    Args:
        device: where the model runs.
        dtype: the model's compute dtype (FlashAttention kernels need bf16 or fp16).

    Returns:
        Names for ``attn_implementation``; never empty (``crlft_varlen`` runs everywhere).
    """
    device = _device(device)
    names: list[str] = []
    if _flash_attn_usable(device, dtype):
        names.append("flash_attention_2")
    torch_varlen = _torch_varlen_usable(device, dtype)
    if torch_varlen:
        names.append(VARLEN_ATTENTION)
    if _flex_usable(device, dtype):
        names.append("flex_attention")
    if not torch_varlen:
        names.append(VARLEN_ATTENTION)  # its per-conversation SDPA form: slower than a fused varlen kernel
    return names


def describe_attn_implementation(name: str, device: torch.device | str, dtype: torch.dtype = torch.bfloat16) -> str:
    """One line saying which kernel ``name`` runs on ``device`` and how it keeps packed conversations apart."""
    device = _device(device)
    if name == "flash_attention_2":
        return "flash_attention_2 (flash-attn varlen kernel, cu_seqlens from the packed row)"
    if name == VARLEN_ATTENTION:
        if _torch_varlen_usable(device, dtype):
            return f"{VARLEN_ATTENTION} (torch.nn.attention.varlen FlashAttention kernel, cu_seqlens of the packed row)"
        return f"{VARLEN_ATTENTION} (one scaled_dot_product_attention call per packed conversation, no mask)"
    if name == "flex_attention":
        return "flex_attention (compiled FlexAttention, document-causal BlockMask built by transformers)"
    if name in _DENSE_MASK_BACKENDS:
        return f"{name} (dense [T, T] block-diagonal mask built by transformers: O(T²) memory per packed row)"
    return name


def choose_attn_implementation(
    requested: str,
    device: torch.device | str,
    dtype: torch.dtype = torch.bfloat16,
    log: Callable[[str], Any] | None = None,
) -> str:
    """Resolves ``model.attn_implementation`` to the backend to load the model with, and logs the choice.

    ``auto`` picks the first of :func:`available_attn_implementations`. An explicit name is checked: a kernel that
    cannot run here is a ``UserError`` (not a silent fallback), and ``sdpa``/``eager`` are allowed but logged as
    O(T²) per packed row. ``crlft_varlen`` is registered with transformers when it is the answer.

    Args:
        requested: ``auto`` or one of :data:`ATTN_IMPLEMENTATIONS`.
        device: where the model runs (e.g. ``cuda:0``, ``cpu``).
        dtype: the model's compute dtype.
        log: where the one-line decision goes (e.g. the trainer's logger ``info``); default this module's logger.

    Returns:
        The name to pass as ``attn_implementation`` to ``from_pretrained`` / ``from_config`` /
        ``model.set_attn_implementation``.

    Raises:
        UserError: an unknown name, or a backend this machine cannot run.
    """
    device = _device(device)
    if requested not in ATTN_IMPLEMENTATIONS:
        raise UserError(
            f"model.attn_implementation: unknown value {requested!r}; one of {', '.join(ATTN_IMPLEMENTATIONS)}"
        )
    available = available_attn_implementations(device, dtype)
    dtype_name = str(dtype).removeprefix("torch.")
    if requested == "auto":
        chosen = available[0]
    elif requested in _DENSE_MASK_BACKENDS or requested in available:
        chosen = requested
    else:
        why = {
            "flash_attention_2": "needs the flash_attn package, a CUDA GPU and bf16/fp16",
            "flex_attention": "needs CUDA to train (torch has no FlexAttention backward on CPU)",
        }.get(requested, "")
        raise UserError(
            f"model.attn_implementation: {requested!r} cannot run on {device} with {dtype_name} ({why}); "
            f"available here: {', '.join(available)} (or 'auto')"
        )
    if chosen == VARLEN_ATTENTION:
        register_varlen_attention()
    (log or logger.info)(
        f"attention: {describe_attn_implementation(chosen, device, dtype)}; requested {requested!r} on {device} "
        f"{dtype_name}; padding-free backends here, fastest first: {', '.join(available)}"
    )
    return chosen


def packed_attention_kwargs(
    row: dict[str, Any], attn_implementation: str, device: torch.device | str | None = None
) -> dict[str, Any]:
    """Extra keyword arguments for the decoder's forward on a packed row, for the chosen backend.

    ``flash_attention_2`` and ``crlft_varlen`` get the row's precomputed ``cu_seqlens`` and ``max_seqlen``
    (:func:`crlft.packing.flash_attention_kwargs`), which spares them finding the conversations in
    ``position_ids`` in every layer (a device sync each); the others need nothing beyond ``position_ids`` and
    ``use_cache=False``, which :func:`crlft.loss.causal_lm_loss_parts` always passes.

    Args:
        row: a packed row from :func:`crlft.collate.pack_row`.
        attn_implementation: the name :func:`choose_attn_implementation` returned.
        device: the model's device.

    Returns:
        A dict to splat into ``causal_lm_loss_parts(model, row, **kwargs)`` or the decoder's forward.
    """
    if attn_implementation in _VARLEN_KWARGS_BACKENDS:
        return flash_attention_kwargs(row, device)
    return {}


# ----------------------------------------------------------------------------------------------------------------
# The varlen kernel
# ----------------------------------------------------------------------------------------------------------------


def register_varlen_attention() -> str:
    """Registers :func:`varlen_attention_forward` with transformers as ``crlft_varlen`` (idempotent).

    Returns:
        The registered name, :data:`VARLEN_ATTENTION`.
    """
    AttentionInterface.register(VARLEN_ATTENTION, varlen_attention_forward)
    return VARLEN_ATTENTION


def _cu_seqlens_from_position_ids(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Conversation boundaries of flattened rows from position ids that restart at 0 (one device sync)."""
    flat = position_ids.reshape(-1)
    starts = (flat == 0).nonzero().reshape(-1).to(torch.int32)
    if starts.numel() == 0 or int(starts[0]) != 0:
        raise ValueError("packed position_ids must start every conversation (and the row) at 0")
    end = torch.tensor([flat.numel()], dtype=torch.int32, device=flat.device)
    cu_seqlens = torch.cat([starts, end])
    return cu_seqlens, int((cu_seqlens[1:] - cu_seqlens[:-1]).max())


def _segmentwise_sdpa(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seqlens: torch.Tensor,
    scale: float | None,
    window: int | None,
) -> torch.Tensor:
    """Causal attention of each ``[start, end)`` segment of ``[T, H, D]`` tensors, one SDPA call per segment.

    Padding-free like a varlen kernel (work O(Σ L²)), in plain PyTorch, so it runs and trains on any device.
    ``window`` is the number of keys a query may see, itself included (transformers' ``sliding_window``).
    """
    num_heads, num_kv_heads = query.shape[1], key.shape[1]
    if num_kv_heads != num_heads:
        # Repeating K/V once for the row is cheaper than SDPA's enable_gqa, which on CPU takes the math path.
        key = key.repeat_interleave(num_heads // num_kv_heads, dim=1)
        value = value.repeat_interleave(num_heads // num_kv_heads, dim=1)
    # [1, H, T, D]: SDPA attends over dim -2, and its fused CPU kernel only takes 4-D inputs.
    q, k, v = (x.transpose(0, 1).unsqueeze(0) for x in (query, key, value))
    bounds = cu_seqlens.tolist()
    outputs = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        length = end - start
        if length == 0:
            continue
        qs, ks, vs = q[:, :, start:end], k[:, :, start:end], v[:, :, start:end]
        if window is not None and length > window:
            offset = torch.arange(length, device=q.device)
            distance = offset[:, None] - offset[None, :]
            band = (distance >= 0) & (distance < window)
            out = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=band, scale=scale)
        else:
            out = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale)
        outputs.append(out)
    return torch.cat(outputs, dim=2)[0].transpose(0, 1)  # [T, H, D]


def _torch_varlen(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    scale: float | None,
    window: int | None,
) -> torch.Tensor:
    """PyTorch's varlen FlashAttention on ``[T, H, D]`` tensors, causal, with an optional sliding window."""
    # Imported here: the module exists only in recent torch builds, and this path runs only where it was found usable.
    from torch.nn.attention.varlen import varlen_attn

    # (left, right) are inclusive: (W - 1, 0) lets a query see W keys, itself included; (-1, 0) is plain causal.
    left = window - 1 if window is not None and window < max_seqlen else -1
    gqa: dict[str, bool] = {}
    if query.shape[1] != key.shape[1]:
        if _varlen_takes_enable_gqa(varlen_attn):
            gqa["enable_gqa"] = True
        else:  # torch 2.11's varlen_attn has no enable_gqa: give it as many K/V heads as query heads
            repeats = query.shape[1] // key.shape[1]
            key, value = key.repeat_interleave(repeats, dim=1), value.repeat_interleave(repeats, dim=1)
    return varlen_attn(
        query,
        key,
        value,
        cu_seqlens,
        cu_seqlens,
        max_seqlen,
        max_seqlen,
        scale=scale,
        window_size=(left, 0),
        **gqa,
    )


@functools.cache
def _varlen_takes_enable_gqa(varlen_attn: Any) -> bool:
    """Whether this torch's ``varlen_attn`` has the ``enable_gqa`` parameter (2.13 has, 2.11 has not)."""
    return "enable_gqa" in inspect.signature(varlen_attn).parameters


def varlen_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    cu_seq_lens_k: torch.Tensor | None = None,
    max_length_q: int | None = None,
    max_length_k: int | None = None,
    position_ids: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Causal attention over the conversations of packed rows, without a mask (transformers' attention API).

    Each conversation attends only to itself. The boundaries come from ``cu_seq_lens_q`` / ``max_length_q``
    (pass :func:`packed_attention_kwargs` to the model's forward), else from ``position_ids`` restarting at 0,
    else every batch row is one sequence. On CUDA in bf16/fp16 with PyTorch's varlen kernel available it runs
    that kernel; elsewhere one ``scaled_dot_product_attention`` per conversation.

    Args:
        module: the attention module (unused; part of the interface).
        query: ``[B, H, T, D]``.
        key: ``[B, H_kv, T, D]`` (grouped-query attention when ``H_kv < H``).
        value: ``[B, H_kv, T, D]``.
        attention_mask: must be None: packed rows carry their boundaries, not a mask (transformers passes None
            for this backend).
        dropout: must be 0 in training (the kernels here have no attention dropout).
        scaling: softmax scale (default ``D ** -0.5``).
        sliding_window: keys a query may see, itself included (Mistral's ``sliding_window``), or None.
        softcap: not supported (None).
        cu_seq_lens_q: int32 ``[num_segments + 1]`` boundaries over the flattened ``B * T`` tokens.
        cu_seq_lens_k: must equal ``cu_seq_lens_q`` (self-attention).
        max_length_q: the longest segment.
        max_length_k: unused (equal to ``max_length_q``).
        position_ids: ``[B, T]``, used only when no ``cu_seq_lens_q`` is given.
        **kwargs: other transformers keyword arguments, ignored.

    Returns:
        ``(output [B, T, H, D], None)``.

    Raises:
        ValueError: a KV cache (query and key lengths differ), a mask, dropout, softcap, or boundaries that do not
            cover the row.
    """
    del module, max_length_k, kwargs
    batch, num_heads, length, head_dim = query.shape
    if key.shape[2] != length:
        raise ValueError(
            f"{VARLEN_ATTENTION} is a training kernel for packed rows and has no KV cache (query length {length}, "
            f"key length {key.shape[2]}); generate with attn_implementation='sdpa'"
        )
    if attention_mask is not None:
        raise ValueError(f"{VARLEN_ATTENTION} takes no attention_mask: give packed rows cu_seqlens or position_ids")
    if dropout:
        raise ValueError(f"{VARLEN_ATTENTION} has no attention dropout; set the model's attention_dropout to 0")
    if softcap is not None:
        raise ValueError(f"{VARLEN_ATTENTION} does not support attention logit softcapping")
    num_tokens = batch * length
    if cu_seq_lens_q is None:
        if position_ids is not None:
            cu_seq_lens_q, max_length_q = _cu_seqlens_from_position_ids(position_ids.expand(batch, -1))
        else:
            cu_seq_lens_q = torch.arange(0, num_tokens + 1, length, dtype=torch.int32, device=query.device)
            max_length_q = length
    elif cu_seq_lens_k is not None and cu_seq_lens_k is not cu_seq_lens_q and not torch.equal(
        cu_seq_lens_k, cu_seq_lens_q
    ):
        raise ValueError(f"{VARLEN_ATTENTION} is self-attention: cu_seq_lens_k must equal cu_seq_lens_q")
    cu_seqlens = cu_seq_lens_q.to(device=query.device, dtype=torch.int32)
    if max_length_q is None:
        max_length_q = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    max_seqlen = int(max_length_q)

    # [B, H, T, D] -> [B * T, H, D]: the token-major layout varlen kernels use.
    q, k, v = (x.transpose(1, 2).reshape(num_tokens, x.shape[1], head_dim) for x in (query, key, value))
    if q.is_cuda and q.dtype in _HALF_DTYPES and _torch_varlen_usable(q.device, q.dtype):
        out = _torch_varlen(q, k, v, cu_seqlens, max_seqlen, scaling, sliding_window)
    else:
        if int(cu_seqlens[-1]) != num_tokens or int(cu_seqlens[0]) != 0:
            raise ValueError(
                f"cu_seqlens covers tokens {int(cu_seqlens[0])}..{int(cu_seqlens[-1])} but the row has {num_tokens}"
            )
        out = _segmentwise_sdpa(q, k, v, cu_seqlens, scaling, sliding_window)
    return out.reshape(batch, length, num_heads, head_dim), None


__all__ = [
    "ATTN_IMPLEMENTATIONS",
    "VARLEN_ATTENTION",
    "available_attn_implementations",
    "choose_attn_implementation",
    "describe_attn_implementation",
    "packed_attention_kwargs",
    "register_varlen_attention",
    "varlen_attention_forward",
]
