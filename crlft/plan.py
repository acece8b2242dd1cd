"""``crlft plan RECIPE.yaml``: what a run will need, without a GPU and without loading weights.

The parameter count (the model built on the ``meta`` device), memory per GPU of each ZeRO stage, the steps per
epoch from the prepared dataset's packing plan, and the learning rate (``auto``: OpenChat's rule, also used by the
trainer). The accounting behind the estimates is in ``docs/design.md`` ("crlft plan").
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from huggingface_hub import try_to_load_from_cache
from transformers import AutoConfig, AutoModelForCausalLM, MistralConfig

from crlft.conditions import best_condition
from crlft.config import Recipe, deepspeed_config
from crlft.errors import UserError
from crlft.evaluation import eval_plan_lines
from crlft.known_bases import known_base, known_config
from crlft.loader import PackedLoader
from crlft.lora import count_lora_parameters, lora_activation_bytes
from crlft.memory import activation_bytes, memory_per_gpu
from crlft.model import resolve_model_dir
from crlft.prepare import load_prepared
from crlft.run_length import RunLength, few_steps_warning, run_length
from crlft.templates import get_template
from crlft.tokenizer import load_tokenizer, make_tokenizer

# OpenChat's auto learning rate (ochat/training_deepspeed/train.py, calculate_auto_lr): LLaMA's pre-training lr at
# LLaMA's batch of 4M tokens, scaled by the square root of the batch; Mistral tolerates less.
AUTO_LR_BASE = 3e-4
AUTO_LR_BASE_TOKENS = 4_000_000
AUTO_LR_DIVISORS = {"mistral": 6.0}

CPU_RANKS = 2  # what launch.sh starts without CUDA
GIB = 2**30


def machine_num_gpus() -> tuple[int, str]:
    """The ranks a launch on this machine gets, and where the number came from: ``$WORLD_SIZE``, else the CUDA
    devices, else launch.sh's 2 CPU ranks."""
    if os.environ.get("WORLD_SIZE", "").isdigit() and int(os.environ["WORLD_SIZE"]) > 0:
        return int(os.environ["WORLD_SIZE"]), "$WORLD_SIZE"
    if torch.cuda.is_available() and torch.cuda.device_count() > 0:
        return torch.cuda.device_count(), "this machine's GPUs"
    return CPU_RANKS, "no CUDA: launch.sh's CPU ranks; --num_gpus N for another machine"


# ----------------------------------------------------------------------------------------------------------------
# Learning rate
# ----------------------------------------------------------------------------------------------------------------


def supervised_tokens_per_step(batch_max_len: int, world_size: int, grad_accum: int, supervised_ratio: float) -> float:
    """OpenChat's estimate of the supervised tokens in one optimizer step (full rows assumed).

    Args:
        batch_max_len: tokens per packed row.
        world_size: data-parallel ranks.
        grad_accum: micro-batches per rank per step.
        supervised_ratio: share of the dataset's tokens with a non-zero loss weight (:func:`dataset_token_counts`).

    Returns:
        ``batch_max_len · world_size · grad_accum · supervised_ratio``.
    """
    return float(batch_max_len) * world_size * grad_accum * supervised_ratio


def resolve_lr(recipe: Recipe, supervised_tokens_per_step: float | None, model_type: str) -> tuple[float, str]:
    """The peak learning rate: ``train.lr`` if it is a number, else OpenChat's rule (``docs/design.md``).

    Args:
        recipe: the recipe.
        supervised_tokens_per_step: from :func:`supervised_tokens_per_step` (only needed for ``auto``).
        model_type: the model's ``config.model_type`` (e.g. ``mistral``; decides the divisor).

    Returns:
        ``(lr, explanation)``; the explanation names every number the value came from.

    Raises:
        UserError: ``auto`` without a positive number of supervised tokens per step.
    """
    lr = recipe.train.lr
    if lr != "auto":
        return float(lr), f"lr {float(lr):.3g} (set in the recipe: {recipe.where('train', 'lr')})"
    if supervised_tokens_per_step is None or not supervised_tokens_per_step > 0:
        raise UserError(
            f"{recipe.where('train', 'lr')}: lr 'auto' needs the supervised tokens per step, from the prepared "
            f"dataset; got {supervised_tokens_per_step!r} (is the dataset prepared and does it supervise anything?)"
        )
    divisor = next((d for key, d in AUTO_LR_DIVISORS.items() if key in model_type.lower()), 1.0)
    base = AUTO_LR_BASE / divisor
    value = base * math.sqrt(supervised_tokens_per_step / AUTO_LR_BASE_TOKENS)
    base_text = f"{AUTO_LR_BASE:g}" + (f" / {divisor:g} ({model_type})" if divisor != 1.0 else f" ({model_type})")
    why = (
        f"lr auto = {base_text} · sqrt({supervised_tokens_per_step:,.0f} supervised tokens per step / "
        f"{AUTO_LR_BASE_TOKENS:,}) = {value:.3g}"
    )
    return value, why


