"""The C-RLFT loss: reward-weighted, class-conditioned cross-entropy over packed rows, normalised per global step.

``L = Σ w·CE / D`` with both sums over the whole optimizer step (every rank, every micro-batch), so the update does
not depend on world size or accumulation; the cross-entropy is computed chunk by chunk over the supervised
positions only, with each chunk's gradients computed in the forward. Why, and the two normalisations, are in
``docs/design.md`` ("The loss").
"""

from __future__ import annotations

import math
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

from crlft.collate import IGNORE_INDEX
from crlft.lora import output_rows

# 4096 supervised targets x 32,002 vocabulary x 4 bytes = 0.5 GB per fp32 copy of a chunk's logits; at most about
# two copies live at once on the fused path (three to five on the checkpointed fallback). Small enough next to a 7B
# model's activations, large enough that the lm_head matmuls stay efficient on a GPU.
DEFAULT_CHUNK_TOKENS = 4096

LossNormalization = Literal["weight_sum", "weight_sum_row_mean", "num_tokens"]

# "fused": gradients computed in the forward (needs a plain nn.Linear lm_head); "checkpoint": per-chunk lm_head
# calls under activation checkpointing (any lm_head module); "auto": fused when the lm_head allows it.
LossMethod = Literal["auto", "fused", "checkpoint"]


class LossParts(NamedTuple):
    """The loss of one packed row, before global normalisation.

    A named tuple rather than a dataclass so that DeepSpeed ZeRO-3, which hooks the tensors a module returns,
    can see the tensors inside it (it understands tuples, lists and dicts).

    Attributes:
        weighted_ce_sum: differentiable fp32 scalar ``Σ_t w_t · CE_t`` over the row's supervised targets.
        ce: detached fp32 ``[T]`` cross-entropy per position (0 where the weight is 0), for logging.
        correct: detached bool ``[T]``, True where argmax(logits) equals the label (False where the weight is 0).
        weights: detached fp32 ``[T]`` loss weights of the row (as given).
        supervised: detached bool ``[T]``, True where the weight is not 0.
    """

    weighted_ce_sum: torch.Tensor
    ce: torch.Tensor
    correct: torch.Tensor
    weights: torch.Tensor
    supervised: torch.Tensor


# ----------------------------------------------------------------------------------------------------------------
# Fused path: each chunk's gradients are computed in the forward
# ----------------------------------------------------------------------------------------------------------------


