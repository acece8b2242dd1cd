"""The held-out split and the evaluation schedule, without data or models: which conversations are held out, the
recipe rules of ``data.eval_*``, what the resume fingerprint sees of them, when a run evaluates, the logged numbers."""

import json
import logging

import numpy as np
import pytest
import torch

from crlft import checkpoint as ckpt
from crlft import runlog
from crlft.errors import UserError
from crlft.evaluation import check_split_on_resume, eval_metrics, evaluation_steps
from crlft.metrics import SUM_FIELDS
from crlft.recipe import recipe_from_dict
from crlft.split import held_out_mask, num_held_out


def test_how_many_are_held_out():
    assert num_held_out(1000, 0.005) == 5
    assert num_held_out(100, 0.005) == 1  # at least one per source ...
    assert num_held_out(2, 0.001) == 1
    assert num_held_out(1, 0.5) == 0  # ... that has two to give
    assert num_held_out(3, 0.9) == 2  # never all: one is left to train on
    assert num_held_out(1000, 0.0) == 0


def test_held_out_choice_is_seeded_per_source_and_stable():
    indices = np.arange(2000)
    chosen = np.flatnonzero(held_out_mask(indices, 0.01, 0, "gpt4"))
    assert len(chosen) == 20
    assert np.array_equal(chosen, np.flatnonzero(held_out_mask(indices, 0.01, 0, "gpt4")))  # deterministic
    assert len(set(chosen) & set(np.flatnonzero(held_out_mask(indices, 0.01, 0, "gpt3")))) <= 2  # per source
    assert len(set(chosen) & set(np.flatnonzero(held_out_mask(indices, 0.01, 1, "gpt4")))) <= 2  # per seed
    # By record index, not by position: shuffled rows hold out the same records ...
    order = np.random.default_rng(0).permutation(2000)
    assert set(order[held_out_mask(order, 0.01, 0, "gpt4")]) == set(chosen)
    # ... and a source with a few records more or less keeps most of its choice.
    grown = np.flatnonzero(held_out_mask(np.arange(2100), 0.01, 0, "gpt4"))
    assert len(set(chosen) & set(grown)) >= 15


def recipe(**data):
    return recipe_from_dict({
        "model": {"base": "x", "max_context": 16},
        "data": {"output_dir": "d", "sources": [{"name": "s", "path": "s.jsonl"}], **data},
        "train": {"output_dir": "o", "batch_max_len": 16},
    })


def test_recipe_rules_of_the_eval_keys():
    assert recipe(eval_fraction=0.005, eval_sources=[{"name": "v", "path": "v.jsonl"}]).data.eval_fraction == 0.005
    with pytest.raises(UserError) as error:
        recipe(eval_fraction=1.0, eval_sources=[{"name": "s", "path": "v.jsonl"}, {"name": "w", "path": "s.jsonl",
                                                                                   "repeat": 2}])
    message = str(error.value)
    assert "data.eval_fraction: must be in [0, 1)" in message
    assert "data.eval_sources.0.name: 's' is also a training source's name" in message
    assert "data.eval_sources.1.path: 's.jsonl' is also a training source" in message
    assert "data.eval_sources.1.repeat: must be 1" in message
    with pytest.raises(UserError, match="train.eval_every_steps: must be ≥ 0"):
        recipe_from_dict({"model": {"base": "x", "max_context": 16},
                          "data": {"output_dir": "d", "sources": [{"name": "s", "path": "s.jsonl"}]},
                          "train": {"output_dir": "o", "batch_max_len": 16, "eval_every_steps": -1}})


def write_meta(tmp_path, name, inputs):
    directory = tmp_path / name
    directory.mkdir()
    (directory / "crlft_meta.json").write_text(json.dumps({"inputs": inputs}))
    return str(directory)


