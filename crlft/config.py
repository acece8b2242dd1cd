"""The recipe: one typed tree of dataclasses loaded from YAML, validated in one place.

A recipe is a YAML file with the sections ``model``, ``data``, ``train``, ``deepspeed``, ``logging`` and ``eval``.
``load_recipe(path, overrides)`` reads it with ``yaml.safe_load``, applies command-line overrides of the form
``section.key=value`` (``data.sources.0.reward=0.5`` indexes lists), converts it into the dataclasses below
(rejecting unknown keys with the closest known one as a hint) and runs ``Recipe.validate()``, which lists
every problem it finds in one error, each located by file and line.

The DeepSpeed JSON is generated from the recipe by ``deepspeed_config()``; a user's own DeepSpeed file
(``deepspeed.config``) is merged over it.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from crlft.errors import UserError
from crlft.templates import TEMPLATES

# --------------------------------------------------------------------------------------------------------------
# The tree
# --------------------------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    """What to train and how it is tokenized."""

    base: str = ""
    """Base model: a Hugging Face model id or a local directory (e.g. ``mistralai/Mistral-7B-v0.1``)."""

    tokenizer: str | None = None
    """Tokenizer id or directory; defaults to ``base``. The template's special tokens are added when missing."""

    template: str = "openchat_3.5"
    """Conversation template name (see ``crlft.templates.TEMPLATES``)."""

    max_context: int = 8192
    """Longest conversation in tokens; longer ones are truncated by ``crlft prepare`` (and counted)."""

    dtype: Literal["bfloat16", "float32"] = "bfloat16"
    """Training precision of weights and activations. ``float32`` is for exactness tests and CPUs without bf16."""

    attn_implementation: Literal["auto", "flash_attention_2", "crlft_varlen", "flex_attention", "sdpa", "eager"] = (
        "auto"
    )
    """Attention kernel for packed rows. ``auto`` on CUDA: flash-attn's varlen kernel when installed, else PyTorch's
    varlen attention (``crlft_varlen``), else ``flex_attention`` with a per-conversation block mask; on CPU:
    ``crlft_varlen`` (one SDPA call per conversation). ``sdpa``/``eager`` are correct but build a dense T×T mask per
    packed row (about 6 GB at 77,824 tokens); the chosen backend is printed in the run's log."""

    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory (about 30% more compute)."""

    create_if_missing: dict[str, Any] | None = None
    """``MistralConfig`` fields. When set and ``base`` is a local directory that does not exist yet, a randomly
    initialised Mistral of this shape is created there with the template's tokenizer (used by the demo)."""


@dataclass
class SourceConfig:
    """One source file (or hub dataset) of conversations, with the class it belongs to."""

    name: str = ""
    """Short unique name, used in the report and the prepared dataset's ``source`` column."""

    path: str = ""
    """Local ``.json``/``.jsonl``/``.parquet`` file (relative to the working directory), or a hub dataset name."""

    format: Literal["openchat", "sharegpt", "messages", "alpaca"] = "sharegpt"
    """Record layout: ``openchat`` (items/condition/system), ``sharegpt`` (conversations[from,value]),
    ``messages`` (OpenAI style) or ``alpaca`` (instruction/input/output)."""

    condition: str = ""
    """Class condition put into the role prefixes (e.g. ``GPT4 Correct``); a record's own condition wins."""

    reward: float = 1.0
    """Coarse reward of this source (OpenChat: 1.0 for expert data, 0.1 for sub-optimal); becomes the loss weight
    of assistant tokens through ``data.reward_to_weight``. A record's own per-message weights win."""

    max_samples: int | None = None
    """Use at most this many records from the source (the first ones), before ``repeat``."""

    repeat: int = 1
    """Include the source this many times per epoch (up-sampling)."""

    on_error: Literal["raise", "skip"] = "raise"
    """``raise``: a bad record stops ``crlft prepare`` with its file and line. ``skip``: skip it and count it."""

    split: str = "train"
    """Split to read for hub datasets."""