class _LinearWeightedCrossEntropy(torch.autograd.Function):
    """``Σ w · CE(h[positions]·Wᵀ + b, labels)`` whose forward also computes the gradients of its inputs.

    Forward inputs: ``hidden`` ``[T, H]``, ``weight`` ``[V, H]``, ``bias`` ``[V]`` or None, ``positions`` ``[N]``
    (the supervised rows of ``hidden``), ``labels`` and ``loss_weights`` ``[N]`` (fp32), ``chunk_size``, and which
    gradients to compute (``hidden``, ``weight``, ``bias``). Outputs: the fp32 scalar sum, and the detached fp32
    ``[T]`` per-position CE and bool ``[T]`` correctness (0 / False off ``positions``).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, positions, labels, loss_weights, chunk_size, needs_grad, row_index=None,
                row_values=None):
        need_hidden, need_weight, need_bias, need_rows = needs_grad
        num_positions = hidden.shape[0]
        device = hidden.device
        total = torch.zeros((), dtype=torch.float32, device=device)
        ce = torch.zeros(num_positions, dtype=torch.float32, device=device)
        correct = torch.zeros(num_positions, dtype=torch.bool, device=device)
        grad_hidden = torch.zeros_like(hidden) if need_hidden else None
        # grad_W in W's dtype: addmm_ accumulates each chunk's product into it in one rounding step, no fp32 copy.
        grad_weight = torch.zeros_like(weight) if need_weight else None
        grad_bias = torch.zeros(weight.shape[0], dtype=torch.float32, device=device) if need_bias else None
        grad_rows = torch.zeros_like(row_values) if need_rows else None
        if row_values is not None:
            # Rows row_index of the effective weight are row_values (peft's trainable tokens): logits of those
            # columns come from row_values, and grad_h = dlogits·W + dlogits[:, rows]·(row_values − W[rows]).
            row_correction = row_values - weight.index_select(0, row_index) if need_hidden else None
        need_any = need_hidden or need_weight or need_bias or need_rows
        for start in range(0, positions.numel(), chunk_size):
            idx = positions[start : start + chunk_size]
            chunk_labels = labels[start : start + chunk_size]
            chunk_weights = loss_weights[start : start + chunk_size]
            hidden_chunk = hidden.index_select(0, idx)
            logits = F.linear(hidden_chunk, weight, bias)  # [C, V] in the model's dtype
            if row_values is not None:
                logits.index_copy_(1, row_index, F.linear(hidden_chunk, row_values))
            chunk_correct = logits.argmax(dim=-1) == chunk_labels
            logits = logits.float()  # (frees a bf16 original before the next [C, V] tensor exists)
            # log_softmax in fp32, as the naive version's F.cross_entropy(logits.float()): same values, same
            # gradient formula (exp(log_softmax) · w − w · onehot), so the two agree to rounding.
            log_probs = F.log_softmax(logits, dim=-1)
            del logits
            chunk_ce = -log_probs.gather(1, chunk_labels[:, None]).squeeze(1)
            total += (chunk_ce * chunk_weights).sum()
            ce.index_copy_(0, idx, chunk_ce)
            correct.index_copy_(0, idx, chunk_correct)
            if not need_any:
                del log_probs
                continue
            dlogits = log_probs.exp_().mul_(chunk_weights[:, None])  # in place: no further [C, V] fp32 copy
            dlogits.scatter_add_(1, chunk_labels[:, None], -chunk_weights[:, None])
            del log_probs
            if grad_bias is not None:
                grad_bias += dlogits.sum(dim=0)
            dlogits_mm = dlogits.to(weight.dtype)  # the naive backward also casts the gradient back to W's dtype
            del dlogits
            if grad_hidden is not None:
                chunk_grad_hidden = dlogits_mm @ weight
                if row_values is not None:
                    chunk_grad_hidden.addmm_(dlogits_mm.index_select(1, row_index), row_correction)
                grad_hidden.index_copy_(0, idx, chunk_grad_hidden)
            if grad_weight is not None:
                grad_weight.addmm_(dlogits_mm.t(), hidden_chunk)
            if grad_rows is not None:
                grad_rows.addmm_(dlogits_mm.index_select(1, row_index).t(), hidden_chunk)
            del dlogits_mm  # before the next chunk's logits exist: at most two [C, V] copies at a time
        if grad_bias is not None:
            grad_bias = grad_bias.to(bias.dtype)
        if grad_weight is not None and row_values is not None:
            grad_weight.index_fill_(0, row_index, 0)  # those rows of the effective weight are row_values, not W's
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias, grad_rows)
        ctx.mark_non_differentiable(ce, correct)
        return total, ce, correct

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_total, _grad_ce, _grad_correct):
        # Scaled in place, to not hold a second [V, H] and [T, H] copy while the decoder's backward starts. A second
        # backward through the same graph (retain_graph=True) therefore fails: autograd sees the saved tensors were
        # modified and raises, instead of scaling them twice.
        grads = []
        for grad in ctx.saved_tensors:
            if grad is not None:
                # A bf16 tensor times a 0-dim fp32 tensor rounds the factor (the trainer's loss scale) to bf16, a
                # bias of up to 0.4% on the whole update; times a Python number it multiplies in fp32 and rounds
                # once, as the naive backward does. (.item() waits for the device, once per row.)
                grad.mul_(grad_total if grad.dtype == torch.float32 else grad_total.item())
            grads.append(grad)
        return grads[0], grads[1], grads[2], None, None, None, None, None, None, grads[3]


def _plain_linear(module: nn.Module) -> bool:
    """True when ``module`` is a plain ``nn.Linear`` whose call computes exactly ``F.linear(x, weight, bias)``."""
    return (
        isinstance(module, nn.Linear)
        and type(module).forward is nn.Linear.forward
        and "forward" not in module.__dict__  # no instance-level replacement (e.g. accelerate's device hooks)
    )


def _fused_target(lm_head: nn.Module) -> tuple[nn.Linear, tuple[torch.Tensor, torch.Tensor] | None] | None:
    """``(linear, rows)`` the fused path computes with, or None when it cannot.

    A plain ``nn.Linear`` gives ``(lm_head, None)``. An ``lm_head`` wrapped by peft's trainable tokens (LoRA runs,
    ``crlft.lora.output_rows``) gives its base ``Linear`` and ``(row indices, trainable rows)``: the effective
    weight is the base's with those rows replaced, as in peft's own forward (which ignores a bias).
    """
    if _plain_linear(lm_head):
        return lm_head, None
    rows = output_rows(lm_head)
    if rows is not None and _plain_linear(rows[0]) and rows[0].bias is None:
        return rows[0], (rows[1], rows[2])
    return None


def _fused_applicable(lm_head: nn.Module) -> bool:
    """True when the fused path can compute what a call of ``lm_head`` computes (see :func:`_fused_target`)."""
    return _fused_target(lm_head) is not None


def _fused_loss(
    hidden_states: torch.Tensor,
    lm_head: nn.Module,
    positions: torch.Tensor,
    labels: torch.Tensor,
    weights: torch.Tensor,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Runs :class:`_LinearWeightedCrossEntropy` as the forward of one ``lm_head`` call.

    Calling the module (with its forward swapped for the fused function during the call) lets DeepSpeed ZeRO-3's
    module hooks do for the fused function what they do for a ``Linear``: gather the sharded weight before,
    re-gather it before the backward, and reduce its gradient. Only the differentiable sum leaves the module: ZeRO-3
    hooks every tensor a module returns, and the detached logging outputs would leave hooks that never fire. For an
    ``lm_head`` wrapped by peft's trainable tokens the call is its base ``Linear``'s (see :func:`_fused_target`).
    """
    logging_outputs: dict[str, torch.Tensor] = {}
    linear, rows = _fused_target(lm_head)

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        # Use the module's input as given: ZeRO-3's hooks may have wrapped it to learn when its backward ends.
        grad_enabled = torch.is_grad_enabled()
        weight, bias = linear.weight, linear.bias
        # Read inside the call: under ZeRO-3 DeepSpeed gathers a parameter read during the forward (the trainable
        # rows live in peft's wrapper, not in this Linear) and registers it with this module.
        row_index, row_values = output_rows(lm_head)[1:] if rows is not None else (None, None)
        needs_grad = (
            grad_enabled and hidden.requires_grad,
            grad_enabled and weight.requires_grad,
            grad_enabled and bias is not None and bias.requires_grad,
            grad_enabled and row_values is not None and row_values.requires_grad,
        )
        total, ce, correct = _LinearWeightedCrossEntropy.apply(
            hidden, weight, bias, positions, labels, weights, chunk_size, needs_grad, row_index, row_values
        )
        logging_outputs["ce"], logging_outputs["correct"] = ce, correct
        return total

    linear.forward = forward  # an instance attribute shadows nn.Linear.forward for this call only
    try:
        total = linear(hidden_states)
    finally:
        del linear.forward
    return total, logging_outputs["ce"], logging_outputs["correct"]


