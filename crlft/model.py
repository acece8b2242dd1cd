"""Loading the model to train: weights, the template's special tokens, mean-initialised embeddings, attention.

New embedding rows are set to the *mean* of the existing rows (summed in float64), so new tokens start exactly at
the centre of the existing ones, reproducibly, with or without ZeRO-3. crlft never downloads: a ``model.base`` that
is neither a local directory nor in the Hugging Face cache is a ``UserError`` that says so.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from typing import Any

import torch
from huggingface_hub import try_to_load_from_cache
from torch import nn
from transformers import AutoModelForCausalLM, GenerationConfig, MistralConfig, MistralForCausalLM

from crlft import attention, zero3_load
from crlft.config import Recipe
from crlft.errors import UserError
from crlft.lora import apply_lora
from crlft.tokenizer import build_tokenizer

logger = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


# ----------------------------------------------------------------------------------------------------------------
# Where the base model is
# ----------------------------------------------------------------------------------------------------------------


def resolve_model_dir(base: str, where: str = "model.base") -> str:
    """The local directory holding ``base``'s files: the directory itself, or its Hugging Face cache snapshot.

    Args:
        base: a local directory or a hub id.
        where: the recipe location for error messages (e.g. ``recipe.yaml:3 (model.base)``).

    Returns:
        A directory that contains ``config.json``.

    Raises:
        UserError: a missing directory, a directory without ``config.json``, or a hub id that is not cached
            (crlft never downloads).
    """
    if not base:
        raise UserError(f"{where}: is empty")
    expanded = os.path.expanduser(base)
    if os.path.isdir(expanded):
        if not os.path.isfile(os.path.join(expanded, "config.json")):
            raise UserError(f"{where}: {expanded} has no config.json (not a Hugging Face model directory)")
        return expanded
    # A hub id is "name" or "org/name"; anything else that is not a directory is a local path that is missing.
    if expanded.startswith((".", "/", "~")) or base.count("/") > 1 or "\\" in base:
        raise UserError(f"{where}: directory not found: {expanded}")

    cached = try_to_load_from_cache(base, "config.json")
    if isinstance(cached, str) and os.path.isfile(cached):
        return os.path.dirname(cached)
    raise UserError(
        f"{where}: {base!r} is not a local directory and not in the Hugging Face cache; crlft never downloads. "
        f"Download it first (`huggingface-cli download {base}`, or `hf download {base}`) or point model.base at "
        "a local directory."
    )


# ----------------------------------------------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------------------------------------------


def training_device() -> torch.device:
    """The device this rank trains on: ``cuda:LOCAL_RANK`` when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def choose_attn_implementation(
    requested: str, device: torch.device | str | None = None, dtype: torch.dtype = torch.bfloat16
) -> str:
    """Resolves ``model.attn_implementation`` and logs the choice.

    The decision itself lives in ``crlft.attention`` (it knows which kernels keep packed conversations apart
    without a dense mask): ``auto`` gives ``flash_attention_2`` when flash-attn is installed and CUDA runs in half
    precision, else PyTorch's own varlen kernel, and on a CPU ``crlft_varlen`` (SDPA per packed conversation).
    An explicit kernel that cannot run here is a ``UserError``.

    Args:
        requested: ``auto`` or a backend name.
        device: where the model will run; default :func:`training_device`.
        dtype: the model's compute dtype.

    Returns:
        The name to load the model with (``attn_implementation=``).
    """
    return attention.choose_attn_implementation(requested, device or training_device(), dtype)


# ----------------------------------------------------------------------------------------------------------------
# Embeddings
# ----------------------------------------------------------------------------------------------------------------


def _set_new_rows_to_mean(param: torch.Tensor, old_num_rows: int) -> None:
    """Rows ``old_num_rows:`` of a ``[vocab, ...]`` parameter := the mean of rows ``:old_num_rows``.

    Computed in float64 chunk by chunk; a ZeRO-3 parameter is not gathered, each rank reduces and writes the rows
    of its own partition (``zero3_load.row_mean`` / ``fill_rows``).
    """
    zero3_load.fill_rows(param, old_num_rows, zero3_load.row_mean(param, old_num_rows))