def dataset_token_counts(dataset: Any) -> tuple[int, int]:
    """Total tokens and supervised targets of a prepared dataset (one pass over its arrow columns).

    A target is supervised when its (unshifted) weight is non-zero, from each row's second token on: the first
    token has nothing before it to predict it from (the same count as the packer's shifted weights).

    Args:
        dataset: a prepared ``datasets.Dataset`` with ``loss_weights`` (list of float) and ``length``.

    Returns:
        ``(num_tokens, num_supervised)``.
    """
    table = dataset.select_columns(["loss_weights"]).with_format("arrow")[:]
    num_tokens = num_supervised = 0
    for chunk in table.column("loss_weights").chunks:
        offsets = chunk.offsets.to_numpy().astype(np.int64)
        values = chunk.values.to_numpy(zero_copy_only=False)[offsets[0] : offsets[-1]]
        offsets = offsets - offsets[0]
        nonzero = values != 0
        starts = offsets[:-1][offsets[:-1] < offsets[1:]]  # first element of each non-empty row
        num_tokens += int(len(values))
        num_supervised += int(nonzero.sum()) - int(nonzero[starts].sum())
    return num_tokens, num_supervised


# ----------------------------------------------------------------------------------------------------------------
# Model size
# ----------------------------------------------------------------------------------------------------------------


