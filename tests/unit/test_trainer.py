"""Unit tests of the trainer's parts that need no DeepSpeed run: schedule, optimizer, metrics file, checkpoint
discovery and resume checks, the entry point's argument handling."""

import json
import math
import os

import pytest
import torch

from crlft import checkpoint as ckpt
from crlft import manifest, runlog, schedule, trainer
from crlft.errors import UserError

# --------------------------------------------------------------------------------------------------------------
# Schedule
# --------------------------------------------------------------------------------------------------------------


def test_warmup_is_linear_and_reaches_the_peak():
    total, warmup = 100, 10
    factors = [schedule.lr_factor(i, total, warmup, 0.1) for i in range(warmup)]
    assert factors == pytest.approx([(i + 1) / warmup for i in range(warmup)])
    assert schedule.lr_factor(warmup, total, warmup, 0.1) == pytest.approx(1.0)  # the cosine starts at the peak


def test_cosine_decays_monotonically_to_the_min_ratio_at_the_last_step():
    total, warmup, min_ratio = 50, 5, 0.1
    decay = [schedule.lr_factor(i, total, warmup, min_ratio) for i in range(warmup, total)]
    assert all(a >= b for a, b in zip(decay, decay[1:]))
    assert decay[-1] == pytest.approx(min_ratio)
    middle = warmup + (total - warmup - 1) / 2
    assert schedule.lr_factor(int(middle), total, warmup, min_ratio) == pytest.approx(
        min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * (int(middle) - warmup) / (total - warmup - 1)))
    )


def test_warmup_steps_from_ratio():
    assert schedule.num_warmup_steps(100, 0.05) == 5
    assert schedule.num_warmup_steps(15, 0.1) == 2  # ceil(1.5)
    assert schedule.num_warmup_steps(10, 0.0) == 0
    assert schedule.num_warmup_steps(1, 0.5) == 0  # a single step runs at the peak


def test_single_step_schedule_uses_the_peak():
    assert schedule.lr_factor(0, 1, schedule.num_warmup_steps(1, 0.05), 0.1) == 1.0


def test_scheduler_factory_drives_the_optimizer_lr():
    param = torch.nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.AdamW([param], lr=1e-3)
    scheduler = schedule.lr_scheduler_factory(total_steps=20, warmup_ratio=0.1, min_ratio=0.1)(optimizer)
    seen = []
    for _ in range(20):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen[0] == pytest.approx(1e-3 / 2)
    assert seen[1] == pytest.approx(1e-3)
    assert seen[-1] == pytest.approx(1e-4)
    # the scheduler's state is what DeepSpeed checkpoints: a restored one continues where it was
    restored = schedule.lr_scheduler_factory(20, 0.1, 0.1)(torch.optim.AdamW([param], lr=1e-3))
    restored.load_state_dict(scheduler.state_dict())
    assert restored.last_epoch == 20


def test_optimizer_is_adamw_with_the_recipe_settings():
    from crlft.recipe import recipe_from_dict

    recipe = recipe_from_dict({
        "model": {"base": "x", "max_context": 16},
        "data": {"output_dir": "d", "sources": [{"name": "s", "path": "s.jsonl"}]},
        "train": {"output_dir": "o", "batch_max_len": 16, "lr": 1e-4, "betas": [0.8, 0.9], "eps": 1e-7,
                  "weight_decay": 0.05},
    })
    model = torch.nn.Linear(4, 4)
    optimizer = schedule.build_optimizer(model, recipe, 3e-4, torch.device("cpu"))
    assert type(optimizer) is torch.optim.AdamW
    group = optimizer.param_groups[0]
    assert (group["lr"], group["betas"], group["eps"], group["weight_decay"]) == (3e-4, (0.8, 0.9), 1e-7, 0.05)
    assert len(group["params"]) == 2  # weight decay on every parameter, as OpenChat


# --------------------------------------------------------------------------------------------------------------
# metrics.jsonl
# --------------------------------------------------------------------------------------------------------------


def test_truncate_metrics_keeps_steps_up_to_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "loss": 1.0 / s}) for s in range(1, 7)]
    path.write_text("\n".join(lines) + "\n" + '{"step": 7, "lo')  # the last line was cut by a crash
    assert runlog.truncate_metrics(str(path), 4) == 3
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3, 4]
    assert runlog.truncate_metrics(str(path), 0) == 4
    assert path.read_text() == ""
    assert runlog.truncate_metrics(str(tmp_path / "absent.jsonl"), 3) == 0


