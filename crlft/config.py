"""The recipe's typed tree: six sections of pydantic dataclasses, ``Recipe.validate()``, the DeepSpeed config.

Each field's type is checked by pydantic when a recipe is read (``crlft.recipe.load_recipe``); the string under a
field is its description, from which ``recipe_reference()`` generates the README's reference tables.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, ConfigDict, Strict, model_validator
from pydantic.dataclasses import dataclass as section

from crlft.conditions import condition_rules
from crlft.errors import UserError
from crlft.templates import TEMPLATES


def _number(value: Any) -> Any:
    if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    return value


def _text(value: Any) -> Any:
    return str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value  # condition: 4


# What YAML gives is taken as it is: no "5" for an int, no 1 for a bool; only numbers written as text are numbers.
Int = Annotated[int, Strict()]
Bool = Annotated[bool, Strict()]
Number = Annotated[float, Strict(), BeforeValidator(_number)]
Text = Annotated[str, Strict(), BeforeValidator(_text)]

# Unknown keys are errors; the string under each field is its description (the README's recipe reference).
# Every number is finite: YAML reads .inf, .nan and 1e999 as floats, and an infinite lr or beta trains NaN.
SECTION_CONFIG = ConfigDict(extra="forbid", use_attribute_docstrings=True, allow_inf_nan=False)


class _Section:
    """An empty section (``logging:`` with nothing under it) is the section's defaults."""

    @model_validator(mode="before")
    @classmethod
    def _empty_is_default(cls, value: Any) -> Any:
        return {} if value is None else value


# --------------------------------------------------------------------------------------------------------------
# The tree
# --------------------------------------------------------------------------------------------------------------


@section(config=SECTION_CONFIG)
class LoraSection(_Section):
    """LoRA adapters on the frozen base (built with ``peft``; see ``crlft/lora.py``)."""

    r: Int = 16
    """Rank of every adapter (``peft.LoraConfig.r``)."""

    alpha: Number = 32.0
    """Scale numerator: the adapter's update is multiplied by ``alpha / r`` (``lora_alpha``)."""

    dropout: Number = 0.05
    """Dropout on each adapter's input (``lora_dropout``); 0 makes runs with any rank count give the same update."""

    target_modules: list[Text] | None = None
    """Names of the linear layers to adapt (``q_proj``, ...); ``null``: every linear layer of the decoder blocks."""

    trainable_tokens: list[Text] | None = None
    """Tokens whose input and output embedding rows are trained (the rest of both matrices stays frozen);
    ``null``: the template's control tokens (``<|end_of_turn|>``, ``<|pad_0|>`` for ``openchat_3.5``)."""


@section(config=SECTION_CONFIG)
class ModelConfig(_Section):
    """What to train and how it is tokenized."""

    base: Text = ""
    """Base model: a Hugging Face model id or a local directory (e.g. ``mistralai/Mistral-7B-v0.1``)."""

    tokenizer: Text | None = None
    """Tokenizer id or directory; defaults to ``base``. The template's special tokens are added when missing."""

    template: Text = "openchat_3.5"
    """Conversation template name (see ``crlft.templates.TEMPLATES``)."""

    max_context: Int = 8192
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

    inference_condition: Text | None = None
    """Condition the export's chat template (and ``crlft chat``) uses when none is passed; ``null``: the condition
    of the highest-reward source (the recipe's best class)."""

    gradient_checkpointing: Bool = False
    """Recompute activations in the backward pass to save memory (about 30% more compute)."""

    create_if_missing: dict[str, Any] | None = None
    """``MistralConfig`` fields. When set and ``base`` is a local directory that does not exist yet, a randomly
    initialised Mistral of this shape is created there with the template's tokenizer (used by the demo)."""

    lora: LoraSection | None = None
    """LoRA settings (see ``model.lora``); ``null``: full fine-tuning of every weight."""


