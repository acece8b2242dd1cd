"""``crlft preflight``: a complete run is recognised before any rank starts, a refused resume is reported once."""

import json
import os

import pytest

from crlft import checkpoint as ckpt
from crlft import preflight
from crlft.cli import main as cli_main
from crlft.prepare import META_FILE
from crlft.recipe import recipe_from_dict


def _recipe(tmp_path, **train):
    return recipe_from_dict({
        "model": {"base": "x", "max_context": 16},
        "data": {"output_dir": str(tmp_path / "data"), "sources": [{"name": "s", "path": "s.jsonl"}]},
        "train": {"output_dir": str(tmp_path / "run"), "batch_max_len": 16, "lr": 1e-4, **train},
        "eval": {"prompts": str(tmp_path / "eval.jsonl")},
    })


def _write_run(tmp_path, step, total_steps, final_step, world_size=2):
    """A run directory as the trainer leaves it: a complete checkpoint and (maybe) export/final of ``final_step``."""
    recipe = _recipe(tmp_path)
    (tmp_path / "data").mkdir(parents=True, exist_ok=True)
    (tmp_path / "data" / META_FILE).write_text(json.dumps({"inputs": {"sources": []}}))
    fingerprint = ckpt.resume_fingerprint(recipe, ckpt.data_fingerprint(str(tmp_path / "data")), world_size)
    checkpoint = os.path.join(ckpt.checkpoints_dir(recipe.train.output_dir), ckpt.step_dir_name(step))
    os.makedirs(checkpoint)
    ckpt.write_json(os.path.join(checkpoint, ckpt.TRAINER_STATE_FILE), {
        "version": ckpt.TRAINER_STATE_VERSION, "step": step, "total_steps": total_steps, "fingerprint": fingerprint})
    ckpt.write_json(os.path.join(checkpoint, ckpt.COMPLETE_MARKER), {"step": step})
    if final_step is not None:
        final = os.path.join(recipe.train.output_dir, ckpt.EXPORT_DIR, "final")
        os.makedirs(final)
        ckpt.write_json(os.path.join(final, ckpt.EXPORT_INFO_FILE), {"step": final_step})
    return recipe


def test_a_complete_run_is_reported_and_nothing_is_started(tmp_path):
    recipe = _write_run(tmp_path, step=15, total_steps=15, final_step=15)
    lines = []
    assert preflight.preflight(recipe, 2, log=lines.append) == preflight.COMPLETE_EVAL_LEFT  # no eval.json yet
    assert "is complete: 15 of 15 steps done" in lines[0] and "export/final" in lines[0]
    eval_json = tmp_path / "run" / "eval.json"
    eval_json.write_text("{}")
    assert preflight.preflight(recipe, None, log=lines.append) == preflight.COMPLETE  # evaluated: nothing at all
    os.utime(eval_json, (1, 1))  # older than the final export: evaluate again
    assert preflight.preflight(recipe, 2, log=lines.append) == preflight.COMPLETE_EVAL_LEFT


def test_an_unfinished_run_or_a_missing_final_export_starts_the_ranks(tmp_path):
    recipe = _write_run(tmp_path, step=10, total_steps=15, final_step=None)
    lines = []
    assert preflight.preflight(recipe, 2, log=lines.append) == preflight.START
    assert lines == [f"resuming from {ckpt.latest_checkpoint(recipe.train.output_dir)} (step 10)"]
    done_but_not_exported = _write_run(tmp_path / "b", step=15, total_steps=15, final_step=10)
    assert preflight.preflight(done_but_not_exported, 2, log=lines.append) == preflight.START
    # stop_after_steps raised past the checkpoint's step: more to train; lowered to it: complete.
    stopped = _write_run(tmp_path / "c", step=5, total_steps=15, final_step=5)
    assert preflight.preflight(stopped, 2, log=lines.append) == preflight.START
    stopped.train.stop_after_steps = 5
    assert preflight.preflight(stopped, 2, log=lines.append) == preflight.COMPLETE_EVAL_LEFT


def test_a_refused_resume_is_reported_once_by_rank_0(tmp_path, capsys, monkeypatch):
    _write_run(tmp_path, step=10, total_steps=15, final_step=None)
    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(json.dumps({
        "model": {"base": "x", "max_context": 16},
        "data": {"output_dir": str(tmp_path / "data"), "sources": [{"name": "s", "path": "s.jsonl"}]},
        "train": {"output_dir": str(tmp_path / "run"), "batch_max_len": 16, "lr": 1e-4},
    }))
    assert cli_main(["preflight", str(recipe_path), "--num_gpus", "2"]) == 0
    capsys.readouterr()
    assert cli_main(["preflight", str(recipe_path), "--num_gpus", "4", "train.lr=2e-4"]) == 2
    err = capsys.readouterr().err
    assert err.count("crlft preflight: error:") == 1  # one report, every reason in it
    assert "written with 2 rows per step" in err and "this run has 4 (4 ranks × grad_accum 1)" in err
    assert "lr: checkpoint 0.0001, now 0.0002" in err
    # Without --num_gpus the rank count is left to the trainer; everything else is still checked.
    assert cli_main(["preflight", str(recipe_path), "--num_gpus", "2"]) == 0
    assert cli_main(["preflight", str(recipe_path)]) == 0
    # The same refusal inside the ranks: rank 0 prints it, the others only exit.
    for rank, printed in (("1", False), ("0", True)):
        monkeypatch.setenv("RANK", rank)
        assert cli_main(["preflight", str(recipe_path), "--num_gpus", "4"]) == 2
        assert ("cannot resume from" in capsys.readouterr().err) is printed


def test_debug_flag_shows_the_traceback(tmp_path, monkeypatch):
    monkeypatch.setenv("CRLFT_DEBUG", "")  # restored afterwards, whatever --debug sets
    assert cli_main(["plan", str(tmp_path / "missing.yaml")]) == 2
    with pytest.raises(Exception, match="recipe not found"):
        cli_main(["plan", str(tmp_path / "missing.yaml"), "--debug"])
    assert os.environ["CRLFT_DEBUG"] == "1"  # the ranks a launcher starts inherit it