@dataclass
class DataConfig:
    """Where the conversations come from and how rewards become loss weights."""

    sources: list[SourceConfig] = field(default_factory=list)
    """The sources; see ``SourceConfig``."""

    output_dir: str = ""
    """Where ``crlft prepare`` writes the tokenized dataset (a ``datasets.save_to_disk`` directory)."""

    reward_to_weight: Literal["linear", "exp"] = "linear"
    """``linear``: weight = reward (OpenChat's release). ``exp``: weight = exp(reward / beta) (the paper's
    derivation of the optimal KL-regularised policy)."""

    beta: float = 1.0
    """Temperature of ``exp`` weighting."""

    per_sequence_loss: bool = False
    """Divide each assistant message's weight by its token count (OpenChat's ``--per-sequence-loss``)."""

    num_proc: int | None = None
    """Worker processes for tokenization; default: the number of CPU cores (at most 16)."""

    generate: str | None = None
    """Shell command ``crlft prepare`` runs first when a source file is missing, to write the sources (the demo's
    synthetic data generator). ``null``: missing files are an error."""


@dataclass
class TrainConfig:
    """The optimisation loop."""

    output_dir: str = ""
    """Run directory: checkpoints, ``metrics.jsonl``, exports."""

    epochs: int = 5
    """Passes over the prepared dataset."""

    batch_max_len: int = 77824
    """Tokens per rank per micro-batch (one packed row). Must be ≥ ``model.max_context``."""

    lr: float | Literal["auto"] = "auto"
    """Peak learning rate, or ``auto``: OpenChat's rule 3e-4 · sqrt(supervised tokens per step / 4M), / 6 for
    Mistral."""

    lr_warmup_ratio: float = 0.05
    """Fraction of all steps spent in linear warm-up."""

    lr_min_ratio: float = 0.1
    """The cosine decay ends at ``lr · lr_min_ratio``."""

    weight_decay: float = 0.1
    """AdamW decoupled weight decay."""

    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """AdamW betas."""

    eps: float = 1e-5
    """AdamW epsilon."""

    grad_clip: float = 1.0
    """Global gradient-norm clipping (0 disables)."""

    grad_accum: int = 1
    """Packed rows per rank per optimizer step."""

    seed: int = 42
    """Seed of model-independent randomness: data order, dropout."""

    max_steps: int | None = None
    """Stop after this many optimizer steps (a checkpoint and an export are written)."""

    save_every_steps: int | None = None
    """Checkpoint every N optimizer steps (and always at each epoch end). ``null``: epoch ends only."""

    keep_last: int = 2
    """Checkpoints to keep; older ones are deleted after a newer one is complete."""

    resume: str | bool = "auto"
    """``auto``: continue from the newest complete checkpoint in ``output_dir`` if any; ``off``; or a path.
    (YAML reads a bare ``off``/``false`` as a boolean: false means ``off``, true means ``auto``.)"""

    loss_normalization: Literal["weight_sum", "weight_sum_row_mean", "num_tokens"] = "weight_sum"
    """``weight_sum``: L = Σ w·CE / Σ w over the global step (OpenChat). ``weight_sum_row_mean``: that divided by
    the packed rows per step (ranks × ``grad_accum``), what OpenChat's trainer computed when 3.5 was trained.
    ``num_tokens``: divide by the global number of supervised tokens instead, so a step holding only low-reward
    data still takes a small step."""

    pad_to_multiple_of: int | None = 64
    """Pad each packed row to a multiple of this many tokens (zero weight) for kernel-friendly shapes."""


@dataclass
class DeepSpeedSection:
    """How DeepSpeed shards and offloads; the DeepSpeed JSON is generated from the recipe."""

    zero_stage: int = 2
    """ZeRO stage: 2 shards optimizer state and gradients; 3 also shards the weights."""

    config: str | None = None
    """Optional DeepSpeed JSON file merged over the generated configuration (its keys win)."""

    offload_optimizer: bool = False
    """Keep optimizer state on the CPU (ZeRO-Offload)."""

    offload_param: bool = False
    """Keep weights on the CPU (ZeRO-3 only)."""