@section(config=SECTION_CONFIG)
class SourceConfig(_Section):
    """One source file (or hub dataset) of conversations, with the class it belongs to."""

    name: Text = ""
    """Short unique name, used in the report and the prepared dataset's ``source`` column."""

    path: Text = ""
    """Local ``.json``/``.jsonl``/``.parquet`` file (relative to the working directory), or a hub dataset name."""

    format: Literal["openchat", "sharegpt", "messages", "alpaca"] = "sharegpt"
    """Record layout: ``openchat`` (items/condition/system), ``sharegpt`` (conversations[from,value]),
    ``messages`` (OpenAI style) or ``alpaca`` (instruction/input/output)."""

    condition: Text = ""
    """Class condition put into the role prefixes (e.g. ``GPT4 Correct``); a record's own condition wins."""

    reward: Number = 1.0
    """Coarse reward of this source (OpenChat: 1.0 for expert data, 0.1 for sub-optimal); becomes the loss weight
    of assistant tokens through ``data.reward_to_weight``. A record's own per-message weights win."""

    max_samples: Int | None = None
    """Use at most this many records from the source (the first ones), before ``repeat``."""

    repeat: Int = 1
    """Include the source this many times per epoch (up-sampling)."""

    on_error: Literal["raise", "skip"] = "raise"
    """``raise``: a bad record stops ``crlft prepare`` with its file and line. ``skip``: skip it and count it."""

    split: Text = "train"
    """Split to read for hub datasets."""


@section(config=SECTION_CONFIG)
class DataConfig(_Section):
    """Where the conversations come from and how rewards become loss weights."""

    sources: list[SourceConfig] = field(default_factory=list)
    """The sources; see ``SourceConfig``."""

    output_dir: Text = ""
    """Where ``crlft prepare`` writes the tokenized dataset (a ``datasets.save_to_disk`` directory)."""

    reward_to_weight: Literal["linear", "exp"] = "linear"
    """``linear``: weight = reward (OpenChat's release). ``exp``: weight = exp(reward / beta) (the paper's
    derivation of the optimal KL-regularised policy)."""

    beta: Number = 1.0
    """Temperature of ``exp`` weighting."""

    per_sequence_loss: Bool = False
    """Divide each assistant message's weight by its token count (OpenChat's ``--per-sequence-loss``)."""

    num_proc: Int | None = None
    """Worker processes for tokenization; default: the number of CPU cores (at most 16)."""

    drop_conditions: Bool = False
    """Allow sources with conditions under a template that has none (``chatml``, ...): the conditions are dropped
    and C-RLFT becomes reward-weighted SFT. ``false``: such a recipe is refused."""

    generate: Text | None = None
    """Shell command ``crlft prepare`` runs first when a source file is missing, to write the sources (the demo's
    synthetic data generator). ``null``: missing files are an error."""

    eval_fraction: Number = 0.0
    """Share of each source's conversations held out as the ``eval`` split (never trained on; at least one per
    source of ≥ 2 conversations when > 0), chosen by ``eval_seed``; OpenChat's data script held out 0.005."""

    eval_seed: Int = 0
    """Seed of the held-out choice (a hash of seed, source name and record index: stable across re-prepares)."""

    eval_sources: list[SourceConfig] = field(default_factory=list)
    """Held-out files, shaped like ``sources`` (names distinct from them): all their conversations go to the
    ``eval`` split."""


@section(config=SECTION_CONFIG)
class TrainConfig(_Section):
    """The optimisation loop."""

    output_dir: Text = ""
    """Run directory: checkpoints, ``metrics.jsonl``, exports."""

    epochs: Int = 5
    """Passes over the prepared dataset."""

    batch_max_len: Int = 77824
    """Tokens per rank per micro-batch (one packed row). Must be ≥ ``model.max_context``."""

    lr: Number | Literal["auto"] = "auto"
    """Peak learning rate, or ``auto``: OpenChat's rule 3e-4 · sqrt(supervised tokens per step / 4M), / 6 for
    Mistral."""

    lr_warmup_ratio: Number = 0.05
    """Fraction of all steps spent in linear warm-up."""

    lr_min_ratio: Number = 0.1
    """The cosine decay ends at ``lr · lr_min_ratio``."""

    weight_decay: Number = 0.1
    """AdamW decoupled weight decay."""

    betas: list[Number] = field(default_factory=lambda: [0.9, 0.95])
    """AdamW betas."""

    eps: Number = 1e-5
    """AdamW epsilon."""

    grad_clip: Number = 1.0
    """Global gradient-norm clipping (0 disables)."""

    grad_accum: Int = 1
    """Packed rows per rank per optimizer step."""

    seed: Int = 42
    """Seed of model-independent randomness: data order, dropout."""

    max_steps: Int | None = None
    """Length of the run in optimizer steps, as in Hugging Face's Trainer: the warm-up and the decay span
    ``max_steps`` and it overrides ``epochs`` (more epochs are run when needed). ``null``: ``epochs`` epochs."""

    stop_after_steps: Int | None = None
    """Stop early after this many optimizer steps without changing the schedule (a checkpoint and an export are
    written); for tests and benchmarks. ``null``: run to the end of the schedule."""

    save_every_steps: Int | None = None
    """Checkpoint every N optimizer steps (and always at each epoch end). ``null``: epoch ends only."""

    export_every_epoch: Bool = True
    """Write a Hugging Face export at each epoch end (``export/epoch_N``); ``export/final`` is always written."""

    keep_last: Int = 2
    """Checkpoints to keep; older ones are deleted after a newer one is complete."""

    resume: Text | Bool = "auto"
    """``auto``: continue from the newest complete checkpoint in ``output_dir`` if any; ``off``; or a path.
    (YAML reads a bare ``off``/``false`` as a boolean: false means ``off``, true means ``auto``.)"""

    loss_normalization: Literal["weight_sum", "weight_sum_row_mean", "num_tokens"] = "weight_sum"
    """``weight_sum``: L = Σ w·CE / Σ w over the global step (OpenChat). ``weight_sum_row_mean``: that divided by
    the packed rows per step (ranks × ``grad_accum``), what OpenChat's trainer computed when 3.5 was trained.
    ``num_tokens``: divide by the global number of supervised tokens instead, so a step holding only low-reward
    data still takes a small step."""

    pad_to_multiple_of: Int | None = 64
    """Pad each packed row to a multiple of this many tokens (zero weight) for kernel-friendly shapes."""

    nonfinite_skips: Int = 0
    """Steps with a non-finite loss or gradient norm to skip (no update) before the run stops; 0: stop at the first."""
    eval_every_steps: Int | None = None
    """When the prepared data has an ``eval`` split: evaluate it every N optimizer steps, and always at each epoch
    end and at the last step. ``null``: epoch ends and the last step only; ``0``: never."""