def test_resume_fingerprint_sees_what_chooses_the_training_rows_only(tmp_path):
    base = {"template": "openchat_3.5", "sources": [{"name": "s", "file": {"hash": "a"}}]}
    files = [{"name": "v", "file": {"hash": "b"}}]
    fingerprint = {
        name: ckpt.data_fingerprint(write_meta(tmp_path, name, inputs)) for name, inputs in {
            "no_split": base,
            "held_out_files": {**base, "eval": {"fraction": 0.0, "seed": 0, "sources": files}},
            "other_files": {**base, "eval": {"fraction": 0.0, "seed": 0, "sources": [{"name": "w"}]}},
            "fraction": {**base, "eval": {"fraction": 0.1, "seed": 0, "sources": files}},
            "fraction_other_files": {**base, "eval": {"fraction": 0.1, "seed": 0, "sources": []}},
            "fraction_other_seed": {**base, "eval": {"fraction": 0.1, "seed": 1, "sources": []}},
        }.items()
    }
    # Held-out files change only the eval split: a run may resume with them added, changed or removed.
    assert fingerprint["no_split"] == fingerprint["held_out_files"] == fingerprint["other_files"]
    assert fingerprint["fraction"] == fingerprint["fraction_other_files"]
    # The fraction and its seed take rows away from training: resuming across them is refused.
    assert len({fingerprint["no_split"], fingerprint["fraction"], fingerprint["fraction_other_seed"]}) == 3


def test_evaluation_steps():
    assert evaluation_steps([5, 5, 5], 15, 4) == [4, 5, 8, 10, 12, 15]
    assert evaluation_steps([5, 5, 5], 15, None) == [5, 10, 15]
    assert evaluation_steps([5, 5, 5], 7, None) == [5, 7]  # max_steps: the last step too
    assert evaluation_steps([5, 5, 5], 15, 0) == []


def test_eval_metrics_are_weighted_means_over_the_split():
    field = {name: i for i, name in enumerate(SUM_FIELDS)}
    sums = torch.zeros(2, len(SUM_FIELDS), dtype=torch.float64)
    # condition A: Σ w·CE 6, Σ w 3, 3 tokens, 2 weighted correct; condition "" : Σ w·CE 0.4, Σ w 0.2, 2 tokens
    for row, values in ((0, (6.0, 3.0, 3, 2.0)), (1, (0.4, 0.2, 2, 0.1))):
        for name, value in zip(("weighted_ce_sum", "weight_sum", "num_tokens", "weighted_correct"), values):
            sums[row, field[name]] = value
    metrics = eval_metrics(sums, ["A", ""])
    assert metrics["eval_loss"] == pytest.approx(6.4 / 3.2)
    assert metrics["eval_accuracy"] == pytest.approx(2.1 / 3.2)
    assert metrics["eval_loss/A"] == pytest.approx(2.0) and metrics["eval_loss/<none>"] == pytest.approx(2.0)
    assert metrics["eval_tokens"] == 5 and metrics["eval_tokens/A"] == 3


def test_a_changed_eval_split_is_named_on_resume(caplog):
    class Split:
        split = "new-8"

    with caplog.at_level(logging.WARNING, logger="crlft.evaluation"):
        check_split_on_resume("new-8", Split(), "ckpt")
        assert not caplog.records
        check_split_on_resume("old-8", Split(), "ckpt")
    assert "the eval split changed since ckpt (it evaluated old-8, now new-8)" in caplog.text


def test_run_log_keeps_eval_loss_exact_and_prints_it(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    log = runlog.RunLog(str(path), total_steps=4, done_steps=0, log_every=4, wandb_run=None, enabled=True)
    record = {"step": 1, "epoch": 0.25, "loss": 2.0, "lr": 1e-4, "num_tokens": 10, "tokens_per_s": 1.0,
              "weighted_accuracy": 0.5}
    log.step(record)
    log.step({**record, "step": 2, "eval_loss": 1.0 / 3, "eval_split": "abc-3"})
    log.close(0.0)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert records[1]["eval_loss"] == 1.0 / 3 and records[1]["eval_split"] == "abc-3"
    printed = [line for line in capsys.readouterr().err.splitlines() if line.startswith("step ")]
    assert len(printed) == 1 and "eval_loss 0.3333" in printed[0]  # printed at its step, not only every log_every
