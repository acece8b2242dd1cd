"""Resuming on another number of ranks with the same rows per step reproduces the uninterrupted run exactly.

For ZeRO-2 and ZeRO-3 (fp32), starting from the 2 ranks x grad_accum 1 reference (conftest's ``zero2_e2e_run``;
a ZeRO-3 twin here, 15 steps each): its checkpoint of step 12 is copied into a new run directory (what a run
killed after that checkpoint leaves; the kill itself is test_resume.py's), resumed as 1 rank x grad_accum 2 and
killed after its own checkpoint of step 13, which is resumed again as 2 ranks x grad_accum 1 to the end. So both
directions reshard the ZeRO state (DeepSpeed's universal checkpoint): step 14's loss depends on the 2 -> 1
resharding of the optimizer state, the final weights on both. A resume with other rows per step is refused.

The ZeRO-3 reference also checks the partitioned loading against the ZeRO-2 run (the same losses) and that every
rank reports its memory after loading.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from helpers import (
    E2E_SETTINGS,
    REPO_ROOT,
    load_safetensors_dir,
    prepare_recipe,
    read_metrics,
    refusal_of_train_in_process,
    run_deepspeed,
    run_env,
    start_deepspeed,
    write_recipe,
)

pytestmark = pytest.mark.slow

FROM_STEP = 12  # a checkpoint of the reference run (keep_last 2 keeps 12 and 15)
ONE_RANK_STEP = 13  # the 1-rank leg checkpoints here and is killed
RELATIVE = 1e-6


@pytest.fixture(scope="module")
def _zero3_reference_launch(tmp_path_factory, tiny_mistral_dir):
    """ZeRO-3, fp32, 2 ranks, the ZeRO-2 reference's recipe and data otherwise: started, not waited for."""
    tmp = tmp_path_factory.mktemp("reshard_zero3")
    recipe = write_recipe(tmp, tiny_mistral_dir, zero_stage=3, **E2E_SETTINGS)
    prepare_recipe(recipe)
    return {"launch": start_deepspeed(recipe), "dir": str(tmp / "run"), "recipe": recipe}


@pytest.fixture(scope="module")
def zero3_reference(_zero3_reference_launch):
    result = _zero3_reference_launch["launch"].wait()
    return {"dir": _zero3_reference_launch["dir"], "log": result.stdout + result.stderr,
            "recipe": _zero3_reference_launch["recipe"]}


def _one_rank_until_checkpoint(recipe: str, out: str, step: int) -> tuple[int, str]:
    """``python -m crlft.train`` (1 rank x grad_accum 2), SIGKILLed once the checkpoint of ``step`` is complete."""
    marker = os.path.join(out, "checkpoints", f"step_{step:08d}", "COMPLETE")
    log_path = os.path.join(out, "one_rank.log")
    cmd = [sys.executable, "-m", "crlft.train", recipe, f"train.output_dir={out}", "train.grad_accum=2",
           f"train.save_every_steps={step}"]
    with open(log_path, "w") as log:
        process = subprocess.Popen(cmd, cwd=REPO_ROOT, env=run_env(), stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        try:
            deadline = time.monotonic() + 600
            while process.poll() is None and not os.path.isfile(marker) and time.monotonic() < deadline:
                time.sleep(0.005)
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=60)
    with open(log_path, encoding="utf-8", errors="replace") as f:
        return process.returncode, f.read()