def count_parameters(config: Any) -> int:
    """Parameters of the causal LM a config describes, built on the meta device (no memory, no weights read)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())  # parameters() yields tied weights once


def _template_tokens(template_name: str) -> list[str]:
    t = get_template(template_name)
    return list(dict.fromkeys((*t.special_tokens, t.eot, t.pad_token)))


@dataclass
class ModelSize:
    """The model's shape and parameter counts before and after adding the template's tokens."""

    source: str
    model_type: str
    config: Any
    vocab_before: int
    vocab_after: int
    params_before: int
    params_after: int
    note: str = ""


def _local_tokenizer_dir(name: str) -> str | None:
    """A local directory for a tokenizer name: the directory itself, or its snapshot in the HF cache (no download)."""
    expanded = os.path.expanduser(name)
    if os.path.isdir(expanded):
        return expanded

    try:
        cached = try_to_load_from_cache(name, "tokenizer_config.json")
    except ValueError:  # not a valid hub id
        return None
    return os.path.dirname(cached) if isinstance(cached, str) else None


def model_size(recipe: Recipe) -> ModelSize:
    """Parameter counts of the recipe's model, from its ``config.json`` (or ``model.create_if_missing``).

    Raises:
        UserError: when neither a local/cached config nor ``create_if_missing`` is there.
    """
    m = recipe.model
    tokens = _template_tokens(m.template)
    base = os.path.expanduser(m.base)
    if m.create_if_missing is not None and not os.path.isfile(os.path.join(base, "config.json")):
        spec = dict(m.create_if_missing)
        vocab = int(spec.pop("vocab_size", None) or len(make_tokenizer(m.template)))
        config = MistralConfig(vocab_size=vocab, **spec)
        params = count_parameters(config)
        return ModelSize(
            f"model.create_if_missing (to be created in {base})", "mistral", config, vocab, vocab, params, params,
            "created with the template's tokens already in its vocabulary",
        )

    try:
        model_dir = resolve_model_dir(m.base, recipe.where("model", "base"))
    except UserError:
        known = known_base(m.base)
        if known is None:
            raise
        return _known_base_size(known, tokens)
    config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    vocab_before = int(config.vocab_size)
    note = ""
    tokenizer_dir = _local_tokenizer_dir(m.tokenizer) if m.tokenizer else model_dir
    try:
        if tokenizer_dir is None:
            raise OSError(f"{m.tokenizer!r} is not a local directory and not in the Hugging Face cache")

        num_tokens = len(load_tokenizer(tokenizer_dir, m.template))
        added = max(0, num_tokens - vocab_before)
        note = f"tokenizer: {num_tokens:,} tokens with the template's {', '.join(tokens)}"
    except Exception as error:  # any reason is reported in the note, and the plan goes on
        # A config without tokenizer files (e.g. a plan made from config.json alone): assume the base vocabulary
        # lacks every template token, which is the case for the bases the templates are written for.
        added = len(tokens)
        reason = str(error).strip().splitlines()[0][:120] if str(error).strip() else type(error).__name__
        note = (
            f"no tokenizer loaded ({reason}); assuming the base vocabulary lacks all {added} template tokens "
            f"({', '.join(tokens)})"
        )
    params_before = count_parameters(config)
    after = config.__class__.from_dict({**config.to_dict(), "vocab_size": vocab_before + added})
    params_after = count_parameters(after) if added else params_before
    return ModelSize(
        model_dir, config.model_type, config, vocab_before, vocab_before + added, params_before, params_after, note
    )


def _known_base_size(known: Any, tokens: list[str]) -> ModelSize:
    """Sizes from crlft's table of published shapes (``crlft.known_bases``) when the base is not downloaded."""
    config = known_config(known)
    vocab_before = int(config.vocab_size)
    added = len([t for t in tokens if t not in known.tokens_in_vocab])
    params_before = count_parameters(config)
    after = config.__class__.from_dict({**config.to_dict(), "vocab_size": vocab_before + added})
    params_after = count_parameters(after) if added else params_before
    note = (f"not downloaded: the published shape of {known.model_id} (crlft.known_bases); the template adds "
            f"{added} token(s)")
    return ModelSize(f"{known.model_id}, its published shape", config.model_type, config, vocab_before,
                     vocab_before + added, params_before, params_after, note)


# ----------------------------------------------------------------------------------------------------------------
# The plan
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class DataPlan:
    """What the prepared dataset says about steps and tokens (None fields: not prepared)."""

    prepared: bool
    message: str = ""
    num_conversations: int | None = None
    num_tokens: int | None = None
    num_supervised: int | None = None
    steps_per_epoch: int | None = None
    total_steps: int | None = None
    length: RunLength | None = None

    @property
    def supervised_ratio(self) -> float | None:
        """Supervised targets / tokens."""
        if not self.num_tokens:
            return None
        return self.num_supervised / self.num_tokens


def data_plan(recipe: Recipe, num_gpus: int) -> DataPlan:
    """Steps per epoch and token counts from the prepared dataset, or why they are unknown."""
    t = recipe.train
    try:
        dataset = load_prepared(recipe)
    except (UserError, OSError, ValueError) as error:
        return DataPlan(prepared=False, message=str(error))
    num_tokens, num_supervised = dataset_token_counts(dataset)
    loader = PackedLoader(
        dataset,
        max_tokens=t.batch_max_len,
        num_ranks=num_gpus,
        grad_accum=t.grad_accum,
        seed=t.seed,
        pad_to_multiple_of=t.pad_to_multiple_of,
        num_epochs=t.epochs,
    )
    length = run_length(t, loader.steps_per_epoch)  # what the trainer computes
    return DataPlan(True, "", len(dataset), num_tokens, num_supervised, length.steps_per_epoch[0], length.stop_at,
                    length)


def _gib(num_bytes: float) -> str:
    return f"{num_bytes / GIB:6.1f} GiB"


def plan_text(recipe: Recipe, num_gpus: int, where: str = "") -> str:
    """The report ``crlft plan`` prints: the model, memory per GPU, data and steps, learning rate.

    Args:
        recipe: the recipe.
        num_gpus: data-parallel ranks.
        where: where ``num_gpus`` came from (printed beside it).
    """
    lines = [f"crlft plan: {recipe.source_path or 'recipe'} on {num_gpus} GPU(s)" + (f" ({where})" if where else ""),
             ""]
    try:
        size: ModelSize | None = model_size(recipe)
    except UserError as error:
        size = None
        lines += ["model", f"  parameter count unknown: {error}", ""]
    if size is not None:
        lines += _model_lines(size) + _memory_lines(recipe, size, num_gpus)
    return "\n".join(lines + _data_and_lr_lines(recipe, size, num_gpus))