@dataclass
class WandbConfig:
    """Weights & Biases logging."""

    project: str | None = None
    """Project name; logging to wandb is on when this is set and ``mode`` is not ``disabled``."""

    entity: str | None = None
    """Team or user."""

    name: str | None = None
    """Run name; default: the output directory's name."""

    mode: Literal["online", "offline", "disabled"] = "disabled"
    """``offline`` writes a local run that ``wandb sync`` can upload later; works without network."""


@dataclass
class LoggingConfig:
    """Progress, metrics and experiment tracking."""

    wandb: WandbConfig = field(default_factory=WandbConfig)
    """Weights & Biases settings."""

    log_every: int = 1
    """Print and log metrics every N optimizer steps (``metrics.jsonl`` always gets every step)."""


@dataclass
class EvalConfig:
    """Exact-match evaluation of the exported model on held-out prompts (``crlft eval``; ``launch.sh`` runs it
    after training when ``prompts`` is set)."""

    prompts: str | None = None
    """JSON-lines file of ``{"prompt": ..., "answer": ..., "task"?: ...}`` records."""

    conditions: list[str] = field(default_factory=lambda: ["GPT4 Correct"])
    """Conditions to prompt with, each scored separately ("" gives the plain ``User:`` prefix)."""

    max_new_tokens: int = 32
    """Longest generated answer."""

    batch_size: int = 64
    """Prompts generated together."""

    max_samples: int | None = None
    """Evaluate only the first N prompts."""


