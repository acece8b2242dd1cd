"""LoRA C-RLFT: ``model.lora`` adapters (``peft``) on a frozen base, trainable rows for the template's tokens.

The base stays frozen in the recipe's dtype; ``peft`` adds LoRA adapters to the chosen linear layers (default: every
linear layer of the decoder blocks) and makes the embedding and output rows of the template's control tokens
trainable with its trainable-token layers (``trainable_token_indices``), which train those rows only. The fused
chunked loss keeps its fast path through the wrapped ``lm_head`` (:func:`output_rows`); exports write the merged
model and the adapter alone (:func:`export_lora`). Why, in ``docs/design.md`` ("LoRA").
"""

from __future__ import annotations

import logging
import os
import shutil
from typing import Any

import torch
from torch import nn

from crlft.config import Recipe
from crlft.errors import UserError

logger = logging.getLogger(__name__)

ADAPTER_CONFIG_FILE = "adapter_config.json"  # peft's name; its presence in a checkpoint's hf/ marks a LoRA run
ADAPTER_DIR = "adapter"  # inside an export: the adapter alone, loadable with plain peft
ADAPTER_NAME = "default"

# ZeRO-2's gradient buckets default to 5e8 elements (1 GB each in bf16, two of them with overlap_comm), sized for
# full fine-tuning. A LoRA run's gradients are a few tens of millions of elements (Mistral-7B, r=16: 42M), so a
# bucket of 5e7 holds them all in one reduction and saves about 1.8 GB per GPU.
LORA_BUCKET_ELEMENTS = 50_000_000


# ----------------------------------------------------------------------------------------------------------------
# What to adapt
# ----------------------------------------------------------------------------------------------------------------


def decoder_linear_names(model: nn.Module) -> list[str]:
    """Leaf names of the ``nn.Linear`` layers inside the decoder blocks (``q_proj``, ..., ``down_proj``), in order."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise UserError(f"{type(model).__name__}: no decoder blocks (.layers) to put LoRA adapters on")
    names: dict[str, None] = {}
    for name, module in layers.named_modules():
        if isinstance(module, nn.Linear):
            names[name.rsplit(".", 1)[-1]] = None
    return list(names)


def target_modules(recipe: Recipe, model: nn.Module) -> list[str]:
    """``model.lora.target_modules``, or every linear layer of the decoder blocks when it is null.

    Raises:
        UserError: a named module that is no linear layer of the decoder blocks (located in the recipe).
    """
    available = decoder_linear_names(model)
    wanted = recipe.model.lora.target_modules
    if wanted is None:
        return available
    unknown = [name for name in wanted if name not in available]
    if unknown:
        raise UserError(f"{recipe.where('model', 'lora', 'target_modules')}: {unknown} are not linear layers of the "
                        f"decoder blocks; this model has {available}")
    return list(dict.fromkeys(wanted))


def trainable_token_ids(recipe: Recipe, tokenizer: Any) -> list[int]:
    """Ids of the tokens whose embedding and output rows train (``model.lora.trainable_tokens``, default the
    template's control tokens).

    Raises:
        UserError: a token the tokenizer does not hold as one token.
    """
    from crlft.templates import TEMPLATES

    tokens = recipe.model.lora.trainable_tokens
    if tokens is None:
        tokens = list(TEMPLATES[recipe.model.template].control_tokens)
    ids = []
    for token in tokens:
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == tokenizer.unk_token_id and token != tokenizer.unk_token:
            raise UserError(f"{recipe.where('model', 'lora', 'trainable_tokens')}: {token!r} is not a token of the "
                            "tokenizer")
        ids.append(int(token_id))
    return sorted(set(ids))


def lora_config(recipe: Recipe, model: nn.Module, tokenizer: Any) -> Any:
    """The ``peft.LoraConfig`` of the recipe for ``model`` (whose embeddings are already sized to ``tokenizer``)."""
    from peft import LoraConfig

    lora = recipe.model.lora
    token_ids = trainable_token_ids(recipe, tokenizer)
    token_layers: dict[str, list[int]] | None = None
    if token_ids:
        # The input embedding always; an untied output embedding as well (a tied one follows the input's rows).
        token_layers = {_module_name(model, model.get_input_embeddings()): token_ids}
        output = model.get_output_embeddings()
        if output is not None and output.weight is not model.get_input_embeddings().weight:
            token_layers[_module_name(model, output)] = token_ids
    return LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=target_modules(recipe, model),
        bias="none", task_type="CAUSAL_LM", trainable_token_indices=token_layers,
    )


def _module_name(model: nn.Module, module: nn.Module) -> str:
    return next(name for name, m in model.named_modules() if m is module)


# ----------------------------------------------------------------------------------------------------------------
# Wrapping
# ----------------------------------------------------------------------------------------------------------------


def apply_lora(model: nn.Module, recipe: Recipe, tokenizer: Any) -> nn.Module:
    """Freezes ``model`` and wraps it in a ``peft.PeftModel`` with the recipe's adapters and trainable token rows.

    The adapters are created in the base's dtype (``autocast_adapter_dtype=False``: DeepSpeed's bf16 engine keeps
    fp32 master copies of what it trains, so fp32 adapters would only be cast back).

    Returns:
        The ``PeftModel`` (its ``get_decoder()`` / ``get_output_embeddings()`` reach the wrapped modules).
    """
    from peft import get_peft_model

    config = lora_config(recipe, model, tokenizer)
    peft_model = get_peft_model(model, config, autocast_adapter_dtype=False)
    trainable, total = parameter_counts(peft_model)
    token_rows = sum(p.numel() for n, p in peft_model.named_parameters() if p.requires_grad and "trainable_tokens" in n)
    tokens = sorted(next(iter(config.trainable_token_indices.values()))) if config.trainable_token_indices else []
    logger.info(
        f"LoRA: r={config.r}, alpha={config.lora_alpha:g}, dropout={config.lora_dropout:g} on "
        f"{', '.join(sorted(config.target_modules))}; trainable rows of token ids {tokens} in "
        f"{', '.join(config.trainable_token_indices or {}) or 'no embedding'}"
    )
    logger.info(
        f"parameters: {trainable:,} trainable of {total:,} ({trainable / total:.3%}): {trainable - token_rows:,} in "
        f"the adapters, {token_rows:,} in the token rows; the base is frozen in {next(model.parameters()).dtype}"
    )
    return peft_model


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameters, tied weights counted once."""
    params = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def is_lora_model(model: nn.Module) -> bool:
    """Whether ``model`` is a ``peft`` model (LoRA run)."""
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def output_rows(lm_head: nn.Module) -> tuple[nn.Linear, torch.Tensor, torch.Tensor] | None:
    """For an ``lm_head`` wrapped by peft's trainable tokens: ``(base Linear, row indices, trainable rows)``.

    The fused loss (``crlft.loss``) computes ``h·Wᵀ`` with those rows of ``W`` replaced, as peft's layer does,
    without copying ``W``; anything else (another wrapper, several active adapters) returns None and takes the
    loss's checkpointed fallback.
    """
    adapter = getattr(lm_head, "token_adapter", None)
    if adapter is None or getattr(adapter, "disable_adapters", True) or adapter.merged:
        return None
    active = list(adapter.active_adapters)
    if len(active) != 1 or active[0] not in adapter.trainable_tokens_delta:
        return None
    base = adapter.base_layer
    if not isinstance(base, nn.Linear):
        return None
    values = adapter.trainable_tokens_delta[active[0]]
    index = torch.as_tensor(adapter.token_indices[active[0]], dtype=torch.long, device=values.device)
    return base, index, values