def _model_lines(size: ModelSize) -> list[str]:
    c = size.config
    lines = [
        "model",
        f"  {size.source} ({size.model_type}): {c.num_hidden_layers} layers, hidden {c.hidden_size}, "
        f"vocabulary {size.vocab_before:,}",
        f"  parameters: {size.params_before:,} ({size.params_before / 1e9:.2f}B) before the template's tokens",
        f"              {size.params_after:,} ({size.params_after / 1e9:.2f}B) with vocabulary {size.vocab_after:,}"
        f" (+{size.params_after - size.params_before:,})",
    ]
    if size.note:
        lines.append(f"  {size.note}")
    return lines + [""]


def _memory_lines(recipe: Recipe, size: ModelSize, num_gpus: int) -> list[str]:
    m, t, ds = recipe.model, recipe.train, recipe.deepspeed
    bf16 = m.dtype == "bfloat16"
    b = 2 if bf16 else 4
    ds_config = deepspeed_config(recipe)
    act = activation_bytes(size.config, t.batch_max_len, m.gradient_checkpointing, b)
    act_other = activation_bytes(size.config, t.batch_max_len, not m.gradient_checkpointing, b)
    trainable, lora_lines = None, []
    if m.lora is not None:
        trainable, lora_lines, extra = _lora_lines(recipe, size, b)
        act, act_other = act + extra, act_other + extra
    lines = lora_lines + [
        f"memory per GPU ({m.dtype}, batch_max_len {t.batch_max_len:,} tokens per micro-batch, "
        f"gradient checkpointing {'on' if m.gradient_checkpointing else 'off'}; Ψ = {size.params_after:,}"
        + (f", {trainable:,} of them trained" if trainable is not None else "") + ")",
        "  stage   weights  gradients  optimizer    buffers  activations      total" + ("        cpu"),
    ]
    for stage in range(4):
        est = memory_per_gpu(
            size.params_after + (trainable or 0), num_gpus, stage, act, ds_config, bf16, ds.offload_optimizer,
            ds.offload_param and stage == 3, num_trainable=trainable,
        )
        mark = "→" if stage == ds.zero_stage else " "
        lines.append(
            f"  {mark} {stage}  {_gib(est.weights)} {_gib(est.gradients)} {_gib(est.optimizer)} "
            f"{_gib(est.buffers)}   {_gib(est.activations)} {_gib(est.total)} {_gib(est.cpu)}"
        )
    return lines + [
        f"  activations with gradient checkpointing {'off' if m.gradient_checkpointing else 'on'} instead: "
        f"{act_other / GIB:.1f} GiB",
        "  (formulas: docs/design.md, \"crlft plan\"; add ~1-3 GiB for the CUDA context and fragmentation)",
        "",
    ]


def _lora_lines(recipe: Recipe, size: ModelSize, b: int) -> tuple[int, list[str], int]:
    """``(trainable parameters, the report's LoRA lines, extra activation bytes)`` of a ``model.lora`` recipe."""
    lora = recipe.model.lora
    num_tokens = len(lora.trainable_tokens if lora.trainable_tokens is not None
                     else get_template(recipe.model.template).control_tokens)
    after = size.config.__class__.from_dict({**size.config.to_dict(), "vocab_size": size.vocab_after})
    adapters, token_rows, targets = count_lora_parameters(after, recipe, num_tokens)
    trainable = adapters + token_rows
    total = size.params_after + adapters
    extra = lora_activation_bytes(after, recipe, targets, recipe.train.batch_max_len, b)
    lines = [
        "LoRA (model.lora; the base is frozen)",
        f"  r={lora.r}, alpha={lora.alpha:g}, dropout={lora.dropout:g} on {', '.join(targets)}: {adapters:,} "
        "adapter parameters",
        f"  trainable token rows: {num_tokens} token(s) x hidden {after.hidden_size} in the input and output "
        f"embeddings: {token_rows:,}",
        f"  trainable: {trainable:,} of {total:,} parameters ({trainable / total:.3%})",
        "",
    ]
    return trainable, lines, extra