@section(config=SECTION_CONFIG)
class DeepSpeedSection(_Section):
    """How DeepSpeed shards and offloads; the DeepSpeed JSON is generated from the recipe."""

    zero_stage: Int = 2
    """ZeRO stage: 2 shards optimizer state and gradients; 3 also shards the weights."""

    config: Text | None = None
    """Optional DeepSpeed JSON file merged over the generated configuration (its keys win)."""

    offload_optimizer: Bool = False
    """Keep optimizer state on the CPU (ZeRO-Offload)."""

    offload_param: Bool = False
    """Keep weights on the CPU (ZeRO-3 only)."""


@section(config=SECTION_CONFIG)
class WandbConfig(_Section):
    """Weights & Biases logging."""

    project: Text | None = None
    """Project name; logging to wandb is on when this is set and ``mode`` is not ``disabled``."""

    entity: Text | None = None
    """Team or user."""

    name: Text | None = None
    """Run name; default: the output directory's name."""

    mode: Literal["online", "offline", "disabled"] = "disabled"
    """``offline`` writes a local run that ``wandb sync`` can upload later; works without network."""


@section(config=SECTION_CONFIG)
class LoggingConfig(_Section):
    """Progress, metrics and experiment tracking."""

    wandb: WandbConfig = field(default_factory=WandbConfig)
    """Weights & Biases settings."""

    log_every: Int = 1
    """Print a progress line every N optimizer steps (``metrics.jsonl`` and wandb always get every step)."""


@section(config=SECTION_CONFIG)
class EvalConfig(_Section):
    """Exact-match evaluation of the exported model on held-out prompts (``crlft eval``; ``launch.sh`` runs it
    after training when ``prompts`` is set)."""

    prompts: Text | None = None
    """JSON-lines file of ``{"prompt": ..., "answer": ..., "task"?: ...}`` records."""

    conditions: list[Text] = field(default_factory=lambda: ["GPT4 Correct"])
    """Conditions to prompt with, each scored separately ("" gives the plain ``User:`` prefix)."""

    max_new_tokens: Int = 32
    """Longest generated answer."""

    batch_size: Int = 64
    """Prompts generated together."""

    max_samples: Int | None = None
    """Evaluate only the first N prompts."""


