"""wandb gets every step (``log_every`` only thins the printed lines) and ``crlft eval``'s results."""

import json
import os

from crlft import checkpoint as ckpt
from crlft import runlog
from crlft.recipe import recipe_from_dict


class FakeWandbRun:
    """What crlft calls on a wandb run, recorded."""

    def __init__(self):
        self.logged, self.summary, self.finished = [], {}, False

    def log(self, data, step=None):
        self.logged.append((step, dict(data)))

    def finish(self):
        self.finished = True


def test_every_step_goes_to_wandb_and_log_every_thins_only_the_printed_lines(tmp_path, capsys):
    run = FakeWandbRun()
    log = runlog.RunLog(str(tmp_path / "metrics.jsonl"), total_steps=7, done_steps=0, log_every=50, wandb_run=run,
                        enabled=True)
    for step in range(1, 8):
        log.step({"step": step, "epoch": step / 7, "loss": 1.0 / step, "lr": 1e-4, "num_tokens": 10,
                  "tokens_per_s": 100.0, "weighted_accuracy": 0.5})
    log.close(final_loss=1 / 7)
    assert [step for step, _ in run.logged] == list(range(1, 8))
    assert run.logged[2][1]["loss"] == 1 / 3 and "step" not in run.logged[2][1]
    printed = [line for line in capsys.readouterr().err.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in printed] == ["7/7"]  # the last step only
    assert run.finished and run.summary["final_loss"] == 1 / 7


def _recipe(tmp_path, wandb_mode="offline"):
    return recipe_from_dict({
        "model": {"base": "x", "max_context": 16},
        "data": {"output_dir": "d", "sources": [{"name": "s", "path": "s.jsonl"}]},
        "train": {"output_dir": str(tmp_path / "run"), "batch_max_len": 16},
        "logging": {"wandb": {"project": "p", "mode": wandb_mode}},
    })


def test_eval_results_go_to_the_trainings_wandb_run(tmp_path, monkeypatch):
    checkpoint = os.path.join(ckpt.checkpoints_dir(str(tmp_path / "run")), ckpt.step_dir_name(15))
    os.makedirs(checkpoint)
    ckpt.write_json(os.path.join(checkpoint, ckpt.TRAINER_STATE_FILE), {"step": 15, "wandb_run_id": "abc123"})
    export = tmp_path / "run" / "export" / "final"
    export.mkdir(parents=True)
    (export / ckpt.EXPORT_INFO_FILE).write_text(json.dumps({"checkpoint": checkpoint, "step": 15}))
    started = []
    fake = FakeWandbRun()
    monkeypatch.setattr(runlog, "start_wandb", lambda recipe, run_id: (started.append(run_id), (fake, run_id))[1])
    results = {"GPT4": {"accuracy": 0.9, "per_task": {"sort": 0.9}}, "": {"accuracy": 0.1, "per_task": {}}}
    assert runlog.log_eval_to_wandb(_recipe(tmp_path), str(export), results, step=15) == "abc123"
    assert started == ["abc123"]  # continued, not a new run
    assert fake.logged == [(None, {"eval/GPT4/accuracy": 0.9, "eval/GPT4/sort/accuracy": 0.9,
                                   "eval/none/accuracy": 0.1, "eval/step": 15})]
    assert fake.summary["eval/GPT4/accuracy"] == 0.9 and fake.finished
    # wandb off in the recipe: nothing started.
    monkeypatch.undo()
    assert runlog.log_eval_to_wandb(_recipe(tmp_path, "disabled"), str(export), results, step=15) is None