def _data_and_lr_lines(recipe: Recipe, size: ModelSize | None, num_gpus: int) -> list[str]:
    m, t = recipe.model, recipe.train
    lines: list[str] = []
    data = data_plan(recipe, num_gpus)
    lines.append("data")
    if size is not None:
        model_type = size.model_type
    else:  # no config to read: go by the name, and say so
        model_type = "mistral" if "mistral" in m.base.lower() else "unknown"
        lines.append(f"  (model type guessed from the name {m.base!r}: {model_type})")
    if data.prepared:
        ratio = data.supervised_ratio or 0.0
        lines += [
            f"  {data.num_conversations:,} conversations, {data.num_tokens:,} tokens, {data.num_supervised:,} "
            f"supervised ({ratio:.1%})",
            f"  steps per epoch: {data.steps_per_epoch:,} (packing plan of epoch 0: {num_gpus} GPU(s) x "
            f"{t.grad_accum} micro-batch(es) x {t.batch_max_len:,} tokens per step)",
            f"  total steps: {data.total_steps:,} over {data.length.epochs} epoch(s) ({data.length.source}); the "
            f"learning-rate schedule spans {data.length.schedule_steps:,} steps, {data.length.warmup_steps:,} of "
            "them warm-up"
            + (" (train.stop_after_steps stops the run before the schedule ends)"
               if data.length.stop_at < data.length.schedule_steps else ""),
        ]
        warning = few_steps_warning(data.length)
        if warning:
            lines.append(f"  warning: {warning}")
        if data.steps_per_epoch:
            measured = data.num_supervised / data.steps_per_epoch
            lines.append(f"  measured supervised tokens per step: {measured:,.0f} on average")
        lines += eval_plan_lines(recipe, num_gpus, list(data.length.steps_per_epoch), data.total_steps)
        per_step = supervised_tokens_per_step(t.batch_max_len, num_gpus, t.grad_accum, ratio)
        lines += [
            "",
            "learning rate",
            f"  supervised tokens per step = {t.batch_max_len:,} (batch_max_len) x {num_gpus} (GPUs) x {t.grad_accum} "
            f"(grad_accum) x {ratio:.4f} (supervised ratio) = {per_step:,.0f}",
        ]
        try:
            _, why = resolve_lr(recipe, per_step, model_type)
            lines.append(f"  {why}")
        except UserError as error:
            lines.append(f"  {error}")
    else:
        lines += [
            f"  not prepared: {data.message}",
            "  steps per epoch and the supervised ratio need the prepared dataset.",
            "",
            "learning rate",
        ]
        if t.lr == "auto":
            upper = supervised_tokens_per_step(t.batch_max_len, num_gpus, t.grad_accum, 1.0)
            lr_upper, why = resolve_lr(recipe, upper, model_type)
            lines += [
                "  lr auto depends on the supervised ratio r of the prepared data: "
                f"lr = {lr_upper:.3g} · sqrt(r)",
                f"  (at r = 1: {why})",
            ]
        else:
            lines.append(f"  {resolve_lr(recipe, None, model_type)[1]}")
    lines += [
        f"  schedule: linear warm-up over {t.lr_warmup_ratio:.0%} of the steps, cosine decay to "
        f"{t.lr_min_ratio:g} x peak; AdamW betas {t.betas}, weight decay {t.weight_decay:g}",
    ]
    condition = best_condition(recipe)
    if get_template(m.template).uses_condition:
        lines += ["", "inference", f"  the exports' default condition: {condition!r} (model.inference_condition, "
                  "else the condition of the highest-reward source)"]
    return lines


__all__ = [
    "AUTO_LR_BASE",
    "AUTO_LR_BASE_TOKENS",
    "CPU_RANKS",
    "DataPlan",
    "ModelSize",
    "count_parameters",
    "data_plan",
    "machine_num_gpus",
    "dataset_token_counts",
    "model_size",
    "plan_text",
    "resolve_lr",
    "supervised_tokens_per_step",
]
