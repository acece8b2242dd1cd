"""Reliability end to end (2 CPU ranks, ZeRO-2, the tiny Mistral): a run never ends "successfully" with a broken
model, never deletes its last good checkpoint, and never runs code from a file it loads.

The damaged-checkpoint runs work on a copy of conftest's uninterrupted reference run (checkpoints of steps 12 and
15), so a resume from step 12 must reproduce the reference's losses of steps 13-15 and its final weights.

* optimizer moments of the newest checkpoint overwritten with NaN *and the manifest rewritten to match* (damage
  before the save, which no hash can see): the resumed run stops at load, naming the checkpoint, exit non-zero,
  nothing written or deleted;
* then a truncated shard in that checkpoint: skipped with a message (renamed ``.damaged``), the run resumes from
  step 12 and reproduces the uninterrupted losses and weights;
* a learning rate that makes the weights overflow: the run stops at the first non-finite step, naming it, exit
  non-zero; the checkpoint before it is still there and intact; ``train.lr=.inf`` is refused by the recipe's
  validation before any rank starts;
* a pickle payload in a real DeepSpeed shard (manifest rewritten to match): refused by ``crlft train`` and
  ``crlft export`` without running it.
"""

import builtins
import os
import shutil
import zipfile

import pytest
import torch
from helpers import (
    load_safetensors_dir,
    prepare_recipe,
    read_metrics,
    run_deepspeed,
    start_deepspeed,
    world_of_one,
    write_recipe,
)

from crlft import checkpoint as ckpt
from crlft import manifest

pytestmark = pytest.mark.slow


def _remanifest(path):
    marker = manifest.read_marker(path)
    ckpt.write_json(os.path.join(path, manifest.COMPLETE_MARKER), {"step": marker["step"],
                                                                   **manifest.build_manifest(path)})


