"""``train.max_steps`` is the run's length (the schedule spans it, as in HF Trainer); ``train.stop_after_steps`` only
stops early; ``crlft plan`` says what the trainer will do."""

import math
import os

import pytest
import torch
from helpers import REPO_ROOT

from crlft.recipe import recipe_from_dict
from crlft.run_length import few_steps_warning, run_length
from crlft.schedule import lr_scheduler_factory

OPENCHAT_RECIPE = os.path.join(REPO_ROOT, "recipes", "openchat_3.5.yaml")


def _train(**train):
    return recipe_from_dict({
        "model": {"base": "x", "max_context": 16},
        "data": {"output_dir": "d", "sources": [{"name": "s", "path": "s.jsonl"}]},
        "train": {"output_dir": "o", "batch_max_len": 16, "lr": 1e-3, "lr_warmup_ratio": 0.1, "lr_min_ratio": 0.1,
                  **train},
    }).train


def _lrs(length, peak=1e-3):
    """The learning rate of every step the run does, from the scheduler the trainer builds."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    scheduler = lr_scheduler_factory(length.schedule_steps, 0.1, 0.1)(optimizer)
    lrs = []
    for _ in range(length.stop_at):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def test_max_steps_sets_the_schedules_length():
    epochs_only = run_length(_train(epochs=2), lambda epoch: 10)
    assert (epochs_only.schedule_steps, epochs_only.stop_at, epochs_only.epochs) == (20, 20, 2)
    capped = run_length(_train(epochs=2, max_steps=10), lambda epoch: 10)
    assert (capped.schedule_steps, capped.stop_at, capped.epochs, capped.warmup_steps) == (10, 10, 1, 1)
    lrs = _lrs(capped)
    assert lrs[0] == pytest.approx(1e-3)  # warm-up of 1 step over 10, not 2 over 20
    assert lrs[-1] == pytest.approx(1e-4)  # decayed to lr · lr_min_ratio at step 10: the schedule ended
    # Without max_steps the schedule spans both epochs: step 10 is mid-decay (what max_steps=10 used to give).
    assert _lrs(epochs_only)[9] == pytest.approx(1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi * 7 / 17)))


def test_max_steps_beyond_the_epochs_runs_more_epochs():
    length = run_length(_train(epochs=1, max_steps=25), lambda epoch: [10, 9, 11][epoch])
    assert (length.epochs, length.steps_per_epoch, length.schedule_steps, length.stop_at) == (3, (10, 9, 11), 25, 25)


def test_stop_after_steps_stops_without_changing_the_schedule():
    full = run_length(_train(epochs=2), lambda epoch: 10)
    stopped = run_length(_train(epochs=2, stop_after_steps=10), lambda epoch: 10)
    assert (stopped.schedule_steps, stopped.stop_at, stopped.warmup_steps) == (20, 10, 2)
    assert _lrs(stopped) == _lrs(full)[:10]
    assert "stopping after 10 (train.stop_after_steps; the schedule is unchanged)" in stopped.describe()
    assert run_length(_train(epochs=2, stop_after_steps=50), lambda epoch: 10).stop_at == 20


def test_few_steps_per_epoch_warns():
    assert few_steps_warning(run_length(_train(epochs=3), lambda epoch: 1)).startswith("only 1 optimizer step(s)")
    assert few_steps_warning(run_length(_train(epochs=3), lambda epoch: 10)) is None


def test_plan_reports_the_trainers_numbers(tmp_path, monkeypatch, capsys):
    """`crlft plan` on prepared data: the schedule's span and the stop come from the same `run_length`."""
    import datasets

    import crlft.plan
    from crlft.cli import plan_main
    from crlft.loader import PackedLoader

    lengths = [40 + (7 * i) % 60 for i in range(120)]
    ds = datasets.Dataset.from_dict({
        "input_ids": [list(range(n)) for n in lengths],
        "loss_weights": [[0.0] * (n // 2) + [1.0] * (n - n // 2) for n in lengths],
        "length": lengths,
        "condition": ["GPT4 Correct"] * len(lengths),
    })
    monkeypatch.setattr(crlft.plan, "load_prepared", lambda recipe, check=True: ds)
    config_dir = tmp_path / "base"
    config_dir.mkdir()
    (config_dir / "config.json").write_text('{"model_type": "mistral", "hidden_size": 32, "intermediate_size": 64, '
                                           '"num_hidden_layers": 1, "num_attention_heads": 4, "vocab_size": 100}')
    loader = PackedLoader(ds, max_tokens=256, num_ranks=2, seed=42, num_epochs=3)
    per_epoch = loader.total_steps() // 3
    overrides = [f"model.base={config_dir}", "model.max_context=128", "train.batch_max_len=256", "train.epochs=3",
                 "train.grad_accum=1", "train.lr=1e-3", "train.lr_warmup_ratio=0.1", f"train.max_steps={per_epoch}",
                 "train.stop_after_steps=3",
                 "--num_gpus", "2"]
    assert plan_main([OPENCHAT_RECIPE, *overrides]) == 0
    out = capsys.readouterr().out
    expected = run_length(_train(epochs=3, max_steps=per_epoch, stop_after_steps=3), loader.steps_per_epoch)
    assert f"total steps: 3 over {expected.epochs} epoch(s) (train.max_steps={per_epoch}); the learning-rate " \
           f"schedule spans {per_epoch} steps, {expected.warmup_steps} of them warm-up (train.stop_after_steps" in out
    assert "capped by" not in out


@pytest.mark.parametrize("export_every_epoch", [True, False])
def test_epoch_exports_follow_export_every_epoch(export_every_epoch, monkeypatch):
    """An epoch end always checkpoints; it exports only with train.export_every_epoch (export/final always comes)."""
    from types import SimpleNamespace

    from crlft import trainer

    saved, exported = [], []
    monkeypatch.setattr(trainer.ckpt, "save_checkpoint", lambda engine, out, step, *a, **k: saved.append(step) or
                        f"step_{step}")
    monkeypatch.setattr(trainer, "_export", lambda run, checkpoint, name, copy_of=None: exported.append(name) or name)
    monkeypatch.setattr(trainer, "_trainer_state", lambda run, epoch_progress: {})
    monkeypatch.setattr(trainer, "check_state_finite", lambda *a, **k: None)  # no engine here (crlft.guard)
    recipe = SimpleNamespace(train=_train(epochs=2, export_every_epoch=export_every_epoch),
                             model=SimpleNamespace(lora=None))
    run = SimpleNamespace(recipe=recipe, progress=trainer.Progress(), engine=None, model=None, tokenizer=None,
                          template=None, dist=SimpleNamespace(rank=0), planned_steps=4,
                          reached_stop=lambda: run.progress.step >= 4)
    for index in range(4):
        run.progress.step = index + 1
        step = SimpleNamespace(step_in_epoch=index % 2, steps_per_epoch=2, epoch=index // 2)
        trainer.checkpoint_and_export(run, step)
    assert saved == [2, 4]
    assert exported == (["epoch_1", "epoch_2"] if export_every_epoch else [])
