"""The training run: ``train(recipe)`` as a lifecycle (set up, maybe resume, the loop, finish) and ``train_step``.

Every rank runs ``train``. One optimizer step (``train_step``) backpropagates ``Σ w·CE`` of this rank's rows scaled
so that the update is the gradient of the step's *global* loss whatever the world size or accumulation
(``docs/design.md``, "One optimizer step").
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Any

import deepspeed
import torch
from deepspeed.utils import logger as deepspeed_logger

from crlft import checkpoint as ckpt
from crlft import lora, reshard
from crlft.collate import flash_attention_kwargs
from crlft.conditions import inference_template
from crlft.config import Recipe, deepspeed_config
from crlft.dist import DistInfo, barrier, init_distributed
from crlft.evaluation import Evaluator, build_evaluator, check_split_on_resume
from crlft.export import export_checkpoint, link_or_copy_tree
from crlft.guard import NonFiniteGuard, check_state_finite, discard_if_not_finite, nothing_written
from crlft.loader import PackedLoader, PackedStep
from crlft.loss import WeightedLossModel, global_denominator, loss_scale_for_backward, num_chunks_for
from crlft.metrics import SUM_FIELDS, per_condition_sums, step_metrics
from crlft.model import ensure_base_model, load_model
from crlft.plan import dataset_token_counts, resolve_lr, supervised_tokens_per_step
from crlft.preflight import FINAL_EXPORT, complete_message, resume_point
from crlft.prepare import load_prepared, recipe_tokenizer
from crlft.run_length import few_steps_warning, run_length
from crlft.runlog import METRICS_FILE, RunLog, start_wandb, truncate_metrics
from crlft.schedule import build_optimizer, lr_scheduler_factory
from crlft.templates import Template

logger = logging.getLogger("crlft.trainer")


# --------------------------------------------------------------------------------------------------------------
# One step
# --------------------------------------------------------------------------------------------------------------


def train_step(
    engine: Any,
    step: PackedStep,
    *,
    world_size: int,
    grad_accum: int,
    loss_normalization: str,
    conditions: list[str],
    device: torch.device,
) -> dict[str, float]:
    """One optimizer step on this rank: forward/backward of its micro-batches, the update, the global metrics.

    Every rank must call it for every step (it ends with one all-reduce). A rank whose bin is empty still gets a
    zero-weight padding row from the loader, so its forward, backward and collectives happen like everyone's.

    Args:
        engine: the DeepSpeed engine wrapping a ``crlft.loss.WeightedLossModel``.
        step: this rank's ``crlft.loader.PackedStep``.
        world_size: data-parallel ranks.
        grad_accum: micro-batches per rank per step (DeepSpeed's ``gradient_accumulation_steps``).
        loss_normalization: ``train.loss_normalization``.
        conditions: all condition names, the same list on every rank (rows of the metric sums).
        device: this rank's device.

    Returns:
        The step's global metrics (``crlft.metrics.step_metrics``) plus ``lr`` (the rate this update used) and
        ``grad_norm`` (before clipping).
    """
    if len(step.micro_batches) != grad_accum:
        raise AssertionError(f"loader gave {len(step.micro_batches)} micro-batches, expected {grad_accum}")
    denominator = global_denominator(step.global_weight_sum, step.global_num_supervised_tokens, loss_normalization,
                                     rows_per_step=world_size * grad_accum)
    scale = loss_scale_for_backward(denominator, world_size, grad_accum)
    sums = torch.zeros(len(conditions), len(SUM_FIELDS), dtype=torch.float64, device=device)
    lr = float(engine.optimizer.param_groups[0]["lr"])
    for k, row in enumerate(step.micro_batches):
        batch = {key: row[key].to(device, non_blocking=True)
                 for key in ("input_ids", "position_ids", "labels", "loss_weights")}
        # The precomputed segment boundaries; flash-attention and crlft_varlen read them, sdpa/eager ignore them.
        parts = engine(batch, **flash_attention_kwargs(row, device))
        sums += per_condition_sums(parts, row["cu_seqlens"], row["segment_conditions"], conditions)
        loss = parts.weighted_ce_sum * scale
        is_last = k == grad_accum - 1
        if is_last:
            torch.distributed.all_reduce(sums)  # the one collective of our own per step, before the update
            loss = discard_if_not_finite(loss, sums)  # a non-finite step's update is dropped (crlft.guard)
        engine.backward(loss)
        if engine.is_gradient_accumulation_boundary() != is_last:
            raise AssertionError("DeepSpeed's accumulation boundary does not match the loader's micro-batches")
        engine.step()
    metrics = step_metrics(sums, conditions, denominator)
    metrics["lr"] = lr
    grad_norm = engine.get_global_grad_norm()
    if grad_norm is not None:
        metrics["grad_norm"] = float(grad_norm)
    return metrics


# --------------------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Progress:
    """What the loop carries from step to step; ``step``, ``tokens_seen`` and ``wandb_run_id`` go into checkpoints."""

    step: int = 0
    tokens_seen: int = 0
    wandb_run_id: str | None = None
    last_loss: float = math.nan
    last_checkpoint: str | None = None
    epoch: int | None = None  # the epoch of the last step, to notice a new one
    epoch_export: tuple[int, str] | None = None  # (step, path) of the newest epoch export


@dataclass
class Run:
    """Everything set up for one run on this rank."""

    recipe: Recipe
    dist: DistInfo
    template: Template
    tokenizer: Any
    model: Any  # the Hugging Face model (its config and files go into checkpoints)
    engine: Any
    loader: PackedLoader
    conditions: list[str]
    fingerprint: dict[str, Any]
    resume_from: str | None
    lr: float
    total_steps: int
    planned_steps: int
    progress: Progress
    guard: NonFiniteGuard
    reshard: bool = False  # resume_from was written by another number of ranks (crlft.reshard)
    evaluator: Evaluator | None = None  # the eval split, when the prepared data has one

    def reached_stop(self) -> bool:
        """Whether the run has done all its steps (``planned_steps``: the schedule, or ``train.stop_after_steps``)."""
        return self.progress.step >= self.planned_steps


class RunComplete(Exception):
    """The checkpoint resumed from already finished the run (and its final export is there): nothing to do."""

    def __init__(self, summary: dict[str, Any]):
        super().__init__(summary)
        self.summary = summary


def train(recipe: Recipe) -> dict[str, Any]:
    """Train the recipe's model on its prepared dataset with DeepSpeed; every rank runs this.

    Resumes from the newest complete checkpoint with ``train.resume: auto``; writes ``metrics.jsonl``, checkpoints
    (every ``save_every_steps``, at each epoch end, at the end) and exports (each epoch end and ``export/final``).

    Args:
        recipe: the validated recipe; ``crlft prepare`` must have been run for it.

    Returns:
        A summary: ``step`` (optimizer steps done), ``final_loss``, ``export`` (the final export's path) and
        ``checkpoint`` (the last checkpoint).

    Raises:
        UserError: no prepared dataset, a checkpoint that cannot be resumed with this recipe, bad settings.
    """
    try:
        run = set_up(recipe)
    except RunComplete as done:  # no engine, no export, no wandb run
        return done.summary
    maybe_resume(run)
    log = open_run_log(run)
    run.engine.train()
    try:
        for step in ([] if run.reached_stop() else run.loader):
            if step.epoch != run.progress.epoch:
                on_epoch_start(run, step)
            started = time.perf_counter()
            metrics = train_step(run.engine, step, world_size=run.dist.world_size, grad_accum=recipe.train.grad_accum,
                                 loss_normalization=recipe.train.loss_normalization, conditions=run.conditions,
                                 device=run.dist.device)
            if run.guard.check_step(run.progress.step + 1, metrics["loss"], metrics.get("grad_norm"),
                                    run.engine.was_step_applied(), run.progress.last_checkpoint):
                metrics["skipped"] = 1.0  # a non-finite step, its update dropped (crlft.guard)
            record = advance(run.progress, step, metrics, time.perf_counter() - started)
            if run.evaluator is not None:  # before the checkpoint: a resume never skips an evaluation
                record.update(run.evaluator.maybe_evaluate(
                    run.engine, run.dist.device, run.progress.step, step.step_in_epoch + 1 == step.steps_per_epoch,
                    run.reached_stop()))
            log.step(record)
            checkpoint_and_export(run, step)
            if run.reached_stop():
                break
    finally:
        log.close(run.progress.last_loss)
    return finish(run)


def set_up(recipe: Recipe) -> Run:
    """Distributed init, the demo's base model, tokenizer, prepared data, loader, resume check, model and engine.

    A checkpoint the recipe cannot resume from is refused here, before the model is loaded.
    """
    dist = init_distributed()
    _configure_logging(dist.rank)
    t, m = recipe.train, recipe.model
    if dist.rank == 0:
        os.makedirs(t.output_dir, exist_ok=True)
        ensure_base_model(recipe)  # the demo's random base (once, before every rank loads it)
    barrier()
    # The same seed on every rank: nothing random differs between ranks (Mistral has no dropout), so runs with
    # different world sizes stay comparable.
    torch.manual_seed(t.seed)

    started = time.perf_counter()
    template = inference_template(recipe)  # the export's chat template answers as the best class by default
    if template.uses_condition:
        logger.info(f"inference condition: {template.inference_condition!r} (the exports' default; "
                    "model.inference_condition, else the condition of the highest-reward source)")
    tokenizer = recipe_tokenizer(recipe, template)  # a missing base or tokenizer is a located error
    dataset = load_prepared(recipe)
    conditions = sorted(set(dataset.unique("condition"))) if "condition" in dataset.column_names else [""]
    loader = PackedLoader(
        dataset, max_tokens=t.batch_max_len, num_ranks=dist.world_size, rank=dist.rank, grad_accum=t.grad_accum,
        seed=t.seed, pad_to_multiple_of=t.pad_to_multiple_of, num_epochs=t.epochs,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
    )
    length = run_length(t, loader.steps_per_epoch)  # the same numbers `crlft plan` prints
    loader.num_epochs = length.epochs
    logger.info(f"data: {len(dataset)} conversations, {length.describe()} ({dist.world_size} ranks × "
                f"{t.grad_accum} rows × {t.batch_max_len} tokens per step)")
    few_steps = few_steps_warning(length)
    if few_steps and dist.rank == 0:
        logger.warning(few_steps)

    fingerprint = ckpt.resume_fingerprint(recipe, ckpt.data_fingerprint(recipe.data.output_dir), dist.world_size)
    point = resume_point(recipe, fingerprint, dist.world_size)
    done = complete_message(recipe, point, length.stop_at)
    if done is not None:
        logger.info(done)
        barrier()
        torch.distributed.destroy_process_group()
        raise RunComplete({"step": point.step, "final_loss": math.nan, "checkpoint": point.checkpoint,
                           "export": os.path.join(t.output_dir, ckpt.EXPORT_DIR, FINAL_EXPORT)})
    resharding = point.checkpoint is not None and reshard.needs_reshard(point.state, dist.world_size)
    if resharding:
        logger.info(f"resume: {point.checkpoint} was written by {point.state['world_size']} ranks, this run has "
                    f"{dist.world_size}; its ZeRO state is resharded through DeepSpeed's universal checkpoint")

    evaluator = build_evaluator(recipe, dist.world_size, dist.rank, loader.pad_token_id)
    ds_config = deepspeed_config(recipe)
    if resharding:  # DeepSpeed reads this flag when the engine is made
        ds_config = reshard.universal_load_config(ds_config)
    logger.info(f"loading the model from {m.base} ...")
    model = load_model(recipe, tokenizer, dist.device, ds_config=ds_config)
    if m.lora is not None and m.lora.dropout > 0:
        torch.manual_seed(lora.dropout_seed(t.seed, dist.rank))  # one set of dropout masks per rank, not shared
    lr = _peak_lr(recipe, dataset, dist.world_size, model.config.model_type)
    logger.info(f"building the DeepSpeed engine (ZeRO-{recipe.deepspeed.zero_stage}, {dist.world_size} ranks) ...")
    engine = _engine(recipe, ds_config, model, lr, length.schedule_steps, dist.device)
    logger.info(f"set-up took {time.perf_counter() - started:.0f} s")
    return Run(recipe=recipe, dist=dist, template=template, tokenizer=tokenizer, model=model, engine=engine,
               loader=loader, conditions=conditions, fingerprint=fingerprint, resume_from=point.checkpoint, lr=lr,
               total_steps=length.schedule_steps, planned_steps=length.stop_at,
               progress=Progress(last_checkpoint=point.checkpoint), guard=NonFiniteGuard(t.nonfinite_skips),
               reshard=resharding, evaluator=evaluator)


def _engine(recipe: Recipe, ds_config: dict[str, Any], model: Any, lr: float, total_steps: int,
            device: torch.device) -> Any:
    """The DeepSpeed engine around the loss wrapper, with our AdamW and schedule unless the user's file has its own."""
    t = recipe.train
    chunks = num_chunks_for(t.batch_max_len) if recipe.deepspeed.zero_stage == 3 else None  # same lm_head calls
    wrapped = WeightedLossModel(model, num_chunks=chunks)
    if "optimizer" in ds_config:  # the user's DeepSpeed file defines its own optimizer
        optimizer = None
        logger.info("optimizer: from deepspeed.config (its lr replaces the recipe's)")
    else:
        optimizer = build_optimizer(wrapped, recipe, lr, device)
    scheduler = None if "scheduler" in ds_config else lr_scheduler_factory(total_steps, t.lr_warmup_ratio,
                                                                         t.lr_min_ratio)
    engine, _, _, _ = deepspeed.initialize(
        model=wrapped, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config,
        model_parameters=[p for p in wrapped.parameters() if p.requires_grad] if optimizer is None else None,
    )
    return engine


def maybe_resume(run: Run) -> None:
    """Load the checkpoint chosen in :func:`set_up` (if any); drop the metrics lines logged after it."""
    progress = run.progress
    if run.resume_from is not None:
        logger.info(f"resuming from {run.resume_from} ...")
        location = reshard.convert_to_universal(run.resume_from, run.dist.rank, barrier) if run.reshard else None
        saved = ckpt.load_checkpoint(run.engine, run.resume_from, run.dist.rank, location,
                                     strict=run.recipe.model.lora is None)  # LoRA: the base is not saved
        if run.reshard:
            reshard.remove_universal(run.resume_from, run.dist.rank, barrier)
        run.loader.load_state_dict(saved["loader"])
        progress.step, progress.tokens_seen = saved["step"], saved.get("tokens_seen", 0)
        progress.wandb_run_id = saved.get("wandb_run_id")
        run.guard.skipped_steps = list(saved.get("nonfinite_skipped_steps", []))
        check_state_finite(run.engine, f"loaded from {run.resume_from}",
                           "it was written from a damaged state (or damaged before its manifest was written); move "
                           "it away and run again to resume from the checkpoint before it")
        check_split_on_resume(saved.get("eval_split"), run.evaluator, run.resume_from)
        logger.info(f"resumed from {run.resume_from} (step {progress.step}, epoch {saved['loader']['epoch']})")
    if run.dist.rank == 0:
        dropped = truncate_metrics(os.path.join(run.recipe.train.output_dir, METRICS_FILE), progress.step)
        if dropped:
            logger.info(f"{METRICS_FILE}: dropped {dropped} line(s) logged after the checkpoint")


def open_run_log(run: Run) -> RunLog:
    """The metrics file, progress bar and wandb run on rank 0 (a disabled log elsewhere)."""
    wandb_run = None
    if run.dist.rank == 0:
        wandb_run, run.progress.wandb_run_id = start_wandb(run.recipe, run.progress.wandb_run_id)
    return RunLog(os.path.join(run.recipe.train.output_dir, METRICS_FILE), run.planned_steps, run.progress.step,
                  run.recipe.logging.log_every, wandb_run, enabled=run.dist.rank == 0)


def on_epoch_start(run: Run, step: PackedStep) -> None:
    """The first step of an epoch (or of a resumed run) is due: the place for per-epoch reports."""
    run.progress.epoch = step.epoch
    resumed = f", resumed at step {step.step_in_epoch + 1}" if step.step_in_epoch else ""
    logger.info(f"epoch {step.epoch + 1}/{run.loader.num_epochs}: {step.steps_per_epoch} steps{resumed}")
    if run.dist.rank == 0:
        _log_class_mixing(run.loader, step.epoch)


def advance(progress: Progress, step: PackedStep, metrics: dict[str, float], step_time_s: float) -> dict[str, Any]:
    """Count the step done; returns its ``metrics.jsonl`` record."""
    progress.step += 1
    progress.tokens_seen += step.global_num_tokens
    progress.last_loss = metrics.pop("loss")
    return {
        "step": progress.step,
        "epoch": round(_epoch_progress(step), 4),
        "loss": progress.last_loss,
        "lr": metrics.pop("lr"),
        "num_tokens": step.global_num_tokens,
        "tokens_per_s": step.global_num_tokens / step_time_s,
        "step_time_s": step_time_s,
        "tokens_seen": progress.tokens_seen,
        **metrics,
    }


def checkpoint_and_export(run: Run, step: PackedStep) -> None:
    """Checkpoint at an epoch end, at the last step and every ``save_every_steps``; export at each epoch end (unless
    ``train.export_every_epoch`` is off)."""
    t, progress = run.recipe.train, run.progress
    epoch_end = step.step_in_epoch + 1 == step.steps_per_epoch
    periodic = bool(t.save_every_steps and progress.step % t.save_every_steps == 0)
    if epoch_end or run.reached_stop() or periodic:
        check_state_finite(run.engine, f"after step {progress.step}",
                           f"stopping before the checkpoint of step {progress.step}: "
                           + nothing_written(progress.last_checkpoint))
        progress.last_checkpoint = ckpt.save_checkpoint(
            run.engine, t.output_dir, progress.step, _trainer_state(run, _epoch_progress(step)),
            hf_files=lambda d: _save_hf_files(run, d), keep_last=t.keep_last, rank=run.dist.rank, barrier=barrier,
            exclude_frozen=run.recipe.model.lora is not None,
        )
    if epoch_end and t.export_every_epoch:
        progress.epoch_export = (progress.step, _export(run, progress.last_checkpoint, f"epoch_{step.epoch + 1}"))


def finish(run: Run) -> dict[str, Any]:
    """The final export (a link to the epoch export of the same step when there is one), then leave the group."""
    progress = run.progress
    final_export = None
    if progress.last_checkpoint is not None:
        # The last step always has a checkpoint (an epoch end or the run's end); an epoch export of it is linked.
        epoch_export = progress.epoch_export
        reuse = epoch_export[1] if epoch_export and epoch_export[0] == progress.step else None
        final_export = _export(run, progress.last_checkpoint, "final", copy_of=reuse)
    logger.info(f"done: {progress.step} steps; final export {final_export}")
    barrier()
    torch.distributed.destroy_process_group()
    return {"step": progress.step, "final_loss": progress.last_loss, "export": final_export,
            "checkpoint": progress.last_checkpoint}


def _save_hf_files(run: Run, out_dir: str) -> None:
    """A checkpoint's ``hf/`` files; a LoRA run adds peft's ``adapter_config.json`` (naming the base)."""
    ckpt.save_hf_files(run.model, run.tokenizer, run.template, out_dir, max_context=run.recipe.model.max_context)
    if run.recipe.model.lora is not None:
        lora.save_adapter_config(run.model, out_dir, lora.base_location(run.recipe))


def _epoch_progress(step: PackedStep) -> float:
    return step.epoch + (step.step_in_epoch + 1) / step.steps_per_epoch


def _trainer_state(run: Run, epoch_progress: float) -> dict[str, Any]:
    """What a checkpoint records besides DeepSpeed's own state."""
    progress, m = run.progress, run.recipe.model
    return {
        "step": progress.step,
        "epoch_progress": epoch_progress,
        "loader": run.loader.state_dict(),
        "fingerprint": run.fingerprint,
        "tokens_seen": progress.tokens_seen,
        "lr": run.lr,
        "total_steps": run.total_steps,
        "world_size": run.dist.world_size,
        "zero_stage": run.recipe.deepspeed.zero_stage,
        "dtype": m.dtype,
        "template": m.template,
        "param_prefix": "model.",  # WeightedLossModel holds the Hugging Face model as .model
        "recipe": run.recipe.to_dict(),
        "nonfinite_skipped_steps": run.guard.skipped_steps,
        **({"wandb_run_id": progress.wandb_run_id} if progress.wandb_run_id is not None else {}),
        **({"eval_split": run.evaluator.split} if run.evaluator is not None else {}),
    }


def _export(run: Run, checkpoint: str, name: str, copy_of: str | None = None) -> str:
    """Export ``checkpoint`` to ``export/NAME`` on rank 0 (or link ``copy_of``, the same step's export)."""
    out = os.path.join(run.recipe.train.output_dir, ckpt.EXPORT_DIR, name)
    if run.dist.rank == 0:
        if copy_of:
            link_or_copy_tree(copy_of, out)
        else:
            export_checkpoint(checkpoint, out, log=logger.info)
    barrier()
    return out


def _configure_logging(rank: int) -> None:
    # DeepSpeed 0.19 still calls these torch.distributed functions; the warning repeats on every rank and step.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)`",
                            category=FutureWarning)
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr)
    logging.getLogger("crlft").setLevel(level)
    # DeepSpeed's INFO lines (configs, timers) drown the progress bar; its warnings and errors stay.
    deepspeed_logger.setLevel(logging.DEBUG if os.environ.get("CRLFT_DEBUG") else logging.WARNING)