def test_run_log_writes_every_step_and_prints_every_log_every(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    log = runlog.RunLog(str(path), total_steps=4, done_steps=0, log_every=2, wandb_run=None, enabled=True)
    for step in range(1, 5):
        log.step({"step": step, "epoch": step / 4, "loss": 1.0 / 3 + step, "lr": 1e-4, "num_tokens": 10,
                  "tokens_per_s": 123.456789, "weighted_accuracy": 0.5, "loss/GPT4 Correct": 0.123456789})
    log.close(final_loss=0.1)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert records[0]["loss"] == 1.0 / 3 + 1  # the loss at full precision
    assert records[0]["loss/GPT4 Correct"] == 0.123457  # the rest to 6 significant digits
    printed = [line for line in capsys.readouterr().err.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in printed] == ["2/4", "4/4"]
    assert "eta" in printed[0] and "tok/s" in printed[0]
    assert "(GPT4 Correct 0.1235)" in printed[0]  # the loss per condition
    silent = runlog.RunLog(str(tmp_path / "other.jsonl"), 4, 0, 1, None, enabled=False)
    silent.step({"step": 1})
    silent.close(0.0)
    assert not (tmp_path / "other.jsonl").exists()


# --------------------------------------------------------------------------------------------------------------
# Checkpoint discovery and resume
# --------------------------------------------------------------------------------------------------------------


def _fake_checkpoint(output_dir, step, complete=True, suffix=""):
    path = os.path.join(ckpt.checkpoints_dir(str(output_dir)), ckpt.step_dir_name(step) + suffix)
    os.makedirs(path)
    with open(os.path.join(path, ckpt.TRAINER_STATE_FILE), "w") as f:
        json.dump({"version": ckpt.TRAINER_STATE_VERSION, "step": step, "fingerprint": {}}, f)
    if complete:
        ckpt.write_json(os.path.join(path, ckpt.COMPLETE_MARKER), {"step": step, **manifest.build_manifest(path)})
    return path


def test_latest_checkpoint_skips_incomplete_and_temporary_directories(tmp_path):
    assert ckpt.latest_checkpoint(str(tmp_path)) is None
    _fake_checkpoint(tmp_path, 4)
    good = _fake_checkpoint(tmp_path, 8)
    _fake_checkpoint(tmp_path, 12, complete=False)  # crashed before COMPLETE
    _fake_checkpoint(tmp_path, 16, suffix=".tmp")  # crashed before the rename
    os.makedirs(os.path.join(ckpt.checkpoints_dir(str(tmp_path)), "step_00000099_junk"))
    assert [s for s, _ in ckpt.list_checkpoints(str(tmp_path))] == [4, 8]
    assert ckpt.latest_checkpoint(str(tmp_path)) == good
    assert ckpt.resolve_resume("auto", str(tmp_path)) == good


class _FakeEngine:
    """Writes what DeepSpeed's save_checkpoint writes on one rank (a shard file in save_dir/tag)."""

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        assert not save_latest  # our COMPLETE marker, not DeepSpeed's `latest` file, says what is resumable
        os.makedirs(os.path.join(save_dir, tag), exist_ok=True)
        open(os.path.join(save_dir, tag, "mp_rank_00_model_states.pt"), "w").close()


def test_save_checkpoint_renames_marks_and_keeps_the_last(tmp_path):
    out = str(tmp_path)
    stale = os.path.join(ckpt.checkpoints_dir(out), "step_00000003.tmp")
    os.makedirs(stale)
    open(os.path.join(stale, "half_written"), "w").close()  # a crash during an earlier save of step 3
    for step in (1, 2, 3):
        path = ckpt.save_checkpoint(_FakeEngine(), out, step, {"step": step}, hf_files=os.makedirs, keep_last=2,
                                    rank=0, barrier=lambda: None)
    assert path == os.path.join(ckpt.checkpoints_dir(out), "step_00000003")
    assert sorted(os.listdir(ckpt.checkpoints_dir(out))) == ["step_00000002", "step_00000003"]
    assert sorted(os.listdir(path)) == ["COMPLETE", "hf", "mp_rank_00_model_states.pt", "rng_state_rank0.json",
                                        "trainer_state.json"]
    assert ckpt.read_trainer_state(path) == {"version": ckpt.TRAINER_STATE_VERSION, "step": 3}


def test_resolve_resume_off_and_paths(tmp_path):
    assert ckpt.resolve_resume("off", str(tmp_path / "fresh")) is None
    path = _fake_checkpoint(tmp_path, 3)
    assert ckpt.resolve_resume(path, str(tmp_path)) == path
    with pytest.raises(UserError, match="already holds 1 checkpoint"):
        ckpt.resolve_resume("off", str(tmp_path))
    with pytest.raises(UserError, match="not found"):
        ckpt.resolve_resume(str(tmp_path / "nope"), str(tmp_path))
    incomplete = _fake_checkpoint(tmp_path, 5, complete=False)
    with pytest.raises(UserError, match="not a complete crlft checkpoint"):
        ckpt.resolve_resume(incomplete, str(tmp_path))
    _fake_checkpoint(tmp_path, 6)
    with pytest.raises(UserError, match="not the newest checkpoint"):  # would mix two timelines in one run dir
        ckpt.resolve_resume(path, str(tmp_path))
    other_run = _fake_checkpoint(tmp_path / "other", 9)
    assert ckpt.resolve_resume(other_run, str(tmp_path / "new_run")) == other_run


def test_resume_refused_with_every_changed_field_named():
    saved = {"data": "abc", "batch_max_len": 4096, "grad_accum": 2, "world_size": 8, "seed": 42}
    ckpt.check_resume_fingerprint(saved, dict(saved), "ckpt")  # unchanged: fine
    changed = dict(saved, data="def", batch_max_len=8192)
    with pytest.raises(UserError) as error:
        ckpt.check_resume_fingerprint(saved, changed, "run/checkpoints/step_00000010")
    message = str(error.value)
    assert "run/checkpoints/step_00000010" in message
    assert "batch_max_len: checkpoint 4096, now 8192" in message
    assert "data: checkpoint 'abc', now 'def'" in message
    assert "grad_accum" not in message


def test_resume_fingerprint_ignores_settings_free_to_change(tmp_path):
    from crlft.recipe import recipe_from_dict

    def recipe(**train):
        return recipe_from_dict({
            "model": {"base": "x", "max_context": 16},
            "data": {"output_dir": "d", "sources": [{"name": "s", "path": "s.jsonl"}]},
            "train": {"output_dir": "o", "batch_max_len": 16, "lr": 1e-4, **train},
        })

    base = ckpt.resume_fingerprint(recipe(), "h", 2)
    free = recipe(stop_after_steps=5, save_every_steps=3, keep_last=4, export_every_epoch=False)
    assert ckpt.resume_fingerprint(free, "h", 2) == base
    assert ckpt.resume_fingerprint(recipe(max_steps=5), "h", 2) != base  # the schedule's length
    assert ckpt.resume_fingerprint(recipe(batch_max_len=32), "h", 2) != base
    assert ckpt.resume_fingerprint(recipe(), "h", 4) != base
    assert ckpt.resume_fingerprint(recipe(), "other data", 2) != base


def test_data_fingerprint_ignores_mtime_and_version(tmp_path):
    from crlft.prepare import META_FILE

    def write(mtime, version, size):
        meta = {"inputs": {"crlft_version": version, "template": "t",
                           "sources": [{"name": "s", "file": {"size": size, "mtime_ns": mtime, "hash": "h"}}]}}
        (tmp_path / META_FILE).write_text(json.dumps(meta))
        return ckpt.data_fingerprint(str(tmp_path))

    first = write(1, "0.1.0", 10)
    assert write(2, "0.2.0", 10) == first
    assert write(1, "0.1.0", 11) != first


def test_rng_state_round_trip():
    state = ckpt.rng_state()
    expected = (torch.rand(3), __import__("random").random())
    ckpt.set_rng_state(state)
    assert torch.equal(torch.rand(3), expected[0])
    assert __import__("random").random() == expected[1]


def test_auto_lr_follows_openchats_rule_and_says_how(caplog):
    import datasets

    from crlft.recipe import recipe_from_dict

    recipe = recipe_from_dict({
        "model": {"base": "x", "max_context": 1024},
        "data": {"output_dir": "d", "sources": [{"name": "s", "path": "s.jsonl"}]},
        "train": {"output_dir": "o", "batch_max_len": 4096, "lr": "auto", "grad_accum": 2},
    })
    # 8 tokens, of which 4 are supervised targets (the first token of a row never is): ratio 0.5
    dataset = datasets.Dataset.from_dict({"loss_weights": [[0.0, 0.0, 1.0, 1.0], [1.0, 0.0, 0.5, 0.5]]})
    with caplog.at_level("INFO", logger="crlft.trainer"):
        lr = trainer._peak_lr(recipe, dataset, world_size=8, model_type="mistral")
    tokens_per_step = 4096 * 8 * 2 * 0.5
    assert lr == pytest.approx(3e-4 / 6 * math.sqrt(tokens_per_step / 4e6))
    assert "32,768 supervised tokens per step" in caplog.text


# --------------------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------------------


def test_train_entry_drops_the_launchers_local_rank(monkeypatch, tmp_path):
    from crlft import cli as entry

    seen = {}
    monkeypatch.setattr("crlft.cli.load_recipe", lambda path, overrides: seen.update(path=path, ov=overrides))
    monkeypatch.setattr("crlft.trainer.train", lambda recipe: seen.update(trained=True))
    assert entry.train_main(["--local_rank=1", "r.yaml", "train.lr=1e-5"]) == 0
    assert seen == {"path": "r.yaml", "ov": ["train.lr=1e-5"], "trained": True}
    seen.clear()
    assert entry.train_main(["--local_rank", "0", "r.yaml"]) == 0
    assert seen["path"] == "r.yaml" and seen["ov"] == []


def test_cli_reports_a_missing_recipe_without_traceback(capsys):
    from crlft.cli import main

    assert main(["train", "/nonexistent/recipe.yaml"]) == 2
    assert "recipe not found" in capsys.readouterr().err