def zero_overrides() -> dict[str, Any]:
    """``zero_optimization`` keys of a LoRA run: gradient buckets sized for the adapters, not the whole model."""
    return {"reduce_bucket_size": LORA_BUCKET_ELEMENTS, "allgather_bucket_size": LORA_BUCKET_ELEMENTS}


def dropout_seed(seed: int, rank: int) -> int:
    """The torch seed of a rank when LoRA dropout is on: different masks on different ranks, reproducible."""
    return seed + 1_000_003 * rank


# ----------------------------------------------------------------------------------------------------------------
# Counting (``crlft plan``)
# ----------------------------------------------------------------------------------------------------------------


def count_lora_parameters(config: Any, recipe: Recipe, num_tokens: int) -> tuple[int, int, list[str]]:
    """``(adapter parameters, token-row parameters, target modules)`` for a model config, built on ``meta``.

    Args:
        config: the Hugging Face config, its ``vocab_size`` already including the template's tokens.
        recipe: the recipe (``model.lora``, ``model.template``).
        num_tokens: trainable token rows per embedding matrix (see :func:`trainable_token_ids`).
    """
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    targets = target_modules(recipe, model)
    r = recipe.model.lora.r
    adapters = 0
    for name, module in model.get_decoder().layers.named_modules():
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in targets:
            adapters += r * (module.in_features + module.out_features)
    tied = model.get_output_embeddings() is None or (
        model.get_output_embeddings().weight is model.get_input_embeddings().weight)
    token_rows = num_tokens * int(config.hidden_size) * (1 if tied else 2)
    return adapters, token_rows, targets


def lora_activation_bytes(config: Any, recipe: Recipe, targets: list[str], num_tokens: int,
                          bytes_per_value: int = 2) -> int:
    """Activations the adapters add to one packed row (``crlft.memory.activation_bytes`` has the base's).

    Per token and adapted layer (input width ``i``): the ``r``-wide output of ``A`` (``r·b``), and with dropout its
    output (``i·b``) and its mask (``i`` bytes). Every layer keeps them without gradient checkpointing; with it only
    the layer being recomputed does.
    """
    h, inter = int(config.hidden_size), int(getattr(config, "intermediate_size", 4 * int(config.hidden_size)))
    widths = {"down_proj": inter}  # every other linear layer of a Mistral/Llama block reads the hidden state
    lora, b = recipe.model.lora, bytes_per_value
    per_layer = sum(lora.r * b + (widths.get(t, h) * (b + 1) if lora.dropout > 0 else 0) for t in targets)
    layers = 1 if recipe.model.gradient_checkpointing else int(config.num_hidden_layers)
    return layers * num_tokens * per_layer


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints and exports
# ----------------------------------------------------------------------------------------------------------------