def _nan_into_largest_tensor(shard):
    """Overwrite 64 bytes in the middle of the largest tensor of a torch zip file with 0xFF (float32 NaN)."""
    with zipfile.ZipFile(shard) as z:
        info = max(z.infolist(), key=lambda i: i.file_size)
    with open(shard, "r+b") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = int.from_bytes(f.read(2), "little"), int.from_bytes(f.read(2), "little")
        data_start = info.header_offset + 30 + name_len + extra_len
        f.seek(data_start + (info.file_size // 2) // 64 * 64)
        f.write(b"\xff" * 64)


@pytest.fixture(scope="module")
def damaged_runs(zero2_e2e_run, tmp_path_factory, _diverging_launch):
    """The two relaunches of a copy of the reference run: poisoned newest checkpoint, then also truncated."""
    out = str(tmp_path_factory.mktemp("reliability") / "run")
    shutil.copytree(zero2_e2e_run["dir"], out, ignore=shutil.ignore_patterns("export", "wandb"))
    root = ckpt.checkpoints_dir(out)
    newest = os.path.join(root, "step_00000015")
    _nan_into_largest_tensor(os.path.join(newest, "zero_pp_rank_1_mp_rank_00_optim_states.pt"))
    _remanifest(newest)
    poisoned = run_deepspeed(zero2_e2e_run["recipe"], (f"train.output_dir={out}",), check=False)
    after_poisoned = {"checkpoints": sorted(os.listdir(root)), "export": os.path.exists(os.path.join(out, "export"))}

    shard = os.path.join(newest, "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) // 2)
    truncated = run_deepspeed(zero2_e2e_run["recipe"], (f"train.output_dir={out}",), check=False)
    return {"dir": out, "poisoned": poisoned, "after_poisoned": after_poisoned, "truncated": truncated}


def test_a_poisoned_optimizer_shard_stops_the_resume_naming_it_and_writes_nothing(damaged_runs):
    result = damaged_runs["poisoned"]
    log = result.stdout + result.stderr
    newest = os.path.join(ckpt.checkpoints_dir(damaged_runs["dir"]), "step_00000015")
    assert result.returncode != 0
    assert f"the weights or optimizer state loaded from {newest} are not finite on some rank" in log
    assert "optimizer exp_avg" in log or "optimizer exp_avg_sq" in log or "fp32 weights" in log
    assert "Traceback" not in log
    # nothing written, nothing deleted: both checkpoints are where they were, no export
    assert damaged_runs["after_poisoned"] == {"checkpoints": ["step_00000012", "step_00000015", "zero_to_fp32.py",
                                                              "zero_to_torch.py"], "export": False}


def test_a_truncated_newest_checkpoint_is_skipped_and_the_one_before_reproduces_the_run(damaged_runs, zero2_e2e_run):
    result = damaged_runs["truncated"]
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    root = ckpt.checkpoints_dir(damaged_runs["dir"])
    assert (f"{os.path.join(root, 'step_00000015')} is damaged, skipping it: zero_pp_rank_0_mp_rank_00_optim_states.pt"
            in log)
    assert f"resumed from {os.path.join(root, 'step_00000012')} (step 12" in log
    assert os.path.isdir(os.path.join(root, "step_00000015.damaged"))
    reference = read_metrics(zero2_e2e_run["dir"])
    metrics = read_metrics(damaged_runs["dir"])
    assert [m["step"] for m in metrics] == [m["step"] for m in reference]
    for ours, theirs in zip(metrics, reference):
        assert ours["loss"] == pytest.approx(theirs["loss"], abs=1e-6), ours["step"]
    ours = load_safetensors_dir(os.path.join(damaged_runs["dir"], "export", "final"))
    theirs = load_safetensors_dir(os.path.join(zero2_e2e_run["dir"], "export", "final"))
    assert max((ours[k] - theirs[k]).abs().max().item() for k in theirs) <= 1e-6
    assert ckpt.verify_checkpoint(os.path.join(root, "step_00000015")) == []


@pytest.fixture(scope="module")
def _diverging_launch(tmp_path_factory, tiny_mistral_dir):
    """lr 1e30 (finite, so also valid once recipes refuse non-finite numbers), a checkpoint every step: started, not
    waited for, so that it runs beside the damaged-checkpoint relaunches."""
    tmp = tmp_path_factory.mktemp("diverging")
    recipe = write_recipe(tmp, tiny_mistral_dir, epochs=1, lr=1e30, save_every_steps=1, keep_last=1)
    prepare_recipe(recipe)
    launch = start_deepspeed(recipe, check=False, timeout=1200)  # a checkpoint per step: slow under load
    return {"dir": str(tmp / "run"), "launch": launch, "recipe": recipe}


@pytest.fixture(scope="module")
def diverging_run(_diverging_launch):
    return {**_diverging_launch, "result": _diverging_launch["launch"].wait()}


def test_divergence_stops_at_the_first_nonfinite_step_and_keeps_the_checkpoint_before(diverging_run):
    result, out = diverging_run["result"], diverging_run["dir"]
    log = result.stdout + result.stderr
    assert result.returncode != 0
    first = os.path.join(ckpt.checkpoints_dir(out), "step_00000001")
    # the weights of step 1 are ~1e30: the loss of step 2 may survive RMSNorm, its gradient norm does not
    assert "step 2: the loss is " in log and "; stopping (train.nonfinite_skips=0)" in log, log[-3000:]
    assert "The update of step 2 was not applied; no checkpoint or export of this state was written" in log
    assert f"the last good checkpoint is {first}" in log
    assert "Traceback" not in log
    assert [m["step"] for m in read_metrics(out)] == [1]
    assert ckpt.list_checkpoints(out) == [(1, first)] and ckpt.verify_checkpoint(first) == []
    assert not os.path.exists(os.path.join(out, "export"))


def test_lr_inf_ends_non_zero_and_writes_nothing(tmp_path, tiny_mistral_dir, capsys, monkeypatch):
    """Refused by the recipe's validation before any rank starts: exit 2, the key named, never a checkpoint or an
    export. (In this process: a refused recipe never reaches DeepSpeed, and test_prepare.py shows the same kind of
    error through a real process.)"""
    from crlft.cli import main

    recipe = write_recipe(tmp_path, tiny_mistral_dir, epochs=1, save_every_steps=1)
    prepare_recipe(recipe)
    with world_of_one(monkeypatch):
        code = main(["train", recipe, "train.lr=.inf"])
    err = capsys.readouterr().err
    assert code == 2
    assert "(train.lr): must be a finite number, got inf" in err, err
    assert "Traceback" not in err
    assert not os.path.exists(os.path.join(tmp_path, "run"))


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (builtins.exec, (f"open({self.marker!r}, 'w').write('ran')",))


def test_a_pickle_payload_in_a_deepspeed_shard_is_refused_on_resume_and_export(zero2_e2e_run, tmp_path, capsys,
                                                                               monkeypatch):
    from crlft.cli import main

    out = str(tmp_path / "run")
    shutil.copytree(zero2_e2e_run["dir"], out, ignore=shutil.ignore_patterns("export", "wandb"))
    newest = os.path.join(ckpt.checkpoints_dir(out), "step_00000015")
    shard = os.path.join(newest, "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    ran = tmp_path / "payload_ran"
    state = manifest.load_weights_only(shard)
    state["optimizer_state_dict"]["payload"] = _Payload(str(ran))
    torch.save(state, shard)
    _remanifest(newest)  # the attacker writes the manifest too

    assert main(["export", newest, str(tmp_path / "exported")]) == 2
    err = capsys.readouterr().err
    assert ("zero_pp_rank_1_mp_rank_00_optim_states.pt: refused without loading it: its pickle would build exec"
            in err), err
    with world_of_one(monkeypatch):
        code = main(["train", zero2_e2e_run["recipe"], f"train.output_dir={out}", f"train.resume={newest}"])
    err = capsys.readouterr().err
    assert code == 2
    assert f"(train.resume): {newest} is damaged: zero_pp_rank_1_mp_rank_00_optim_states.pt: refused" in err, err
    intact = os.path.join(ckpt.checkpoints_dir(out), "step_00000012")
    assert f"The newest intact checkpoint beside it is {intact}" in err
    assert not ran.exists() and not (tmp_path / "exported").exists()