# ----------------------------------------------------------------------------------------------------------------
# Fallback path: per-chunk lm_head calls under activation checkpointing
# ----------------------------------------------------------------------------------------------------------------


def _chunk_loss(
    hidden_chunk: torch.Tensor, labels_chunk: torch.Tensor, weights_chunk: torch.Tensor, lm_head: nn.Module
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Weighted CE sum, per-token CE and correctness of one chunk; recomputed in the backward by checkpoint()."""
    # The module call (not F.linear on lm_head.weight) lets DeepSpeed ZeRO-3's hooks gather the sharded weight.
    logits = lm_head(hidden_chunk).float()  # [C, V]: the only full-vocabulary tensor, one chunk at a time
    ce = F.cross_entropy(logits, labels_chunk, reduction="none")
    correct = logits.detach().argmax(dim=-1) == labels_chunk
    return (ce * weights_chunk).sum(), ce, correct


def _checkpointed_loss(
    hidden_states: torch.Tensor,
    lm_head: nn.Module,
    positions: torch.Tensor,
    labels: torch.Tensor,
    weights: torch.Tensor,
    chunk_size: int,
    num_chunks: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``num_chunks`` checkpointed ``lm_head`` calls of ``chunk_size`` supervised targets each (some may be empty)."""
    num_positions = hidden_states.shape[0]
    device = hidden_states.device
    ce = torch.zeros(num_positions, dtype=torch.float32, device=device)
    correct = torch.zeros(num_positions, dtype=torch.bool, device=device)
    total = torch.zeros((), dtype=torch.float32, device=device)
    for k in range(num_chunks):
        sl = slice(k * chunk_size, (k + 1) * chunk_size)
        idx = positions[sl]
        # index_select keeps the graph: its backward scatters the gradient into the selected rows only.
        hidden_chunk = hidden_states.index_select(0, idx)
        weighted_sum, chunk_ce, chunk_correct = checkpoint(
            _chunk_loss, hidden_chunk, labels[sl], weights[sl], lm_head, use_reentrant=False
        )
        total = total + weighted_sum
        ce.index_copy_(0, idx, chunk_ce.detach())
        correct.index_copy_(0, idx, chunk_correct)
    return total, ce, correct


# ----------------------------------------------------------------------------------------------------------------
# The row's loss
# ----------------------------------------------------------------------------------------------------------------


def chunked_weighted_cross_entropy(
    hidden_states: torch.Tensor,
    lm_head: nn.Module,
    labels: torch.Tensor,
    loss_weights: torch.Tensor,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    num_chunks: int | None = None,
    method: LossMethod = "auto",
) -> LossParts:
    """Weighted cross-entropy of one packed row without materialising its full ``[T, vocab]`` logits.

    Args:
        hidden_states: ``[T, H]`` (or ``[1, T, H]``) final hidden states of the row (after the final norm).
        lm_head: the output projection module. It is always *called* (never bypassed through its ``weight``), so
            DeepSpeed ZeRO-3's hooks gather its sharded weight: once per row on the fused path, once per chunk in
            the forward and again in the backward on the checkpointed one.
        labels: ``[T]`` (or ``[1, T]``) target ids, already shifted; ``-100`` where not supervised.
        loss_weights: ``[T]`` (or ``[1, T]``) shifted loss weights; only positions with a weight ≠ 0 get logits.
        chunk_tokens: supervised targets per chunk; bounds the memory of the logits (see ``docs/design.md``).
        num_chunks: if given, split the supervised targets into exactly this many chunks (some may be empty)
            instead. The checkpointed path then calls ``lm_head`` the same number of times on every rank whatever
            its row holds, which it needs under ZeRO-3 (every call all-gathers the weight: ranks calling it a
            different number of times would hang); use :func:`num_chunks_for` to choose it. The fused path calls
            ``lm_head`` once per row anyway, so there it only sets the chunk size.
        method: ``"fused"`` (gradients computed in the forward; ``lm_head`` must be a plain ``nn.Linear``),
            ``"checkpoint"`` (any ``lm_head``; recomputes each chunk's logits in the backward, ~1.5x the fused
            path's time), or ``"auto"``: fused when ``lm_head`` allows it.

    Returns:
        A :class:`LossParts` whose ``weighted_ce_sum`` is ``Σ w_t · CE_t`` accumulated in fp32. On the fused path
        its backward can run only once (no ``retain_graph``).

    Raises:
        ValueError: on mismatched shapes, a non-positive ``chunk_tokens``/``num_chunks``, an unknown ``method``,
            ``"fused"`` for an ``lm_head`` that is not a plain ``nn.Linear``, or a weighted target whose label is
            ``-100`` (the packer never produces one; its weight would be silently lost otherwise).
    """
    if chunk_tokens < 1 or (num_chunks is not None and num_chunks < 1):
        raise ValueError(f"chunk_tokens and num_chunks must be ≥ 1, got {chunk_tokens} and {num_chunks}")
    if method not in ("auto", "fused", "checkpoint"):
        raise ValueError(f"method must be 'auto', 'fused' or 'checkpoint', got {method!r}")
    fused = _fused_applicable(lm_head)
    if method == "fused" and not fused:
        raise ValueError(
            f"method='fused' needs a plain torch.nn.Linear lm_head, got {type(lm_head).__name__}; use 'checkpoint'"
        )
    fused = fused and method != "checkpoint"
    if hidden_states.dim() == 3:
        if hidden_states.shape[0] != 1:
            raise ValueError(f"expected one packed row, got hidden states of shape {tuple(hidden_states.shape)}")
        hidden_states = hidden_states[0]
    labels = labels.reshape(-1)
    loss_weights = loss_weights.reshape(-1)
    num_positions = hidden_states.shape[0]
    if labels.shape[0] != num_positions or loss_weights.shape[0] != num_positions:
        raise ValueError(
            f"hidden states have {num_positions} positions, labels {labels.shape[0]}, loss_weights "
            f"{loss_weights.shape[0]}"
        )
    weights = loss_weights.detach().float()
    supervised = weights != 0
    positions = supervised.nonzero().squeeze(-1)
    num_supervised = positions.numel()
    selected_labels = labels.index_select(0, positions)
    if num_supervised and bool((selected_labels == IGNORE_INDEX).any()):
        raise ValueError("a position has a non-zero loss weight but label -100; labels and weights disagree")
    selected_weights = weights.index_select(0, positions)

    if num_chunks is None:
        # At least one (possibly empty) chunk: lm_head then takes part in every rank's backward, so its gradient
        # exists (as zeros) even on a rank whose row has nothing supervised.
        num_chunks = max(1, math.ceil(num_supervised / chunk_tokens))
    chunk_size = max(1, math.ceil(num_supervised / num_chunks))

    if fused:
        total, ce, correct = _fused_loss(
            hidden_states, lm_head, positions, selected_labels, selected_weights, chunk_size
        )
    else:
        total, ce, correct = _checkpointed_loss(
            hidden_states, lm_head, positions, selected_labels, selected_weights, chunk_size, num_chunks
        )
    return LossParts(weighted_ce_sum=total, ce=ce, correct=correct, weights=weights, supervised=supervised)


def num_chunks_for(max_row_tokens: int, chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> int:
    """A fixed chunk count for rows of at most ``max_row_tokens`` positions (for ``num_chunks`` under ZeRO-3).

    With it no chunk holds more than ``chunk_tokens`` targets, whatever the row, and on the checkpointed path every
    rank makes the same number of ``lm_head`` calls (the fused path makes one per row in any case).
    """
    return max(1, math.ceil(max_row_tokens / chunk_tokens))


def causal_lm_loss_parts(
    model: nn.Module,
    row: dict[str, Any],
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    num_chunks: int | None = None,
    method: LossMethod = "auto",
    **forward_kwargs: Any,
) -> LossParts:
    """Runs a Hugging Face causal LM's decoder on a packed row and the chunked weighted CE on its output.

    The decoder (``model.get_decoder()``, e.g. ``MistralModel``) gives the final hidden states; the full
    ``model.forward`` is not used because it would compute logits for every position at once.

    Args:
        model: a ``PreTrainedModel`` for causal LM (not the DeepSpeed engine: pass ``engine.module``, or wrap
            the model in :class:`WeightedLossModel` and give that to DeepSpeed).
        row: a packed row (``input_ids``, ``position_ids``, ``labels``, ``loss_weights``, each ``[1, T]``) on the
            model's device.
        chunk_tokens: see :func:`chunked_weighted_cross_entropy`.
        num_chunks: see :func:`chunked_weighted_cross_entropy`.
        method: see :func:`chunked_weighted_cross_entropy`.
        **forward_kwargs: passed to the decoder, e.g. ``crlft.packing.flash_attention_kwargs(row)``.

    Returns:
        The row's :class:`LossParts`.
    """
    decoder = model.get_decoder()
    # No attention_mask and no cache: transformers then reads the packed segments from position_ids.
    outputs = decoder(input_ids=row["input_ids"], position_ids=row["position_ids"], use_cache=False, **forward_kwargs)
    return chunked_weighted_cross_entropy(
        outputs.last_hidden_state,
        model.get_output_embeddings(),
        row["labels"],
        row["loss_weights"],
        chunk_tokens=chunk_tokens,
        num_chunks=num_chunks,
        method=method,
    )


class WeightedLossModel(nn.Module):
    """Wraps a causal LM so that one ``forward(row)`` returns the row's :class:`LossParts`.

    Give this wrapper (not the bare model) to ``deepspeed.initialize``: DeepSpeed ZeRO-3 hooks the *root* module's
    forward to order its parameter prefetching, and a forward that calls the decoder and ``lm_head`` separately
    would bypass that. The Hugging Face model stays reachable as ``.model`` (for ``save_pretrained``).

    Args:
        model: the causal LM.
        chunk_tokens: see :func:`chunked_weighted_cross_entropy`.
        num_chunks: see :func:`chunked_weighted_cross_entropy`; ``num_chunks_for(max row length)`` keeps ranks in
            step under ZeRO-3 when the checkpointed path is taken (harmless on the fused path).
        method: see :func:`chunked_weighted_cross_entropy`.
    """

    def __init__(
        self,
        model: nn.Module,
        chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
        num_chunks: int | None = None,
        method: LossMethod = "auto",
    ):
        super().__init__()
        self.model = model
        self.chunk_tokens = chunk_tokens
        self.num_chunks = num_chunks
        self.method = method

    def forward(self, row: dict[str, Any], **forward_kwargs: Any) -> LossParts:
        """Loss parts of one packed row; see :func:`causal_lm_loss_parts`."""
        return causal_lm_loss_parts(
            self.model, row, self.chunk_tokens, self.num_chunks, self.method, **forward_kwargs
        )


# ----------------------------------------------------------------------------------------------------------------
# Global normalisation
# ----------------------------------------------------------------------------------------------------------------


def global_denominator(
    global_weight_sum: float,
    global_num_supervised_tokens: int,
    mode: LossNormalization,
    rows_per_step: int | None = None,
) -> float:
    """The step's loss denominator ``D`` for ``train.loss_normalization``.

    Args:
        global_weight_sum: ``Σ w`` over all ranks and micro-batches of the step (``PackedStep.global_weight_sum``).
        global_num_supervised_tokens: supervised targets in the step, all ranks
            (``PackedStep.global_num_supervised_tokens``).
        mode: ``"weight_sum"``, ``"weight_sum_row_mean"`` or ``"num_tokens"``.
        rows_per_step: packed rows per optimizer step (ranks x ``grad_accum``); needed by ``weight_sum_row_mean``,
            whose ``D`` is ``Σ w`` times it (OpenChat's trainer before its fix of 2023-11-25 averaged the ranks'
            ``Σ_rank w·CE / Σ_step w``).

    Returns:
        ``D`` (0.0 for a step with nothing to learn).
    """
    if mode == "weight_sum":
        return float(global_weight_sum)
    if mode == "num_tokens":
        return float(global_num_supervised_tokens)
    if mode == "weight_sum_row_mean":
        if rows_per_step is None or rows_per_step < 1:
            raise ValueError(f"weight_sum_row_mean needs rows_per_step >= 1, got {rows_per_step!r}")
        return float(global_weight_sum) * rows_per_step
    raise ValueError(
        f"train.loss_normalization must be 'weight_sum', 'weight_sum_row_mean' or 'num_tokens', got {mode!r}"
    )


def loss_scale_for_backward(global_denominator: float, world_size: int, grad_accum: int) -> float:
    """Factor to multiply a row's ``weighted_ce_sum`` by before ``engine.backward``.

    Derivation. Let ``ℓ_{r,a} = Σ_{t in row (r, a)} w_t · CE_t`` be the weighted sum of rank ``r``'s micro-batch
    ``a`` (``W`` ranks, ``A`` micro-batches), and ``s`` the factor returned here. The trainer calls
    ``engine.backward(s · ℓ_{r,a})``. DeepSpeed divides the loss by ``gradient_accumulation_steps = A`` before the
    backward, so rank ``r`` accumulates ``(s / A) · Σ_a ∇ℓ_{r,a}``; its data-parallel reduction then *averages*
    over the ``W`` ranks. The gradient the optimizer sees is therefore::

        (s / (A · W)) · Σ_r Σ_a ∇ℓ_{r,a} = (s / (A · W)) · ∇ Σ_global w · CE

    and we want ``∇ (Σ_global w · CE / D)``, so ``s = A · W / D``. (DeepSpeed's ``gradient_predivide_factor`` only
    moves the division by ``W`` before or after the all-reduce; the result is the same.)

    Args:
        global_denominator: ``D`` from :func:`global_denominator`.
        world_size: data-parallel ranks ``W``.
        grad_accum: micro-batches per rank per step ``A`` (DeepSpeed's ``gradient_accumulation_steps``).

    Returns:
        ``s``; 0.0 when ``D`` is 0 (no supervised target in the whole step: backward still runs on every rank,
        so collectives stay in step, but the gradient is zero).
    """
    if world_size < 1 or grad_accum < 1:
        raise ValueError(f"world_size and grad_accum must be ≥ 1, got {world_size} and {grad_accum}")
    if not math.isfinite(global_denominator) or global_denominator < 0:
        raise ValueError(f"the loss denominator must be a finite number ≥ 0, got {global_denominator}")
    if global_denominator == 0:
        return 0.0
    return world_size * grad_accum / global_denominator


__all__ = [
    "DEFAULT_CHUNK_TOKENS",
    "IGNORE_INDEX",
    "LossMethod",
    "LossParts",
    "WeightedLossModel",
    "causal_lm_loss_parts",
    "chunked_weighted_cross_entropy",
    "global_denominator",
    "loss_scale_for_backward",
    "num_chunks_for",
]
