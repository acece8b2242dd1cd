"""Launching a finished run again says so at once and changes nothing; the first launch's output is readable.

Both use conftest's ``zero2_e2e_run`` (launch.sh, 2 CPU ranks, 15 steps): no extra training run.
"""

import os
import subprocess
import time

import pytest
from helpers import REPO_ROOT, free_port, read_metrics, run_env

pytestmark = pytest.mark.slow


def _snapshot(run_dir):
    """Every file of the run directory with its size and modification time."""
    files = {}
    for root, _, names in os.walk(run_dir):
        for name in names:
            path = os.path.join(root, name)
            files[os.path.relpath(path, run_dir)] = (os.path.getsize(path), os.stat(path).st_mtime_ns)
    return files


def test_a_finished_run_exits_0_in_seconds_without_starting_deepspeed(zero2_e2e_run):
    run_dir = zero2_e2e_run["dir"]
    before = _snapshot(run_dir)
    started = time.perf_counter()
    cmd = [os.path.join(REPO_ROOT, "launch.sh"), "--master_port", str(free_port()), zero2_e2e_run["recipe"],
           "logging.wandb.project=crlft-e2e", "logging.wandb.mode=offline"]  # would open a wandb run if it trained
    result = subprocess.run(cmd, cwd=os.path.dirname(run_dir), env=run_env(), capture_output=True, text=True,
                            timeout=300)
    seconds = time.perf_counter() - started
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    assert f"{run_dir} is complete: 15 of 15 steps done" in log
    assert log.count("is complete") == 1
    assert "spawned" not in log and "train:" not in log and "exported" not in log  # no ranks, no steps, no export
    assert _snapshot(run_dir) == before  # no file written, touched or removed (no wandb directory either)
    assert len(read_metrics(run_dir)) == 15
    # Seconds, not DeepSpeed's minutes: python start-ups for the CUDA check, prepare (reused) and preflight.
    assert seconds < 90, f"{seconds:.0f} s"
    print(f"finished run relaunched in {seconds:.1f} s")


def test_the_first_launch_shows_our_phases_not_the_launchers_cpu_noise(zero2_e2e_run):
    log = zero2_e2e_run["log"]
    for phase in ("loading the model from", "building the DeepSpeed engine (ZeRO-2, 2 ranks)", "set-up took"):
        assert log.count(phase) == 1, phase  # rank 0 only
    for noise in ("Unable to find hostfile", "Setting CUDA_VISIBLE_DEVICES", "spawned with command"):
        assert noise not in log, noise
    assert "inference condition: 'GPT4 Correct'" in log