def save_adapter_config(model: nn.Module, out_dir: str, base: str) -> None:
    """Write peft's ``adapter_config.json`` into a checkpoint's ``hf/`` directory (``base``: where the base is)."""
    config = model.peft_config[ADAPTER_NAME]
    config.base_model_name_or_path = base
    config.save_pretrained(out_dir)


def is_adapter_dir(directory: str) -> bool:
    """Whether a directory holds a peft adapter (a LoRA export's ``adapter/``, or a LoRA checkpoint's ``hf/``)."""
    return os.path.isfile(os.path.join(directory, ADAPTER_CONFIG_FILE))


is_lora_checkpoint = is_adapter_dir  # said of a checkpoint's hf/ directory


def base_location(recipe: Recipe) -> str:
    """What ``adapter_config.json`` names as the base: the hub id as written, a local directory as absolute path."""
    base = os.path.expanduser(recipe.model.base)
    return os.path.abspath(base) if os.path.isdir(base) else recipe.model.base


def load_base(base: str, tokenizer: Any, dtype: torch.dtype) -> nn.Module:
    """The base model a LoRA run started from, its embeddings grown to ``tokenizer`` (new rows = mean)."""
    from transformers import AutoModelForCausalLM

    from crlft.model import resize_embeddings_with_mean, resolve_model_dir

    model_dir = resolve_model_dir(base, f"{ADAPTER_CONFIG_FILE} (base_model_name_or_path)")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, local_files_only=True)
    resize_embeddings_with_mean(model, len(tokenizer))
    return model


def load_adapter_model(adapter_dir: str, dtype: torch.dtype) -> tuple[nn.Module, Any]:
    """``(PeftModel, tokenizer)`` of an exported adapter: its base (grown to its tokenizer) with the adapter on it."""
    from peft import PeftConfig, PeftModel
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    base = load_base(PeftConfig.from_pretrained(adapter_dir).base_model_name_or_path, tokenizer, dtype)
    return PeftModel.from_pretrained(base, adapter_dir), tokenizer


def export_lora(checkpoint: str, hf_dir: str, tensors: dict[str, torch.Tensor], dtype: torch.dtype,
                adapter_out: str) -> dict[str, torch.Tensor]:
    """The merged full model's weights from a LoRA checkpoint; writes the adapter alone to ``adapter_out``.

    Args:
        checkpoint: the checkpoint (for messages).
        hf_dir: its ``hf/`` directory (config, tokenizer, ``adapter_config.json``).
        tensors: the checkpoint's trained parameters (``crlft.export.consolidated_state_dict``, peft names).
        dtype: the export dtype (base, adapter and merged model).
        adapter_out: the directory for the adapter (``adapter_model.safetensors``, its config and the tokenizer).

    Returns:
        The merged model's state dict (Hugging Face names, ``dtype``), ready for ``save_pretrained``.

    Raises:
        UserError: a base that is not there, or that does not fit the checkpoint.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    config = LoraConfig.from_pretrained(hf_dir)
    base = load_base(config.base_model_name_or_path, tokenizer, dtype)
    model = get_peft_model(base, config, autocast_adapter_dtype=False)
    trained = {name: p for name, p in model.named_parameters() if p.requires_grad}
    missing = sorted(set(trained) - set(tensors))
    if missing:
        raise UserError(f"{checkpoint}: the checkpoint lacks adapter weights {missing[:3]} (another LoRA setup?)")
    with torch.no_grad():
        for name, param in trained.items():
            if tuple(tensors[name].shape) != tuple(param.shape):
                raise UserError(f"{checkpoint}: {name} has shape {tuple(tensors[name].shape)}, the base with this "
                                f"adapter config needs {tuple(param.shape)}: is {config.base_model_name_or_path} "
                                "the base the run trained?")
            param.copy_(tensors[name].to(dtype))
    shutil.rmtree(adapter_out, ignore_errors=True)
    model.save_pretrained(adapter_out, save_embedding_layers=False)
    tokenizer.save_pretrained(adapter_out)
    merged = model.merge_and_unload()
    return dict(merged.state_dict())


__all__ = [
    "ADAPTER_DIR",
    "apply_lora",
    "count_lora_parameters",
    "decoder_linear_names",
    "dropout_seed",
    "export_lora",
    "is_adapter_dir",
    "is_lora_checkpoint",
    "is_lora_model",
    "load_adapter_model",
    "lora_activation_bytes",
    "lora_config",
    "output_rows",
    "parameter_counts",
    "save_adapter_config",
    "target_modules",
    "trainable_token_ids",
    "zero_overrides",
]
