"""Where a step's numbers go: ``metrics.jsonl`` (every step), the progress bar, a log line and wandb (rank 0)."""

from __future__ import annotations

import json
import math
import os
import sys
import time
import uuid
from typing import Any

from tqdm import tqdm

from crlft.config import Recipe

METRICS_FILE = "metrics.jsonl"
_FULL_PRECISION = ("loss", "eval_loss")


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


def start_wandb(recipe: Recipe, run_id: str | None) -> tuple[Any, str | None]:
    """Start (or, with the saved ``run_id``, continue) the recipe's wandb run; ``(None, run_id)`` when it is off.

    Returns:
        The wandb run and its id (kept in the checkpoints, so a resumed run continues the same wandb run).
    """
    w = recipe.logging.wandb
    if not w.project or w.mode == "disabled":
        return None, run_id
    # Imported here: wandb takes about 2 s to import and most runs do not log to it.
    import wandb

    run_id = run_id or uuid.uuid4().hex[:12]
    run = wandb.init(
        project=w.project, entity=w.entity, name=w.name or os.path.basename(os.path.abspath(recipe.train.output_dir)),
        mode=w.mode, dir=recipe.train.output_dir, config=recipe.to_dict(), id=run_id, resume="allow",
    )
    return run, run_id


def eval_metrics(results: dict[str, Any]) -> dict[str, float]:
    """``crlft eval`` results as flat wandb keys: ``eval/<condition>/accuracy`` and per task (``none`` for "")."""
    flat: dict[str, float] = {}
    for condition, r in results.items():
        name = condition or "none"
        flat[f"eval/{name}/accuracy"] = r["accuracy"]
        for task, accuracy in r.get("per_task", {}).items():
            flat[f"eval/{name}/{task}/accuracy"] = accuracy
    return flat


def training_wandb_run_id(output_dir: str, model_dir: str) -> str | None:
    """The wandb run id of the training that wrote ``model_dir`` (from its checkpoint), else of the run directory's
    newest checkpoint, else None."""
    from crlft.checkpoint import EXPORT_INFO_FILE, TRAINER_STATE_FILE, latest_checkpoint

    candidates = []
    try:
        with open(os.path.join(model_dir, EXPORT_INFO_FILE), encoding="utf-8") as f:
            candidates.append(json.load(f).get("checkpoint"))
    except (OSError, ValueError):
        pass
    candidates.append(latest_checkpoint(output_dir))
    for checkpoint in candidates:
        try:
            with open(os.path.join(checkpoint, TRAINER_STATE_FILE), encoding="utf-8") as f:
                run_id = json.load(f).get("wandb_run_id")
        except (OSError, TypeError, ValueError):
            continue
        if run_id:
            return run_id
    return None


def log_eval_to_wandb(recipe: Recipe, model_dir: str, results: dict[str, Any], step: int | None) -> str | None:
    """Send ``crlft eval`` results to the training's wandb run (continued by its id; a new run when there is none).

    The accuracies go into the run's summary and, with ``eval/step`` (the export's step), into its history.

    Returns:
        The wandb run id, or None when wandb is off in the recipe.
    """
    run, run_id = start_wandb(recipe, training_wandb_run_id(recipe.train.output_dir, model_dir))
    if run is None:
        return None
    flat = eval_metrics(results)
    run.log({**flat, **({"eval/step": step} if step is not None else {})})
    run.summary.update(flat)
    run.finish()
    return run_id


class RunLog:
    """Where a step's numbers go on rank 0: ``metrics.jsonl`` and wandb (every step), the progress bar, and a printed
    line every ``log_every`` steps. Other ranks hold a disabled one.

    Args:
        path: the ``metrics.jsonl`` file (appended to).
        total_steps: steps the run will do in all (for the bar and the ETA).
        done_steps: steps already done (resumed runs).
        log_every: print a line every this many steps (the file and wandb get every step).
        wandb_run: a wandb run, or None.
        enabled: False on ranks other than 0.
    """

    def __init__(self, path: str, total_steps: int, done_steps: int, log_every: int, wandb_run: Any, enabled: bool):
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
        # The losses at full precision (eval_loss is compared with recomputations); the rest to 6 digits.
        self.file.write(json.dumps({k: v if k in _FULL_PRECISION else _round(v) for k, v in record.items()}) + "\n")
        self.file.flush()
        step = record["step"]
        if self.wandb_run is not None:  # every step; log_every only thins the printed lines
            # Numbers only: the eval split's id (a string) stays in metrics.jsonl.
            self.wandb_run.log({k: v for k, v in record.items() if k != "step" and not isinstance(v, str)},
                               step=step)
        self.bar.update(1)
        self.bar.set_postfix(epoch=f"{record['epoch']:.2f}", loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                             tok_s=f"{record['tokens_per_s']:.0f}", refresh=False)
        if step % self.log_every == 0 or step == self.total_steps or "eval_loss" in record:
            seconds_per_step = (time.perf_counter() - self.started) / max(step - self.first_step, 1)
            eta = self.bar.format_interval(seconds_per_step * max(self.total_steps - step, 0))
            per_condition = ", ".join(f"{k[5:]} {v:.4f}" for k, v in record.items() if k.startswith("loss/"))
            self.bar.write(
                f"step {step}/{self.total_steps} epoch {record['epoch']:.2f} loss {record['loss']:.4f} "
                + (f"({per_condition}) " if per_condition else "")
                + (f"eval_loss {record['eval_loss']:.4f} " if "eval_loss" in record else "")
                + f"acc {record['weighted_accuracy']:.3f} lr {record['lr']:.3e} {record['tokens_per_s']:.0f} tok/s "
                f"eta {eta}", file=sys.stderr)

    def close(self, final_loss: float) -> None:
        """Close the file, the bar and the wandb run."""
        self.bar.close()
        if self.file is not None:
            self.file.close()
        if self.wandb_run is not None:
            self.wandb_run.summary["final_loss"] = final_loss
            self.wandb_run.finish()


__all__ = ["METRICS_FILE", "RunLog", "eval_metrics", "log_eval_to_wandb", "start_wandb", "training_wandb_run_id",
           "truncate_metrics"]
