"""Memory per GPU of a run: weights, gradients, optimizer state and buffers per ZeRO stage, and activations.

ZeRO paper accounting plus what autograd keeps per token per decoder layer; the derivation is in ``docs/design.md``
("crlft plan"). Real use is within a few GB of this (allocator fragmentation, CUDA context, kernel workspaces).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


def activation_bytes(
    config: Any,
    num_tokens: int,
    gradient_checkpointing: bool,
    bytes_per_value: int = 2,
    chunk_tokens: int = 4096,
    loss_method: str = "fused",
) -> int:
    """Activation memory of one packed row of ``num_tokens`` tokens (formula in ``docs/design.md``).

    Args:
        config: the model's Hugging Face config.
        num_tokens: tokens of the packed row (``train.batch_max_len``).
        gradient_checkpointing: whether each decoder layer is recomputed in the backward.
        bytes_per_value: 2 for bf16/fp16 activations, 4 for fp32.
        chunk_tokens: supervised targets per chunk of the loss.
        loss_method: ``"fused"`` (what ``auto`` picks for a plain ``nn.Linear`` lm_head) or ``"checkpoint"``.

    Returns:
        Bytes.
    """
    h = int(config.hidden_size)
    num_layers = int(config.num_hidden_layers)
    num_heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or h // num_heads)
    h_kv = int(getattr(config, "num_key_value_heads", None) or num_heads) * head_dim
    intermediate = int(getattr(config, "intermediate_size", 4 * h))
    b = bytes_per_value
    per_token_layer = 2 * (4 * h + b * h) + 2 * b * h + 2 * b * h_kv + 4 * b * intermediate
    if gradient_checkpointing:
        kept = num_layers * num_tokens * h * b + num_tokens * per_token_layer
    else:
        kept = num_layers * num_tokens * per_token_layer
    chunk_logits = min(chunk_tokens, num_tokens) * int(config.vocab_size) * 4  # one fp32 copy of a chunk's logits
    if loss_method == "checkpoint":
        loss = 3 * chunk_logits
    else:
        loss = 2 * chunk_logits + int(config.vocab_size) * h * b + num_tokens * h * b  # + grad_W + grad_h
    return kept + loss


@dataclass
class MemoryEstimate:
    """Bytes per GPU of one ZeRO stage (and per rank in CPU memory when offloading)."""

    zero_stage: int
    weights: float
    gradients: float
    optimizer: float
    buffers: float
    activations: float
    cpu: float = 0.0

    @property
    def total(self) -> float:
        """Sum of the GPU parts."""
        return self.weights + self.gradients + self.optimizer + self.buffers + self.activations


def memory_per_gpu(
    num_params: int,
    num_gpus: int,
    zero_stage: int,
    activations: float,
    ds_config: dict[str, Any],
    bf16: bool = True,
    offload_optimizer: bool = False,
    offload_param: bool = False,
    num_trainable: int | None = None,
) -> MemoryEstimate:
    """GPU memory of one rank for a ZeRO stage (formulas in ``docs/design.md``).

    Args:
        num_params: Ψ, parameters being trained.
        num_gpus: N, data-parallel ranks.
        zero_stage: 0-3.
        activations: bytes of activations (:func:`activation_bytes`).
        ds_config: the DeepSpeed configuration (bucket sizes are read from its ``zero_optimization``).
        bf16: mixed precision (bf16 weights and gradients, fp32 master copy) or plain fp32.
        offload_optimizer: optimizer state in CPU memory.
        offload_param: weights in CPU memory (stage 3 only).
        num_trainable: parameters that train (LoRA: the adapters and token rows); default all ``num_params``.
            Gradients and optimizer state are kept for these only; the frozen rest costs its weights.

    Returns:
        A :class:`MemoryEstimate`.
    """
    b = 2 if bf16 else 4
    # DeepSpeed keeps an fp32 copy of each rank's partition under every ZeRO stage, whatever the model's dtype
    # (`single_partition_of_fp32_groups`, `fp32_partitioned_groups_flat`: a clone even of fp32 weights).
    k = 12 if bf16 or zero_stage >= 1 else 8
    psi, n = float(num_params), float(num_gpus)
    trained = psi if num_trainable is None else float(num_trainable)
    zero = ds_config.get("zero_optimization", {})
    weights = b * psi / (n if zero_stage >= 3 else 1)
    # Stages 2 and 3 hold the reduced gradient partition in the model's dtype and, at the step, its fp32 copy as the
    # master partition's .grad (DeepSpeed 0.19, stage_1_and_2.py / stage3.py).
    gradients = (b + 4) * trained / n if zero_stage >= 2 else b * trained
    optimizer = k * trained / (n if zero_stage >= 1 else 1)
    cpu = 0.0
    if offload_optimizer and zero_stage >= 1:
        cpu += optimizer
        optimizer = 0.0
    if offload_param and zero_stage >= 3:
        cpu += weights
        weights = 0.0
    reduce_bucket = float(zero.get("reduce_bucket_size", 5e8))
    if zero_stage in (1, 2):
        # setup_buckets: one gradient bucket of reduce_bucket_size elements, two with overlap_comm (double buffering).
        buffers = (2 if zero.get("overlap_comm") else 1) * reduce_bucket * b
    elif zero_stage == 3:
        # The gathered parameters, the gradient bucket and, with reduce_scatter (the default), the copy of the bucket's
        # gradients that reduce_scatter_coalesced concatenates (stage3.py __avg_scatter_grads; measured on CPU ranks).
        copies = 2 if zero.get("reduce_scatter", True) else 1
        buffers = (float(zero.get("stage3_max_live_parameters", 1e9)) + copies * reduce_bucket) * b
    else:
        buffers = 0.0
    return MemoryEstimate(zero_stage, weights, gradients, optimizer, buffers, float(activations), cpu)


__all__ = ["MemoryEstimate", "activation_bytes", "memory_per_gpu"]