@dataclass
class Recipe:
    """A whole training recipe."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    # Where the recipe came from, for located error messages and resolving relative paths. Not YAML keys.
    source_path: str | None = field(default=None, repr=False, compare=False)
    _lines: dict[tuple, int] = field(default_factory=dict, repr=False, compare=False)

    def where(self, *key_path: str | int) -> str:
        """``file:line (a.b.c)`` for a key, for error messages."""
        dotted = ".".join(str(k) for k in key_path)
        line = self._lines.get(tuple(key_path))
        if self.source_path is None:
            return dotted
        return f"{self.source_path}:{line} ({dotted})" if line else f"{self.source_path} ({dotted})"

    def validate(self) -> None:
        """Check the whole recipe and raise one ``UserError`` listing every problem found."""
        problems: list[str] = []

        def need(ok: bool, key_path: tuple, message: str) -> None:
            if not ok:
                problems.append(f"{self.where(*key_path)}: {message}")

        m, d, t, ds = self.model, self.data, self.train, self.deepspeed
        need(bool(m.base), ("model", "base"), "is required (a Hugging Face model id or a local directory)")

        need(m.template in TEMPLATES, ("model", "template"),
             f"unknown template {m.template!r}; known: {', '.join(sorted(TEMPLATES))}")
        need(m.max_context > 0, ("model", "max_context"), "must be positive")

        need(bool(d.output_dir), ("data", "output_dir"), "is required")
        need(len(d.sources) > 0, ("data", "sources"), "needs at least one source")
        seen: set[str] = set()
        for i, s in enumerate(d.sources):
            need(bool(s.name), ("data", "sources", i, "name"), "is required")
            need(s.name not in seen, ("data", "sources", i, "name"), f"duplicate source name {s.name!r}")
            seen.add(s.name)
            need(bool(s.path), ("data", "sources", i, "path"), "is required")
            need(math.isfinite(s.reward) and s.reward >= 0, ("data", "sources", i, "reward"),
                 f"must be a non-negative number, got {s.reward!r}")
            need(s.max_samples is None or s.max_samples > 0, ("data", "sources", i, "max_samples"),
                 "must be positive")
            need(s.repeat >= 1, ("data", "sources", i, "repeat"), "must be ≥ 1")
        need(d.beta > 0, ("data", "beta"), "must be positive")
        need(d.num_proc is None or d.num_proc >= 1, ("data", "num_proc"), "must be ≥ 1")

        need(bool(t.output_dir), ("train", "output_dir"), "is required")
        need(t.epochs >= 1, ("train", "epochs"), "must be ≥ 1")
        need(t.batch_max_len >= m.max_context, ("train", "batch_max_len"),
             f"must be ≥ model.max_context ({m.max_context}) so every prepared conversation fits a packed row")
        need(t.lr == "auto" or (isinstance(t.lr, float) and t.lr > 0), ("train", "lr"), "must be positive or 'auto'")
        need(0 <= t.lr_warmup_ratio < 1, ("train", "lr_warmup_ratio"), "must be in [0, 1)")
        need(0 <= t.lr_min_ratio <= 1, ("train", "lr_min_ratio"), "must be in [0, 1]")
        need(t.weight_decay >= 0, ("train", "weight_decay"), "must be ≥ 0")
        need(len(t.betas) == 2 and all(0 <= b < 1 for b in t.betas), ("train", "betas"),
             "must be two numbers in [0, 1)")
        need(t.eps > 0, ("train", "eps"), "must be positive")
        need(t.grad_clip >= 0, ("train", "grad_clip"), "must be ≥ 0")
        need(t.grad_accum >= 1, ("train", "grad_accum"), "must be ≥ 1")
        need(t.max_steps is None or t.max_steps >= 1, ("train", "max_steps"), "must be ≥ 1")
        need(t.save_every_steps is None or t.save_every_steps >= 1, ("train", "save_every_steps"), "must be ≥ 1")
        need(t.keep_last >= 1, ("train", "keep_last"), "must be ≥ 1")
        need(t.pad_to_multiple_of is None or t.pad_to_multiple_of >= 1, ("train", "pad_to_multiple_of"),
             "must be ≥ 1")

        need(ds.zero_stage in (0, 1, 2, 3), ("deepspeed", "zero_stage"), "must be 0, 1, 2 or 3")
        need(not ds.offload_param or ds.zero_stage == 3, ("deepspeed", "offload_param"), "needs zero_stage 3")
        need(ds.config is None or os.path.isfile(ds.config), ("deepspeed", "config"),
             f"file not found: {ds.config}")
        need(self.logging.log_every >= 1, ("logging", "log_every"), "must be ≥ 1")
        need(self.eval.max_new_tokens >= 1, ("eval", "max_new_tokens"), "must be ≥ 1")
        need(self.eval.batch_size >= 1, ("eval", "batch_size"), "must be ≥ 1")
        need(self.eval.max_samples is None or self.eval.max_samples >= 1, ("eval", "max_samples"), "must be ≥ 1")

        if problems:
            where = self.source_path or "recipe"
            raise UserError(f"{len(problems)} problem(s) in {where}:\n  " + "\n  ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        """The resolved recipe as plain data (saved with checkpoints and in dataset metadata)."""
        return {f.name: dataclasses.asdict(getattr(self, f.name)) for f in dataclasses.fields(self)
                if not f.name.startswith("_") and f.name != "source_path"}


# --------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------


def load_recipe(path: str, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read a recipe YAML, apply ``section.key=value`` overrides, convert and validate it.

    Args:
        path: The recipe file.
        overrides: Command-line overrides, e.g. ``["train.lr=1e-5", "data.sources.0.reward=0.5"]``; the value is
            parsed as YAML (``null``, numbers, booleans, lists).

    Returns:
        The validated recipe.

    Raises:
        UserError: A missing file, invalid YAML, an unknown key, a wrong type or any validation problem.
    """
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise UserError(f"recipe not found: {path}") from None
    try:
        raw = yaml.safe_load(text) or {}
        lines = _key_lines(yaml.compose(text, Loader=yaml.SafeLoader))
    except yaml.YAMLError as e:
        raise UserError(f"{path}: invalid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: a recipe is a mapping of sections (model, data, ...), not {type(raw).__name__}")
    for override in overrides:
        _apply_override(raw, override)
    return recipe_from_dict(raw, source_path=path, lines=lines)


