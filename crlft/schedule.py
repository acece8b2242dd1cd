"""The learning-rate schedule (linear warm-up, cosine decay) and the AdamW optimizer DeepSpeed is given."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from deepspeed.ops.adam import DeepSpeedCPUAdam

from crlft.config import Recipe
from crlft.run_length import num_warmup_steps  # re-exported: the schedule's API


def lr_factor(step_index: int, total_steps: int, warmup_steps: int, min_ratio: float) -> float:
    """Learning rate of optimizer step ``step_index`` (0-based) as a fraction of the peak.

    Linear warm-up over ``warmup_steps`` steps reaching the peak at the last of them (the first step already gets
    ``1 / warmup_steps`` of it, none is wasted at 0), then a half cosine from the peak down to ``min_ratio`` at
    the last step ``total_steps - 1``.
    """
    if step_index < warmup_steps:
        return (step_index + 1) / warmup_steps
    decay_steps = total_steps - warmup_steps
    progress = min(1.0, (step_index - warmup_steps) / max(1, decay_steps - 1))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_scheduler_factory(total_steps: int, warmup_ratio: float, min_ratio: float) -> Callable:
    """A callable DeepSpeed gives the optimizer to, returning a ``LambdaLR`` following :func:`lr_factor`.

    DeepSpeed steps it once per optimizer step (at the accumulation boundary) and saves it in checkpoints.
    """
    warmup = num_warmup_steps(total_steps, warmup_ratio)

    def make(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda i: lr_factor(i, total_steps, warmup, min_ratio)
        )

    return make


def build_optimizer(model: torch.nn.Module, recipe: Recipe, lr: float, device: torch.device) -> torch.optim.Optimizer:
    """AdamW over all parameters with the recipe's betas, eps and decoupled weight decay (as OpenChat).

    The implementation follows where the optimizer state lives: DeepSpeed's vectorised ``DeepSpeedCPUAdam`` when
    ZeRO offloads it to the CPU (DeepSpeed requires it there), PyTorch's fused CUDA kernel on GPUs, and PyTorch's
    AdamW otherwise (CPU ranks).
    """
    t = recipe.train
    params = [p for p in model.parameters() if p.requires_grad]
    kwargs = {"lr": lr, "betas": tuple(t.betas), "eps": t.eps, "weight_decay": t.weight_decay}
    if recipe.deepspeed.offload_optimizer:
        return DeepSpeedCPUAdam(params, adamw_mode=True, **kwargs)
    if device.type == "cuda":
        return torch.optim.AdamW(params, fused=True, **kwargs)
    return torch.optim.AdamW(params, **kwargs)


__all__ = ["build_optimizer", "lr_factor", "lr_scheduler_factory", "num_warmup_steps"]
