"""The training loop: ``train(recipe)`` and ``train_step(...)`` on a DeepSpeed engine.

One optimizer step, on every rank (``train_step``):

1. The packed loader hands this rank its ``grad_accum`` packed rows of the step, plus the step's *global* totals
   (``Σ w`` and the number of supervised targets over all ranks and micro-batches), known from the packing plan
   without any communication.
2. For each row: forward through the decoder, chunked weighted cross-entropy (``crlft.loss``), then
   ``engine.backward(Σ w·CE · s)`` with ``s = loss_scale_for_backward(D, world_size, grad_accum)``. DeepSpeed divides
   by ``gradient_accumulation_steps`` and averages gradients over ranks; ``s`` undoes both, so the update is the
   gradient of ``L = Σ_step w·CE / D`` whatever the world size or accumulation. ``engine.step()`` after every
   row: DeepSpeed updates only at the accumulation boundary (the last row), which the loop asserts.
3. The per-condition sums (weighted CE, weights, tokens, correct) of the rows are all-reduced once, giving the
   logged global loss, weighted accuracy and the loss per condition.

``train`` wires it up: distributed init, the prepared dataset, the packed loader, lr (``auto``: OpenChat's rule),
AdamW + linear-warmup-cosine schedule, the engine, resume, then the loop with metrics (``metrics.jsonl``, progress
bar, wandb), checkpoints and exports.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import math
import os
import signal
import socket
import sys
import time
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from crlft.config import Recipe, deepspeed_config

logger = logging.getLogger("crlft.trainer")

METRICS_FILE = "metrics.jsonl"

# Test hook (tests/test_resume.py): the rank-0 process SIGKILLs itself right after this optimizer step is logged
# (and checkpointed, when a checkpoint falls on it), like a machine dying mid-run.
SIGKILL_AFTER_STEP_ENV = "CRLFT_TEST_SIGKILL_AFTER_STEP"


# --------------------------------------------------------------------------------------------------------------
# Distributed
# --------------------------------------------------------------------------------------------------------------


@dataclass
class DistInfo:
    """Where this process sits among the ranks."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> DistInfo:
    """Join the process group the launcher set up (``deepspeed``/``torchrun`` env vars), or form one of size 1.

    DeepSpeed picks the backend of its accelerator: NCCL on CUDA, gloo (or oneCCL when installed) on the CPU.
    """
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        # Not launched (`crlft train`): a world of one, in this process.
        os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"})
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    deepspeed.init_distributed(timeout=datetime.timedelta(minutes=30), verbose=False)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu":
        accelerator.set_device(local_rank)
    device = torch.device(accelerator.device_name(local_rank))
    return DistInfo(torch.distributed.get_rank(), torch.distributed.get_world_size(), local_rank, device)


def barrier() -> None:
    """All ranks meet here."""
    torch.distributed.barrier()


# --------------------------------------------------------------------------------------------------------------
# Schedule and optimizer
# --------------------------------------------------------------------------------------------------------------


def num_warmup_steps(total_steps: int, warmup_ratio: float) -> int:
    """Steps of linear warm-up: ``ceil(warmup_ratio · total_steps)``, less than ``total_steps``."""
    return min(math.ceil(warmup_ratio * total_steps), max(total_steps - 1, 0))


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
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(params, adamw_mode=True, **kwargs)
    if device.type == "cuda":
        return torch.optim.AdamW(params, fused=True, **kwargs)
    return torch.optim.AdamW(params, **kwargs)


# --------------------------------------------------------------------------------------------------------------
# One step
# --------------------------------------------------------------------------------------------------------------