@dataclass
class Recipe:
    """A whole training recipe: the six sections (each checked by pydantic) and where it was read from."""

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
        problems = [f"{self.where(*key_path)}: {message}" for ok, key_path, message in self._rules() if not ok]
        if problems:
            where = self.source_path or "recipe"
            raise UserError(f"{len(problems)} problem(s) in {where}:\n  " + "\n  ".join(problems))

    def _rules(self) -> Iterator[tuple[bool, tuple, str]]:
        """``(holds, key path, what is wrong otherwise)`` for every rule a recipe must follow."""
        m, d, t, ds = self.model, self.data, self.train, self.deepspeed
        yield (bool(m.base), ("model", "base"), "is required (a Hugging Face model id or a local directory)")

        yield (m.template in TEMPLATES, ("model", "template"),
               f"unknown template {m.template!r}; known: {', '.join(sorted(TEMPLATES))}")
        yield (m.max_context > 0, ("model", "max_context"), "must be positive")
        if m.lora is not None:
            yield from _lora_rules(m.lora)

        yield (bool(d.output_dir), ("data", "output_dir"), "is required")
        yield (len(d.sources) > 0, ("data", "sources"), "needs at least one source")
        yield from _source_rules(d.sources)
        template = TEMPLATES.get(m.template)
        live = template.control_tokens if template is not None and template.uses_condition else ()
        for i, s in enumerate(d.sources):  # written into the role prefixes, where control tokens are live
            typed = [t for t in live if t in s.condition]
            yield (not typed, ("data", "sources", i, "condition"), f"contains control token(s) {', '.join(typed)}")
        yield from condition_rules(self)
        yield (d.beta > 0, ("data", "beta"), "must be positive")
        yield (d.num_proc is None or d.num_proc >= 1, ("data", "num_proc"), "must be ≥ 1")
        yield (0 <= d.eval_fraction < 1, ("data", "eval_fraction"), "must be in [0, 1)")
        yield (d.eval_seed >= 0, ("data", "eval_seed"), "must be ≥ 0")
        yield from _eval_source_rules(d.sources, d.eval_sources)

        yield (bool(t.output_dir), ("train", "output_dir"), "is required")
        yield (t.epochs >= 1, ("train", "epochs"), "must be ≥ 1")
        yield (t.batch_max_len >= m.max_context, ("train", "batch_max_len"),
               f"must be ≥ model.max_context ({m.max_context}) so every prepared conversation fits a packed row")
        yield (t.lr == "auto" or (isinstance(t.lr, float) and t.lr > 0), ("train", "lr"), "must be positive or 'auto'")
        yield (0 <= t.lr_warmup_ratio < 1, ("train", "lr_warmup_ratio"), "must be in [0, 1)")
        yield (0 <= t.lr_min_ratio <= 1, ("train", "lr_min_ratio"), "must be in [0, 1]")
        yield (t.weight_decay >= 0, ("train", "weight_decay"), "must be ≥ 0")
        yield (len(t.betas) == 2 and all(0 <= b < 1 for b in t.betas), ("train", "betas"),
               "must be two numbers in [0, 1)")
        yield (t.eps > 0, ("train", "eps"), "must be positive")
        yield (t.grad_clip >= 0, ("train", "grad_clip"), "must be ≥ 0")
        yield (t.grad_accum >= 1, ("train", "grad_accum"), "must be ≥ 1")
        yield (t.max_steps is None or t.max_steps >= 1, ("train", "max_steps"), "must be ≥ 1")
        yield (t.stop_after_steps is None or t.stop_after_steps >= 1, ("train", "stop_after_steps"), "must be ≥ 1")
        yield (t.save_every_steps is None or t.save_every_steps >= 1, ("train", "save_every_steps"), "must be ≥ 1")
        yield (t.keep_last >= 1, ("train", "keep_last"), "must be ≥ 1")
        yield (t.nonfinite_skips >= 0, ("train", "nonfinite_skips"), "must be ≥ 0")
        yield (t.pad_to_multiple_of is None or t.pad_to_multiple_of >= 1, ("train", "pad_to_multiple_of"),
               "must be ≥ 1")
        yield (t.eval_every_steps is None or t.eval_every_steps >= 0, ("train", "eval_every_steps"),
               "must be ≥ 0 (0: never evaluate)")

        yield (ds.zero_stage in (0, 1, 2, 3), ("deepspeed", "zero_stage"), "must be 0, 1, 2 or 3")
        yield (not ds.offload_param or ds.zero_stage == 3, ("deepspeed", "offload_param"), "needs zero_stage 3")
        yield (ds.config is None or os.path.isfile(ds.config), ("deepspeed", "config"),
               f"file not found: {ds.config}")
        yield (self.logging.log_every >= 1, ("logging", "log_every"), "must be ≥ 1")
        yield (self.eval.max_new_tokens >= 1, ("eval", "max_new_tokens"), "must be ≥ 1")
        yield (self.eval.batch_size >= 1, ("eval", "batch_size"), "must be ≥ 1")
        yield (self.eval.max_samples is None or self.eval.max_samples >= 1, ("eval", "max_samples"), "must be ≥ 1")

    def to_dict(self) -> dict[str, Any]:
        """The resolved recipe as plain data (saved with checkpoints and in dataset metadata)."""
        return {f.name: dataclasses.asdict(getattr(self, f.name)) for f in dataclasses.fields(self)
                if not f.name.startswith("_") and f.name != "source_path"}