def recipe_from_dict(raw: dict[str, Any], source_path: str | None = None, lines: dict | None = None) -> Recipe:
    """Convert plain data (as from YAML) into a validated ``Recipe``; see ``load_recipe``."""
    errors: list[str] = []
    lines = lines or {}

    def where(key_path: tuple) -> str:
        line = lines.get(key_path)
        dotted = ".".join(str(k) for k in key_path) or "<top>"
        if source_path is None:
            return dotted
        return f"{source_path}:{line} ({dotted})" if line else f"{source_path} ({dotted})"

    values = _convert(Recipe, raw, (), errors, where, skip_fields=("source_path", "_lines"))
    if errors:
        raise UserError(f"{len(errors)} problem(s) in {source_path or 'recipe'}:\n  " + "\n  ".join(errors))
    recipe = Recipe(**values, source_path=source_path, _lines=lines)
    if isinstance(recipe.train.resume, bool):
        recipe.train.resume = "auto" if recipe.train.resume else "off"
    recipe.validate()
    return recipe


def _apply_override(raw: dict[str, Any], override: str) -> None:
    key, sep, value_text = override.partition("=")
    if not sep or not key:
        raise UserError(f"override {override!r}: expected section.key=value")
    try:
        value = yaml.safe_load(value_text)
    except yaml.YAMLError as e:
        raise UserError(f"override {override!r}: value is not valid YAML: {e}") from None
    parts = key.split(".")
    node: Any = raw
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise UserError(f"override {override!r}: {'.'.join(parts[:i])} has no item {part}")
            node = node[int(part)]
        else:
            if node.get(part) is None:  # absent, or written as an empty section
                node[part] = {}
            node = node[part]
        if not isinstance(node, (dict, list)):
            raise UserError(f"override {override!r}: {'.'.join(parts[: i + 1])} is not a section")
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise UserError(f"override {override!r}: {'.'.join(parts[:-1])} has no item {last}")
        node[int(last)] = value
    else:
        node[last] = value


def _key_lines(node: yaml.Node | None, prefix: tuple = ()) -> dict[tuple, int]:
    """Map every key path in a composed YAML document to its 1-based line number."""
    lines: dict[tuple, int] = {}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            path = prefix + (key_node.value,)
            lines[path] = key_node.start_mark.line + 1
            lines.update(_key_lines(value_node, path))
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines[prefix + (i,)] = item.start_mark.line + 1
            lines.update(_key_lines(item, prefix + (i,)))
    return lines