def train_step(
    engine: Any,
    step: Any,
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
        step: a ``crlft.packing.PackedStep`` for this rank.
        world_size: data-parallel ranks.
        grad_accum: micro-batches per rank per step (DeepSpeed's ``gradient_accumulation_steps``).
        loss_normalization: ``train.loss_normalization``.
        conditions: all condition names, the same list on every rank (rows of the metric sums).
        device: this rank's device.

    Returns:
        The step's global metrics (``crlft.loss.step_metrics``) plus ``lr`` (the rate this update used) and
        ``grad_norm`` (before clipping).
    """
    from crlft.loss import SUM_FIELDS, global_denominator, loss_scale_for_backward, per_condition_sums
    from crlft.loss import step_metrics as metrics_from_sums
    from crlft.packing import flash_attention_kwargs

    if len(step.micro_batches) != grad_accum:
        raise AssertionError(f"loader gave {len(step.micro_batches)} micro-batches, expected {grad_accum}")
    denominator = global_denominator(step.global_weight_sum, step.global_num_supervised_tokens, loss_normalization)
    scale = loss_scale_for_backward(denominator, world_size, grad_accum)
    sums = torch.zeros(len(conditions), len(SUM_FIELDS), dtype=torch.float64, device=device)
    lr = float(engine.optimizer.param_groups[0]["lr"])
    for k, row in enumerate(step.micro_batches):
        batch = {key: row[key].to(device, non_blocking=True)
                 for key in ("input_ids", "position_ids", "labels", "loss_weights")}
        # The precomputed segment boundaries; flash-attention and crlft_varlen read them, sdpa/eager ignore them.
        parts = engine(batch, **flash_attention_kwargs(row, device))
        engine.backward(parts.weighted_ce_sum * scale)
        is_last = k == grad_accum - 1
        if engine.is_gradient_accumulation_boundary() != is_last:
            raise AssertionError("DeepSpeed's accumulation boundary does not match the loader's micro-batches")
        engine.step()
        sums += per_condition_sums(parts, row["cu_seqlens"], row["segment_conditions"], conditions)
    torch.distributed.all_reduce(sums)  # the one collective of our own per step
    metrics = metrics_from_sums(sums, conditions, denominator)
    metrics["lr"] = lr
    grad_norm = engine.get_global_grad_norm()
    if grad_norm is not None:
        metrics["grad_norm"] = float(grad_norm)
    return metrics


# --------------------------------------------------------------------------------------------------------------
# Metrics and logging
# --------------------------------------------------------------------------------------------------------------


def truncate_metrics(path: str, last_step: int) -> int:
    """Keep only the lines of ``metrics.jsonl`` with ``step <= last_step`` (a resumed run rewrites the rest).

    Returns:
        The number of lines dropped.
    """
    if not os.path.isfile(path):
        return 0
    kept, dropped = [], 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a crash
                dropped += 1
                continue
            if record.get("step", 0) <= last_step:
                kept.append(line if line.endswith("\n") else line + "\n")
            else:
                dropped += 1
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(kept)
    os.replace(tmp, path)
    return dropped


def _round(value: float) -> float:
    return float(f"{value:.6g}") if isinstance(value, float) and math.isfinite(value) else value


def _start_wandb(recipe: Recipe, state: dict[str, Any]) -> Any:
    w = recipe.logging.wandb
    if not w.project or w.mode == "disabled":
        return None
    import wandb

    # The id is kept in the checkpoints, so a resumed run continues the same wandb run.
    run_id = state.setdefault("wandb_run_id", uuid.uuid4().hex[:12])
    return wandb.init(
        project=w.project, entity=w.entity, name=w.name or os.path.basename(os.path.abspath(recipe.train.output_dir)),
        mode=w.mode, dir=recipe.train.output_dir, config=recipe.to_dict(), id=run_id, resume="allow",
    )


class RunLog:
    """Where a step's numbers go on rank 0: ``metrics.jsonl`` (every step), the progress bar, a line and wandb (every
    ``log_every`` steps). Other ranks hold a disabled one.

    Args:
        path: the ``metrics.jsonl`` file (appended to).
        total_steps: steps the run will do in all (for the bar and the ETA).
        done_steps: steps already done (resumed runs).
        log_every: print and send to wandb every this many steps.
        wandb_run: a wandb run, or None.
        enabled: False on ranks other than 0.
    """

    def __init__(self, path: str, total_steps: int, done_steps: int, log_every: int, wandb_run: Any, enabled: bool):
        from tqdm import tqdm

        self.total_steps, self.log_every, self.wandb_run, self.enabled = total_steps, log_every, wandb_run, enabled
        self.file = open(path, "a", encoding="utf-8") if enabled else None
        # In a log file (no terminal) the bar redraws rarely; the per-step lines carry the numbers and the ETA.
        self.bar = tqdm(total=total_steps, initial=min(done_steps, total_steps), disable=not enabled, desc="train",
                        unit="step", dynamic_ncols=True, file=sys.stderr,
                        mininterval=0.5 if sys.stderr.isatty() else 60.0)
        self.started = time.perf_counter()
        self.first_step = done_steps

    def step(self, record: dict[str, Any]) -> None:
        """Log one step's record (``step``, ``epoch``, ``loss``, ``lr``, ``tokens_per_s``, ...)."""
        if not self.enabled:
            return
        self.file.write(json.dumps({k: v if k == "loss" else _round(v) for k, v in record.items()}) + "\n")
        self.file.flush()
        step = record["step"]
        self.bar.update(1)
        self.bar.set_postfix(epoch=f"{record['epoch']:.2f}", loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                             tok_s=f"{record['tokens_per_s']:.0f}", refresh=False)
        if step % self.log_every == 0 or step == self.total_steps:
            seconds_per_step = (time.perf_counter() - self.started) / max(step - self.first_step, 1)
            eta = self.bar.format_interval(seconds_per_step * max(self.total_steps - step, 0))
            per_condition = ", ".join(f"{k[5:]} {v:.4f}" for k, v in record.items() if k.startswith("loss/"))
            self.bar.write(
                f"step {step}/{self.total_steps} epoch {record['epoch']:.2f} loss {record['loss']:.4f} "
                + (f"({per_condition}) " if per_condition else "")
                + f"acc {record['weighted_accuracy']:.3f} lr {record['lr']:.3e} {record['tokens_per_s']:.0f} tok/s "
                f"eta {eta}", file=sys.stderr)
            if self.wandb_run is not None:
                self.wandb_run.log({k: v for k, v in record.items() if k != "step"}, step=step)

    def close(self, final_loss: float) -> None:
        """Close the file, the bar and the wandb run."""
        self.bar.close()
        if self.file is not None:
            self.file.close()
        if self.wandb_run is not None:
            self.wandb_run.summary["final_loss"] = final_loss
            self.wandb_run.finish()


# --------------------------------------------------------------------------------------------------------------
# Resume fingerprint
# --------------------------------------------------------------------------------------------------------------


def data_fingerprint(data_dir: str) -> str:
    """A hash of what the prepared dataset was made from (its ``crlft_meta.json`` inputs).

    File modification times and the crlft version are left out: touching a file, or upgrading crlft, without
    changing the rows must not block a resume (the loader also checks the rows' lengths).
    """
    from crlft.data import META_FILE

    with open(os.path.join(data_dir, META_FILE), encoding="utf-8") as f:
        inputs = json.load(f).get("inputs", {})
    inputs = dict(inputs)
    inputs.pop("crlft_version", None)
    for source in inputs.get("sources", []):
        if isinstance(source.get("file"), dict):
            source["file"].pop("mtime_ns", None)
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


def resume_fingerprint(recipe: Recipe, data_hash: str, world_size: int) -> dict[str, Any]:
    """What must not change between a checkpoint and the run resuming from it.

    The data, the global batch (rows per rank, ranks, accumulation), the order (seed), what a token means
    (template, dtype) and everything that shapes the update (schedule, optimizer settings, clipping, loss
    normalisation). Free to change: ``max_steps``, ``save_every_steps``, ``keep_last``, logging, the base path.
    """
    t = recipe.train
    return {
        "data": data_hash,
        "template": recipe.model.template,
        "dtype": recipe.model.dtype,
        "world_size": world_size,
        "batch_max_len": t.batch_max_len,
        "grad_accum": t.grad_accum,
        "seed": t.seed,
        "epochs": t.epochs,
        "lr": t.lr,
        "lr_warmup_ratio": t.lr_warmup_ratio,
        "lr_min_ratio": t.lr_min_ratio,
        "weight_decay": t.weight_decay,
        "betas": list(t.betas),
        "eps": t.eps,
        "grad_clip": t.grad_clip,
        "loss_normalization": t.loss_normalization,
        "zero_stage": recipe.deepspeed.zero_stage,
    }


# --------------------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------------------


def _configure_logging(rank: int) -> None:
    # DeepSpeed 0.19 still calls these torch.distributed functions; the warning repeats on every rank and step.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)`",
                            category=FutureWarning)
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr)
    logging.getLogger("crlft").setLevel(level)
    from deepspeed.utils import logger as ds_logger

    # DeepSpeed's INFO lines (configs, timers) drown the progress bar; its warnings and errors stay.
    ds_logger.setLevel(logging.DEBUG if os.environ.get("CRLFT_DEBUG") else logging.WARNING)


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
    import deepspeed

    from crlft import checkpoint as ckpt
    from crlft.data import load_prepared
    from crlft.loss import WeightedLossModel, num_chunks_for
    from crlft.model import ensure_base_model, load_model
    from crlft.packing import PackedLoader
    from crlft.templates import TEMPLATES, load_tokenizer

    dist_info = init_distributed()
    rank, world_size, device = dist_info.rank, dist_info.world_size, dist_info.device
    _configure_logging(rank)
    t, m = recipe.train, recipe.model
    template = TEMPLATES[m.template]
    output_dir = t.output_dir
    if rank == 0:
        os.makedirs(output_dir, exist_ok=True)
        ensure_base_model(recipe)  # the demo's random base (once, before every rank loads it)
    barrier()
    # The same seed on every rank: nothing random differs between ranks (Mistral has no dropout), so runs with
    # different world sizes stay comparable.
    torch.manual_seed(t.seed)

    # ----- data -----
    tokenizer = load_tokenizer(m.tokenizer or m.base, template)
    dataset = load_prepared(recipe)
    conditions = sorted(set(dataset.unique("condition"))) if "condition" in dataset.column_names else [""]
    loader = PackedLoader(
        dataset, max_tokens=t.batch_max_len, num_ranks=world_size, rank=rank, grad_accum=t.grad_accum,
        seed=t.seed, pad_to_multiple_of=t.pad_to_multiple_of, num_epochs=t.epochs,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
    )
    steps_per_epoch = [loader.steps_per_epoch(e) for e in range(t.epochs)]
    total_steps = sum(steps_per_epoch)
    planned_steps = min(total_steps, t.max_steps) if t.max_steps else total_steps

    warmup = num_warmup_steps(total_steps, t.lr_warmup_ratio)
    logger.info(
        f"data: {len(dataset)} conversations, {steps_per_epoch[0]} steps/epoch × {t.epochs} epochs = {total_steps} "
        f"steps ({world_size} ranks × {t.grad_accum} rows × {t.batch_max_len} tokens), {warmup} warm-up steps"
        + (f"; stopping after {t.max_steps} steps" if t.max_steps and t.max_steps < total_steps else "")
    )

    # Which checkpoint to continue from, refused early (before loading the model) when the recipe changed.
    fingerprint = resume_fingerprint(recipe, data_fingerprint(recipe.data.output_dir), world_size)
    resume_from = ckpt.resolve_resume(t.resume, output_dir, recipe.where("train", "resume"))
    if resume_from is not None:
        ckpt.check_resume_fingerprint(ckpt.read_trainer_state(resume_from)["fingerprint"], fingerprint, resume_from)

    # ----- model, learning rate, engine -----
    ds_config = deepspeed_config(recipe)
    model = load_model(recipe, tokenizer, device)
    lr = _peak_lr(recipe, dataset, world_size, model.config.model_type)
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

    # ----- resume -----
    state: dict[str, Any] = {"step": 0, "tokens_seen": 0}
    if resume_from is not None:
        saved = ckpt.load_checkpoint(engine, resume_from, rank)
        loader.load_state_dict(saved["loader"])
        state.update({k: saved[k] for k in ("step", "tokens_seen", "wandb_run_id") if k in saved})
        logger.info(f"resumed from {resume_from} (step {state['step']}, epoch {saved['loader']['epoch']})")
    metrics_path = os.path.join(output_dir, METRICS_FILE)
    if rank == 0:
        dropped = truncate_metrics(metrics_path, state["step"])
        if dropped:
            logger.info(f"{METRICS_FILE}: dropped {dropped} line(s) logged after the checkpoint")

    def trainer_state(epoch_progress: float) -> dict[str, Any]:
        return {
            "step": state["step"],
            "epoch_progress": epoch_progress,
            "loader": loader.state_dict(),
            "fingerprint": fingerprint,
            "tokens_seen": state["tokens_seen"],
            "lr": lr,
            "total_steps": total_steps,
            "world_size": world_size,
            "zero_stage": recipe.deepspeed.zero_stage,
            "dtype": m.dtype,
            "template": m.template,
            "param_prefix": "model.",  # WeightedLossModel holds the Hugging Face model as .model
            "recipe": recipe.to_dict(),
            **({"wandb_run_id": state["wandb_run_id"]} if "wandb_run_id" in state else {}),
        }

    def save(epoch_progress: float) -> str:
        return ckpt.save_checkpoint(
            engine, output_dir, state["step"], trainer_state(epoch_progress),
            hf_files=lambda d: ckpt.save_hf_files(model, tokenizer, template, d),
            keep_last=t.keep_last, rank=rank, barrier=barrier,
        )

    def export(checkpoint: str, name: str, copy_of: str | None = None) -> str:
        out = os.path.join(output_dir, ckpt.EXPORT_DIR, name)
        if rank == 0:
            if copy_of:
                ckpt.link_or_copy_tree(copy_of, out)
            else:
                ckpt.export_checkpoint(checkpoint, out, log=logger.info)
        barrier()
        return out

    # ----- the loop -----
    sigkill_after = int(os.environ.get(SIGKILL_AFTER_STEP_ENV, "0") or 0)
    log = RunLog(metrics_path, planned_steps, state["step"], recipe.logging.log_every,
                 _start_wandb(recipe, state) if rank == 0 else None, enabled=rank == 0)
    last_checkpoint = resume_from
    epoch_export: tuple[int, str] | None = None  # (step, path) of the newest epoch export
    last_loss = float("nan")
    engine.train()
    try:
        stopped_early = bool(t.max_steps and state["step"] >= t.max_steps)
        for step in ([] if stopped_early else loader):
            if step.step_in_epoch == 0 and rank == 0:
                _log_class_mixing(loader, step.epoch)
            t0 = time.perf_counter()
            metrics = train_step(engine, step, world_size=world_size, grad_accum=t.grad_accum,
                                 loss_normalization=t.loss_normalization, conditions=conditions, device=device)
            step_time_s = time.perf_counter() - t0
            state["step"] += 1
            state["tokens_seen"] += step.global_num_tokens
            epoch_progress = step.epoch + (step.step_in_epoch + 1) / step.steps_per_epoch
            last_loss = metrics.pop("loss")
            log.step({
                "step": state["step"],
                "epoch": round(epoch_progress, 4),
                "loss": last_loss,
                "lr": metrics.pop("lr"),
                "num_tokens": step.global_num_tokens,
                "tokens_per_s": step.global_num_tokens / step_time_s,
                "step_time_s": step_time_s,
                "tokens_seen": state["tokens_seen"],
                **metrics,
            })

            epoch_end = step.step_in_epoch + 1 == step.steps_per_epoch
            stopped_early = bool(t.max_steps and state["step"] >= t.max_steps)
            periodic = bool(t.save_every_steps and state["step"] % t.save_every_steps == 0)
            if epoch_end or stopped_early or periodic:
                last_checkpoint = save(epoch_progress)
            if epoch_end:
                epoch_export = (state["step"], export(last_checkpoint, f"epoch_{step.epoch + 1}"))
            if sigkill_after and state["step"] == sigkill_after and rank == 0:
                os.kill(os.getpid(), signal.SIGKILL)
            if stopped_early:
                break
    finally:
        log.close(last_loss)

    # ----- the end -----
    final_export = None
    if last_checkpoint is not None:
        # The last step always has a checkpoint (epoch end or max_steps); an epoch export of it is linked, not redone.
        reuse = epoch_export[1] if epoch_export and epoch_export[0] == state["step"] else None
        final_export = export(last_checkpoint, "final", copy_of=reuse)
    logger.info(f"done: {state['step']} steps; final export {final_export}")
    barrier()
    torch.distributed.destroy_process_group()
    return {"step": state["step"], "final_loss": last_loss, "export": final_export, "checkpoint": last_checkpoint}


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
    from crlft.plan import dataset_token_counts, resolve_lr, supervised_tokens_per_step

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


__all__ = [
    "METRICS_FILE",
    "RunLog",
    "build_optimizer",
    "data_fingerprint",
    "init_distributed",
    "lr_factor",
    "lr_scheduler_factory",
    "num_warmup_steps",
    "resume_fingerprint",
    "train",
    "train_step",
    "truncate_metrics",
]