def _lora_rules(lora: LoraSection) -> Iterator[tuple[bool, tuple, str]]:
    """The rules of ``model.lora`` (see ``Recipe._rules``)."""
    where = ("model", "lora")
    yield (lora.r >= 1, (*where, "r"), "must be ≥ 1")
    yield (math.isfinite(lora.alpha) and lora.alpha > 0, (*where, "alpha"), "must be positive")
    yield (0 <= lora.dropout < 1, (*where, "dropout"), "must be in [0, 1)")
    yield (lora.target_modules is None or len(lora.target_modules) > 0, (*where, "target_modules"),
           "must name at least one module, or be null (every linear layer of the decoder blocks)")


def _source_rules(sources: list[SourceConfig]) -> Iterator[tuple[bool, tuple, str]]:
    """The rules of ``data.sources`` (see ``Recipe._rules``)."""
    seen: set[str] = set()
    for i, s in enumerate(sources):
        yield (bool(s.name), ("data", "sources", i, "name"), "is required")
        yield (s.name not in seen, ("data", "sources", i, "name"), f"duplicate source name {s.name!r}")
        seen.add(s.name)
        yield (bool(s.path), ("data", "sources", i, "path"), "is required")
        yield (math.isfinite(s.reward) and s.reward >= 0, ("data", "sources", i, "reward"),
               f"must be a non-negative number, got {s.reward!r}")
        yield (s.max_samples is None or s.max_samples > 0, ("data", "sources", i, "max_samples"),
               "must be positive")
        yield (s.repeat >= 1, ("data", "sources", i, "repeat"), "must be ≥ 1")


def _eval_source_rules(sources: list[SourceConfig],
                       eval_sources: list[SourceConfig]) -> Iterator[tuple[bool, tuple, str]]:
    """The rules of ``data.eval_sources``: those of a source, names unique across both lists, no training file."""
    for ok, key_path, message in _source_rules(eval_sources):
        yield ok, ("data", "eval_sources", *key_path[2:]), message
    train_names = {s.name for s in sources}
    train_paths = {os.path.abspath(os.path.expanduser(s.path)) for s in sources}
    for i, s in enumerate(eval_sources):
        yield (s.name not in train_names, ("data", "eval_sources", i, "name"),
               f"{s.name!r} is also a training source's name; held-out rows are told apart by (source, index)")
        yield (os.path.abspath(os.path.expanduser(s.path)) not in train_paths, ("data", "eval_sources", i, "path"),
               f"{s.path!r} is also a training source: its conversations would be trained on")
        yield (s.repeat == 1, ("data", "eval_sources", i, "repeat"),
               "must be 1 (each held-out conversation counts once)")


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
    if m.lora is not None:
        from crlft.lora import zero_overrides  # (crlft.lora reads Recipe from this module)

        zero.update(zero_overrides())
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
                user = json.load(f, parse_constant=lambda text: _not_finite(ds.config, text))
            except json.JSONDecodeError as e:
                raise UserError(f"{ds.config}:{e.lineno}: invalid JSON: {e.msg}") from None
        config = _merge(config, user)
    return config


def _not_finite(path: str, text: str):
    raise UserError(f"{path}: {text} is not a finite number (JSON has no NaN or Infinity)")


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
    sections = [("model", ModelConfig), ("model.lora", LoraSection), ("data", DataConfig),
                ("data.sources[]", SourceConfig), ("train", TrainConfig), ("deepspeed", DeepSpeedSection),
                ("logging", LoggingConfig), ("logging.wandb", WandbConfig), ("eval", EvalConfig)]
    lines: list[str] = []
    for name, cls in sections:
        hints = typing.get_type_hints(cls, include_extras=True)
        lines += [f"**`{name}`**", "", "| key | type | default | meaning |", "|---|---|---|---|"]
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                continue
            description = cls.__pydantic_fields__[f.name].description or ""
            doc = " ".join(description.split()).replace("|", "\\|")
            lines.append(f"| `{f.name}` | {_reference_type(hints[f.name])} | {_reference_default(f)} | {doc} |")
        lines.append("")
    return "\n".join(lines)


def _reference_type(tp: Any) -> str:
    if typing.get_origin(tp) is Annotated:
        return _reference_type(typing.get_args(tp)[0])
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
    if dataclasses.is_dataclass(tp):
        return "section"
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
