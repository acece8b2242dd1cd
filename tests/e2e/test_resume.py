"""A run killed with SIGKILL after a checkpoint and relaunched with ``train.resume=auto`` logs the same losses as the
uninterrupted run (conftest's ``zero2_e2e_run``: ZeRO-2, 2 ranks, 15 steps, checkpoints every 4 steps and at each
epoch end), and ends with the same weights. A recipe changed in ways that matter is refused.

The kill comes from outside, like a machine dying: the test watches ``metrics.jsonl`` and SIGKILLs the launcher and
both ranks as soon as step 9 is logged, one step after the checkpoint of step 8. Before relaunching, the debris of
a crash *during* a later save is added (a ``.tmp`` directory and one without ``COMPLETE``): both must be ignored.
"""

import os

import pytest
from helpers import (
    E2E_EVAL_STEPS,
    load_safetensors_dir,
    read_metrics,
    refusal_of_train_in_process,
    run_deepspeed,
    run_deepspeed_killed_after_step,
)

pytestmark = pytest.mark.slow

KILL_AFTER_STEP = 9
CHECKPOINT_BEFORE_KILL = 8


@pytest.fixture(scope="module")
def resumed(zero2_e2e_run, tmp_path_factory):
    """The killed run, its state at the kill, then the relaunch; same recipe and data as the reference run."""
    from crlft.checkpoint import list_checkpoints

    out = str(tmp_path_factory.mktemp("resume") / "run")
    overrides = (f"train.output_dir={out}",)
    returncode = run_deepspeed_killed_after_step(zero2_e2e_run["recipe"], overrides, out, KILL_AFTER_STEP)
    at_kill = {"returncode": returncode, "metrics": read_metrics(out),
               "checkpoints": [s for s, _ in list_checkpoints(out)]}
    # What a crash in the middle of later saves leaves behind.
    root = os.path.join(out, "checkpoints")
    os.makedirs(os.path.join(root, "step_00000012.tmp"))
    os.makedirs(os.path.join(root, "step_00000011"))
    with open(os.path.join(root, "step_00000011", "trainer_state.json"), "w") as f:
        f.write("{")
    relaunched = run_deepspeed(zero2_e2e_run["recipe"], (*overrides, "train.resume=auto"))
    return {"dir": out, "at_kill": at_kill, "log": relaunched.stdout + relaunched.stderr}


def test_the_first_run_died_after_the_checkpoint(resumed):
    at_kill = resumed["at_kill"]
    assert at_kill["returncode"] != 0
    assert [m["step"] for m in at_kill["metrics"]] == list(range(1, KILL_AFTER_STEP + 1))
    assert at_kill["checkpoints"][-1] == CHECKPOINT_BEFORE_KILL


def test_relaunch_continues_from_the_newest_complete_checkpoint(resumed):
    assert f"resumed from {os.path.join(resumed['dir'], 'checkpoints', 'step_00000008')}" in resumed["log"]
    assert "dropped 1 line(s) logged after the checkpoint" in resumed["log"]


def test_resumed_run_logs_the_same_losses_as_the_uninterrupted_run(resumed, zero2_e2e_run):
    reference = read_metrics(zero2_e2e_run["dir"])
    metrics = read_metrics(resumed["dir"])
    assert [m["step"] for m in metrics] == [m["step"] for m in reference]  # one line per step, none twice
    for ours, theirs in zip(metrics, reference):
        assert ours["loss"] == pytest.approx(theirs["loss"], abs=1e-6), ours["step"]
        assert ours["lr"] == pytest.approx(theirs["lr"], rel=1e-9)
        assert ours["num_tokens"] == theirs["num_tokens"]  # the same batches
        assert ours["epoch"] == theirs["epoch"]


def test_resumed_run_logs_the_same_eval_records(resumed, zero2_e2e_run):
    """Evaluations after steps 4, 5 and 8 come from the killed run, after 10, 12 and 15 from the relaunch."""
    reference = [m for m in read_metrics(zero2_e2e_run["dir"]) if "eval_loss" in m]
    metrics = [m for m in read_metrics(resumed["dir"]) if "eval_loss" in m]
    assert [m["step"] for m in metrics] == [m["step"] for m in reference] == E2E_EVAL_STEPS
    for ours, theirs in zip(metrics, reference):
        assert ours["eval_split"] == theirs["eval_split"]
        for key in ("eval_loss", "eval_loss/GPT4 Correct", "eval_loss/GPT3", "eval_accuracy"):
            assert ours[key] == pytest.approx(theirs[key], abs=1e-6), (ours["step"], key)
        assert ours["eval_tokens"] == theirs["eval_tokens"]


def test_resumed_run_ends_with_the_same_weights(resumed, zero2_e2e_run):
    ours = load_safetensors_dir(os.path.join(resumed["dir"], "export", "final"))
    theirs = load_safetensors_dir(os.path.join(zero2_e2e_run["dir"], "export", "final"))
    assert max((ours[k] - theirs[k]).abs().max().item() for k in theirs) <= 1e-6
    assert sorted(os.listdir(os.path.join(resumed["dir"], "export"))) == ["epoch_1", "epoch_2", "epoch_3", "final"]


def test_resume_with_a_changed_batch_size_is_refused(resumed, zero2_e2e_run, monkeypatch):
    """In this process (world of one): the refusal comes before any model is loaded."""
    from crlft.recipe import load_recipe

    # grad_accum 2 on one rank keeps the checkpoint's 2 rows per step (another number is refused first, test_reshard).
    recipe = load_recipe(zero2_e2e_run["recipe"], [f"train.output_dir={resumed['dir']}", "train.batch_max_len=512",
                                                   "train.grad_accum=2"])
    message = refusal_of_train_in_process(recipe, monkeypatch)
    assert "cannot resume from" in message and "step_00000015" in message
    assert "batch_max_len: checkpoint 256, now 512" in message
    assert "rows_per_step" not in message  # 1 rank x 2 = 2 ranks x 1: free to change
