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
            if self.wandb_run is not None:
                # Numbers only: the eval split's id (a string) stays in metrics.jsonl.
                self.wandb_run.log({k: v for k, v in record.items() if k != "step" and not isinstance(v, str)},
                                   step=step)

    def close(self, final_loss: float) -> None:
        """Close the file, the bar and the wandb run."""
        self.bar.close()
        if self.file is not None:
            self.file.close()
        if self.wandb_run is not None:
            self.wandb_run.summary["final_loss"] = final_loss
            self.wandb_run.finish()


__all__ = ["METRICS_FILE", "RunLog", "start_wandb", "truncate_metrics"]