def _resharded_chain(reference: dict, tmp) -> dict:
    out = str(tmp / "run")
    os.makedirs(os.path.join(out, "checkpoints"))
    name = f"step_{FROM_STEP:08d}"
    shutil.copytree(os.path.join(reference["dir"], "checkpoints", name), os.path.join(out, "checkpoints", name))
    with open(os.path.join(out, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(m) + "\n" for m in read_metrics(reference["dir"])[:FROM_STEP])
    code, one_rank_log = _one_rank_until_checkpoint(reference["recipe"], out, ONE_RANK_STEP)
    two_ranks = run_deepspeed(reference["recipe"], (f"train.output_dir={out}",))
    return {"dir": out, "one_rank_code": code, "one_rank_log": one_rank_log,
            "two_ranks_log": two_ranks.stdout + two_ranks.stderr}


@pytest.fixture(scope="module")
def chains(_zero3_reference_launch):
    """(reference, resharded chain) per ZeRO stage, each made when a test first asks for it.

    The ZeRO-3 reference is started first, so that it runs beside the ZeRO-2 chain.
    """
    return {}


def _chain(stage: str, request, chains, tmp_path_factory):
    if stage not in chains:
        reference = request.getfixturevalue({"zero2": "zero2_e2e_run", "zero3": "zero3_reference"}[stage])
        chains[stage] = (reference, _resharded_chain(reference, tmp_path_factory.mktemp(f"chain_{stage}")))
    return chains[stage]


@pytest.fixture(params=["zero2", "zero3"])
def chain(request, chains, tmp_path_factory):
    return _chain(request.param, request, chains, tmp_path_factory)


def test_both_legs_resharded(chain):
    reference, ours = chain
    checkpoints = os.path.join(ours["dir"], "checkpoints")
    assert "was written by 2 ranks, this run has 1" in ours["one_rank_log"]
    assert f"resumed from {os.path.join(checkpoints, f'step_{FROM_STEP:08d}')}" in ours["one_rank_log"]
    assert "was written by 1 ranks, this run has 2" in ours["two_ranks_log"]
    assert f"resumed from {os.path.join(checkpoints, f'step_{ONE_RANK_STEP:08d}')}" in ours["two_ranks_log"]
    assert not os.path.exists(os.path.join(checkpoints, ".universal"))  # the converted copies are removed


def test_resharded_run_logs_the_uninterrupted_losses(chain):
    reference, ours = chain
    theirs, metrics = read_metrics(reference["dir"]), read_metrics(ours["dir"])
    assert [m["step"] for m in metrics] == [m["step"] for m in theirs]
    for mine, ref in zip(metrics[FROM_STEP:], theirs[FROM_STEP:]):
        assert mine["num_tokens"] == ref["num_tokens"], mine["step"]
        assert mine["loss"] == pytest.approx(ref["loss"], rel=RELATIVE), mine["step"]
        assert mine["lr"] == pytest.approx(ref["lr"], rel=1e-9)


def test_resharded_run_ends_with_the_uninterrupted_weights(chain):
    reference, ours = chain
    mine = load_safetensors_dir(os.path.join(ours["dir"], "export", "final"))
    theirs = load_safetensors_dir(os.path.join(reference["dir"], "export", "final"))
    assert mine.keys() == theirs.keys()
    for name in theirs:
        assert (mine[name] - theirs[name]).abs().max().item() <= RELATIVE * theirs[name].abs().max().item(), name


def test_zero3_partitioned_loading_trains_like_zero2(zero3_reference, zero2_e2e_run):
    """The same losses as ZeRO-2 (fp32), which the full-copy ZeRO-3 loading also gave (test_parity.py)."""
    for z3, z2 in zip(read_metrics(zero3_reference["dir"]), read_metrics(zero2_e2e_run["dir"])):
        assert z3["loss"] == pytest.approx(z2["loss"], rel=1e-6), z3["step"]
    for rank in (0, 1):
        assert f"memory after loading, rank {rank} on " in zero3_reference["log"]
    assert "holds 2.1M of 4.2M parameters" in zero3_reference["log"]


def test_other_rows_per_step_are_refused_naming_the_grad_accum_that_fits(request, chains, tmp_path_factory,
                                                                          monkeypatch):
    """In this process (world of one, grad_accum 1: 1 row per step against the checkpoint's 2)."""
    from crlft.recipe import load_recipe

    reference, ours = _chain("zero3", request, chains, tmp_path_factory)
    recipe = load_recipe(reference["recipe"], [f"train.output_dir={ours['dir']}", "train.grad_accum=1"])
    message = refusal_of_train_in_process(recipe, monkeypatch)
    assert "(train.grad_accum): cannot resume from" in message and "step_00000015" in message
    assert "written with 2 rows per step (2 ranks × grad_accum 1)" in message
    assert "this run has 1 (1 ranks × grad_accum 1)" in message
    assert "set train.grad_accum=2 (1 ranks × 2 = 2)" in message