def _set_new_embedding_rows_to_mean(model: nn.Module, old_num_rows: int) -> None:
    """Rows ``old_num_rows:`` of the input and (untied) output embeddings := the mean of the rows before."""
    input_weight = model.get_input_embeddings().weight
    _set_new_rows_to_mean(input_weight, old_num_rows)
    output = model.get_output_embeddings()
    if output is not None and output.weight is not input_weight:
        _set_new_rows_to_mean(output.weight, old_num_rows)
        if getattr(output, "bias", None) is not None:
            _set_new_rows_to_mean(output.bias, old_num_rows)
    num_rows = zero3_load.full_shape(input_weight)[0]
    logger.info(f"embeddings: {old_num_rows} → {num_rows} rows; the {num_rows - old_num_rows} new rows are the mean "
                "of the old ones")


def resize_embeddings_with_mean(model: nn.Module, num_tokens: int) -> int:
    """Grows the input embeddings (and an untied output embedding) to ``num_tokens`` rows, new rows = mean.

    Never shrinks: a model whose embedding already has at least ``num_tokens`` rows (e.g. a vocabulary padded to
    a multiple of 64) is left as it is.

    Args:
        model: a ``PreTrainedModel``.
        num_tokens: the tokenizer's length.

    Returns:
        The number of rows added (0 if none).
    """
    old_num_rows = zero3_load.full_shape(model.get_input_embeddings().weight)[0]
    if num_tokens <= old_num_rows:
        return 0
    # mean_resizing=False: transformers initialises the new rows randomly (its normal init), we overwrite them.
    model.resize_token_embeddings(num_tokens, mean_resizing=False)
    _set_new_embedding_rows_to_mean(model, old_num_rows)
    return num_tokens - old_num_rows


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Turns on activation (gradient) checkpointing of every decoder layer, non-reentrant.

    Non-reentrant checkpointing works with inputs that do not require grad and with ZeRO-3's parameter hooks.
    transformers 5.x calls it ``activation_checkpointing_enable`` (the old name warns); older versions only have
    ``gradient_checkpointing_enable``.
    """
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def is_gradient_checkpointing(model: nn.Module) -> bool:
    """Whether activation checkpointing is on (any transformers version)."""
    if hasattr(type(model), "is_activation_checkpointing"):
        return bool(model.is_activation_checkpointing)
    return bool(model.is_gradient_checkpointing)


# ----------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------


def model_dtype(recipe: Recipe) -> torch.dtype:
    """The training dtype of the recipe's ``model.dtype``.

    Raises:
        UserError: bf16 on a CUDA GPU without bf16 support (e.g. V100): set ``model.dtype: float32``.
    """
    dtype = DTYPES[recipe.model.dtype]
    if dtype == torch.bfloat16 and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        raise UserError(
            f"{recipe.where('model', 'dtype')}: this GPU ({torch.cuda.get_device_name()}) has no bfloat16 support; "
            "set model.dtype=float32"
        )
    return dtype


def load_model(recipe: Recipe, tokenizer: Any, device: torch.device | str | None = None,
               ds_config: dict[str, Any] | None = None):
    """Loads the recipe's base model ready to train with ``tokenizer``.

    Creates the base first when ``model.create_if_missing`` asks for it (:func:`ensure_base_model`). With
    ``zero_stage: 3`` and ``ds_config`` given, the model is created partitioned and each rank reads only its part
    of the weights (``crlft.zero3_load``). Every rank logs the memory it holds after loading.

    Args:
        recipe: the recipe (``model.base``, ``model.dtype``, ``model.attn_implementation``,
            ``model.gradient_checkpointing``, ``model.lora``).
        tokenizer: the tokenizer from ``crlft.tokenizer.load_tokenizer`` (holds the template's special tokens).
        device: where the model will train, for the attention choice; default :func:`training_device`. The model
            itself is returned on the CPU (DeepSpeed moves it).
        ds_config: the run's DeepSpeed configuration (for ZeRO-3's partitioned creation).

    Returns:
        The ``PreTrainedModel`` (with ``model.lora``: a ``peft.PeftModel`` around it, the base frozen), in train
        mode, ``use_cache`` off, embeddings sized ``len(tokenizer)``.

    Raises:
        UserError: a base that is missing or not cached, or settings this machine cannot run.
    """
    ensure_base_model(recipe)
    rss_before, _ = zero3_load.host_memory_bytes()
    started = time.perf_counter()
    where = recipe.where("model", "base")
    model_dir = resolve_model_dir(recipe.model.base, where)
    dtype = model_dtype(recipe)
    attn = choose_attn_implementation(recipe.model.attn_implementation, device, dtype)
    # With LoRA the base is frozen and peft builds its adapter and token rows from the base's full tensors, so
    # LoRA under ZeRO-3 keeps the previous path (DeepSpeed partitions the loaded model at initialisation).
    zero3 = ds_config is not None and recipe.deepspeed.zero_stage == 3 and recipe.model.lora is None
    if zero3:
        model = _load_partitioned(model_dir, dtype, attn, ds_config, len(tokenizer))
    else:
        model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=dtype, attn_implementation=attn, local_files_only=True
        )
    # Packed rows are attended correctly only without a cache; training never needs one.
    model.config.use_cache = False
    resize_embeddings_with_mean(model, len(tokenizer))
    # The template's pad token, and generation that stops at its end-of-turn token (the tokenizer's eos).
    if tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if model.generation_config is not None and tokenizer.eos_token_id is not None:
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    if recipe.model.gradient_checkpointing:
        # Non-reentrant: works with inputs that do not require grad and with ZeRO-3's parameter hooks.
        enable_gradient_checkpointing(model)
    num_params = sum(zero3_load.full_numel(p) for p in model.parameters())
    logger.info(
        f"model: {model_dir} ({model.config.model_type}), {num_params / 1e6:,.1f}M parameters, {dtype}, "
        f"attention {attn}, gradient checkpointing {'on' if recipe.model.gradient_checkpointing else 'off'}"
        + (", created partitioned (ZeRO-3)" if zero3 else "")
    )
    if recipe.model.lora is not None:
        model = apply_lora(model, recipe, tokenizer)  # logs trainable / total parameters
    else:
        logger.info(f"parameters: {num_params:,} trainable of {num_params:,} (full fine-tuning)")
    model.train()
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    zero3_load.memory_logger.info(zero3_load.memory_line(model, rank, device or training_device(), rss_before,
                                                              time.perf_counter() - started))
    return model


def _load_partitioned(model_dir: str, dtype: torch.dtype, attn: str, ds_config: dict[str, Any], num_tokens: int):
    """The model built under ``deepspeed.zero.Init`` with ``num_tokens`` embedding rows, each rank reading its own
    partition of the weights; new token rows = the mean of the old ones, reduced across the partitions.

    transformers' ``resize_token_embeddings`` would replace ZeRO-3 embeddings by full, unpartitioned ones (until
    ``deepspeed.initialize``), so the model is created at its final vocabulary instead. The ``HfDeepSpeedConfig``
    is alive while the model is made and loaded, and only then.
    """
    from transformers import AutoConfig

    hf_ds_config = zero3_load.hf_deepspeed_config(ds_config)
    config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    old_rows = int(config.vocab_size)
    config.vocab_size = max(old_rows, num_tokens)
    with zero3_load.without_random_init():  # every parameter is read from the checkpoint next
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn)
    embeddings = {name for name, p in model.named_parameters()
                  if any(p is m.weight or p is getattr(m, "bias", None)
                         for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None)}
    if not zero3_load.load_partitioned_weights(model, model_dir, grown=frozenset(embeddings)):
        logger.info(f"{model_dir}: no safetensors weights matching the model; transformers' ZeRO-3 loading "
                    "(rank 0 reads the whole checkpoint)")
        del model
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation=attn,
                                                     local_files_only=True)
    else:
        if num_tokens > old_rows:
            _set_new_embedding_rows_to_mean(model, old_rows)
        # from_config does not read generation_config.json; from_pretrained (the other path) does.
        if os.path.isfile(os.path.join(model_dir, "generation_config.json")):
            model.generation_config = GenerationConfig.from_pretrained(model_dir)
    # Only while loading: a live HfDeepSpeedConfig would make every later model of this process (an export on
    # rank 0 alone) a ZeRO-3 one, whose collectives the other ranks never join.
    zero3_load.forget_hf_deepspeed_config(hf_ds_config)
    return model


# ----------------------------------------------------------------------------------------------------------------
# A model from scratch (the demo)
# ----------------------------------------------------------------------------------------------------------------


def create_from_scratch(out_dir: str, mistral_config_kwargs: dict[str, Any], template_name: str, seed: int = 0):
    """Writes a randomly initialised ``MistralForCausalLM`` with the template's tokenizer as an HF directory.

    The tokenizer is built offline (``crlft.tokenizer.build_tokenizer``); the vocabulary is ``len(tokenizer)``.
    The directory is written next to its final place and renamed into it, so a crash leaves no half-written
    model, and two ranks creating it at once both end with the same complete directory.

    Args:
        out_dir: the directory to create (must not exist, or be empty).
        mistral_config_kwargs: ``MistralConfig`` fields (``hidden_size``, ``num_hidden_layers``, ...).
            ``vocab_size`` may be given only if at least ``len(tokenizer)`` (a padded vocabulary).
        template_name: a template whose tokenizer can be built offline (e.g. ``openchat_3.5``).
        seed: seed of the random initialisation (the same seed gives the same weights).

    Returns:
        The model (on the CPU, fp32).

    Raises:
        UserError: unknown config fields, a too-small ``vocab_size``, a template without an offline tokenizer,
            or a non-empty ``out_dir``.
    """
    out_dir = os.path.expanduser(out_dir)
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise UserError(f"{out_dir}: exists and is not empty; not overwriting it with a new random model")
    kwargs = dict(mistral_config_kwargs or {})
    known = set(MistralConfig().to_dict())
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise UserError(f"model.create_if_missing: unknown MistralConfig field(s) {unknown}")

    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp_dir = tempfile.mkdtemp(prefix=".crlft-create-", dir=parent)
    try:
        try:
            tokenizer = build_tokenizer(template_name, tmp_dir)
        except ValueError as error:
            raise UserError(f"model.create_if_missing: {error}") from None
        vocab_size = kwargs.pop("vocab_size", None) or len(tokenizer)
        if vocab_size < len(tokenizer):
            raise UserError(
                f"model.create_if_missing.vocab_size={vocab_size} is smaller than the tokenizer ({len(tokenizer)})"
            )
        eot_id = tokenizer.eos_token_id  # the template's end-of-turn token (load_tokenizer sets eos to it)
        config = MistralConfig(
            vocab_size=vocab_size,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=eot_id,
            pad_token_id=tokenizer.pad_token_id,
            **kwargs,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = MistralForCausalLM(config)
        model.generation_config.eos_token_id = eot_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.save_pretrained(tmp_dir)
        try:
            os.rename(tmp_dir, out_dir)  # atomic; replaces an empty directory
        except OSError:
            # Another process (rank) created it first, from the same seed: keep theirs.
            if not os.path.isfile(os.path.join(out_dir, "config.json")):
                raise
    finally:
        if os.path.isdir(tmp_dir):
            shutil.rmtree(tmp_dir, ignore_errors=True)
    num_params = sum(p.numel() for p in model.parameters())
    logger.info(f"created a random Mistral ({num_params / 1e6:.1f}M parameters, vocab {vocab_size}) in {out_dir}")
    return model


def ensure_base_model(recipe: Recipe) -> bool:
    """Creates ``model.base`` from ``model.create_if_missing`` when that is set and the directory does not exist.

    Args:
        recipe: the recipe.

    Returns:
        True if a model was created.
    """
    spec = recipe.model.create_if_missing
    base = os.path.expanduser(recipe.model.base)
    if spec is None or os.path.isfile(os.path.join(base, "config.json")):
        return False
    create_from_scratch(base, spec, recipe.model.template, seed=recipe.train.seed)
    return True


__all__ = [
    "DTYPES",
    "choose_attn_implementation",
    "create_from_scratch",
    "enable_gradient_checkpointing",
    "ensure_base_model",
    "is_gradient_checkpointing",
    "load_model",
    "model_dtype",
    "resize_embeddings_with_mean",
    "resolve_model_dir",
    "training_device",
]