def _convert(tp: Any, value: Any, key_path: tuple, errors: list[str], where, skip_fields: tuple = ()) -> Any:
    """Convert plain data to type ``tp``, appending located messages to ``errors`` instead of raising."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)

    if dataclasses.is_dataclass(tp):
        if value is None:
            value = {}
        if not isinstance(value, dict):
            errors.append(f"{where(key_path)}: expected a mapping, got {value!r}")
            return {}
        hints = typing.get_type_hints(tp)
        known = [f.name for f in dataclasses.fields(tp) if f.name not in skip_fields and not f.name.startswith("_")]
        out: dict[str, Any] = {}
        for key, item in value.items():
            if key not in known:
                close = difflib.get_close_matches(str(key), known, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(known)}"
                errors.append(f"{where(key_path + (key,))}: unknown key {key!r}{hint}")
                continue
            sub_tp = hints[key]
            converted = _convert(sub_tp, item, key_path + (key,), errors, where)
            out[key] = tp_instance(sub_tp, converted)
        return out

    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        sub_errors: list[str] = []
        for arg in args:
            if arg is type(None):
                continue
            trial: list[str] = []
            converted = _convert(arg, value, key_path, trial, where)
            if not trial:
                return tp_instance(arg, converted)
            sub_errors.extend(trial)
        errors.append(f"{where(key_path)}: expected {_type_name(tp)}, got {value!r}")
        return None

    if origin is Literal:
        if value in args:
            return value
        choices = ", ".join(repr(a) for a in args)
        errors.append(f"{where(key_path)}: must be one of {choices}, got {value!r}")
        return None

    if origin is list:
        if not isinstance(value, list):
            errors.append(f"{where(key_path)}: expected a list, got {value!r}")
            return []
        (item_tp,) = args
        return [tp_instance(item_tp, _convert(item_tp, v, key_path + (i,), errors, where)) for i, v in enumerate(value)]

    if origin is dict:
        if not isinstance(value, dict):
            errors.append(f"{where(key_path)}: expected a mapping, got {value!r}")
            return {}
        return dict(value)

    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # e.g. condition: 4 → "4"
    elif tp is Any:
        return value
    errors.append(f"{where(key_path)}: expected {_type_name(tp)}, got {value!r}")
    return None


def tp_instance(tp: Any, converted: Any) -> Any:
    """Instantiate a dataclass from converted fields; other types pass through."""
    if dataclasses.is_dataclass(tp) and isinstance(converted, dict):
        return tp(**converted)
    return converted


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp) if a is not type(None))
    if origin is Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    if origin is list:
        return "a list"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


# --------------------------------------------------------------------------------------------------------------
# DeepSpeed
# --------------------------------------------------------------------------------------------------------------


def deepspeed_config(recipe: Recipe) -> dict[str, Any]:
    """The DeepSpeed configuration generated from the recipe, with ``deepspeed.config`` merged over it.

    The optimizer and schedule are built by the trainer (they need the resolved learning rate and step count),
    so they are not part of this dict unless the user's file adds them.
    """
    ds, t, m = recipe.deepspeed, recipe.train, recipe.model
    zero: dict[str, Any] = {
        "stage": ds.zero_stage,
        "overlap_comm": True,
        "contiguous_gradients": True,
        "reduce_bucket_size": 5e8,
    }
    if ds.zero_stage == 3:
        # Export writes one consolidated 16-bit copy of the weights from the shards.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if ds.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": 1,  # one packed row per rank per micro-step
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": m.dtype == "bfloat16"},
        "steps_per_print": 2**31 - 1,  # we print our own progress
        "wall_clock_breakdown": False,
    }
    if ds.config:
        with open(ds.config, encoding="utf-8") as f:
            try:
                user = json.load(f)
            except json.JSONDecodeError as e:
                raise UserError(f"{ds.config}:{e.lineno}: invalid JSON: {e.msg}") from None
        config = _merge(config, user)
    return config


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


# --------------------------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------------------------


def recipe_reference() -> str:
    """Markdown tables of every recipe key (type, default, the docstring under the field), section by section.

    The README's recipe reference is this text; a test keeps the two identical.
    """
    sections = [("model", ModelConfig), ("data", DataConfig), ("data.sources[]", SourceConfig),
                ("train", TrainConfig), ("deepspeed", DeepSpeedSection), ("logging", LoggingConfig),
                ("logging.wandb", WandbConfig), ("eval", EvalConfig)]
    lines: list[str] = []
    for name, cls in sections:
        hints = typing.get_type_hints(cls)
        docs = _field_docs(cls)
        lines += [f"**`{name}`**", "", "| key | type | default | meaning |", "|---|---|---|---|"]
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                continue
            doc = docs.get(f.name, "").replace("|", "\\|")
            lines.append(f"| `{f.name}` | {_reference_type(hints[f.name])} | {_reference_default(f)} | {doc} |")
        lines.append("")
    return "\n".join(lines)


def _field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass, read from its source."""
    body = ast.parse(inspect.getsource(cls)).body[0].body
    docs = {}
    for node, following in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(following, ast.Expr)
                and isinstance(following.value, ast.Constant) and isinstance(following.value.value, str)):
            docs[node.target.id] = " ".join(following.value.value.split())
    return docs


def _reference_type(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    if origin in (typing.Union, types.UnionType):
        names = [_reference_type(a) for a in args if a is not type(None)]
        return " or ".join(names) + (" or null" if type(None) in args else "")
    if origin is list:
        return "list of sources" if dataclasses.is_dataclass(args[0]) else f"list of {_reference_type(args[0])}"
    if origin is dict:
        return "mapping"
    return {int: "int", float: "float", str: "str", bool: "bool"}.get(tp, getattr(tp, "__name__", str(tp)))


def _reference_default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return ""
    if value is None:
        return "`null`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if value == "":
        return '`""`'
    return f"`{value}`"