def _log_class_mixing(loader: Any, epoch: int) -> None:
    """Logs how many of the epoch's steps hold one condition only, and warns when far more than random steps would.

    Under ``loss_normalization: weight_sum`` the rewards weigh classes only against each other within a step: in a
    one-class step, sub-optimal data moves the model as much as expert data.
    """
    mixing = loader.class_mixing(epoch)
    if mixing is None or mixing.num_classes < 2:
        return
    line = (
        f"epoch {epoch + 1}: {mixing.one_class_share:.1%} of {mixing.num_steps} steps hold one condition only "
        f"(random steps of the same sizes: {mixing.random_one_class_share:.1%})"
    )
    if mixing.is_far_from_random:
        logger.warning(line + ": far more than random; in those steps the rewards cannot weigh classes against "
                       "each other (see the README's loss section)")
    else:
        logger.info(line)


def _peak_lr(recipe: Recipe, dataset: Any, world_size: int, model_type: str) -> float:
    """The recipe's lr, or ``auto``: OpenChat's rule (``crlft.plan.resolve_lr``, the same numbers ``crlft plan``
    prints); logged with the numbers it came from."""
    t = recipe.train
    tokens_per_step = None
    if t.lr == "auto":
        num_tokens, num_supervised = dataset_token_counts(dataset)
        tokens_per_step = supervised_tokens_per_step(t.batch_max_len, world_size, t.grad_accum,
                                                     num_supervised / max(num_tokens, 1))
    lr, explanation = resolve_lr(recipe, tokens_per_step, model_type)
    logger.info(f"learning rate: {explanation}; linear warm-up over {t.lr_warmup_ratio:.0%} of the steps, "
                f"then cosine to {lr * t.lr_min_ratio:.3g} (lr_min_ratio {t.lr_min_ratio:g})")
    return lr


__all__ = ["Progress", "Run", "train", "train_step"]
