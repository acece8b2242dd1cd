"""Two "nodes" on this machine: two ``launch.sh --hostfile H --no_ssh`` processes with one CPU rank each, meeting at
127.0.0.1, train exactly what one node with two ranks trains (conftest's ``zero2_e2e_run``: the same recipe and
data). Node 0 is started with ``--node_rank 0``, node 1 as ``srun`` would start it (``SLURM_NODEID=1``, no
``--node_rank``), so the README's SLURM form is what runs here.

One run is shared by all tests: after the checkpoint of step 4, node 1's rank is SIGKILLed (a node dying); both
nodes must end with a non-zero status within a minute. Both are then relaunched with the same command: they resume
and finish, and the whole run (steps 1-4 from the first launch, the rest from the relaunch) must match the
reference's losses and final weights.
"""

import os
import signal
import subprocess
import time

import psutil
import pytest
from helpers import REPO_ROOT, free_port, load_safetensors_dir, read_metrics, run_env

pytestmark = pytest.mark.slow

KILL_AFTER_CHECKPOINT = 4
DEATH_DEADLINE_S = 60
RELATIVE = 1e-6


def _start_nodes(recipe: str, out: str, hostfile: str, logs: str, attempt: int) -> list[subprocess.Popen]:
    port = str(free_port())
    common = ["--hostfile", hostfile, "--no_ssh", "--master_addr", "127.0.0.1", "--master_port", port]
    nodes = []
    for node in (0, 1):
        args = [*common, "--node_rank", "0"] if node == 0 else common
        env = run_env({"SLURM_NODEID": "1"} if node == 1 else {})
        log = open(os.path.join(logs, f"node{node}_attempt{attempt}.log"), "w")
        nodes.append(subprocess.Popen([os.path.join(REPO_ROOT, "launch.sh"), *args, recipe, f"train.output_dir={out}"],
                                      cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True))
    return nodes


def _rank_process(launcher: subprocess.Popen) -> psutil.Process | None:
    for child in psutil.Process(launcher.pid).children(recursive=True):
        try:
            cmdline = child.cmdline()
        except psutil.Error:
            continue
        if "crlft.train" in cmdline and any(a.startswith("--local_rank") for a in cmdline):
            return child
    return None


def _read(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


@pytest.fixture(scope="module")
def two_nodes(zero2_e2e_run, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("two_nodes")
    out, logs = str(tmp / "run"), str(tmp)
    hostfile = str(tmp / "hosts.txt")
    with open(hostfile, "w") as f:
        f.write("node0 slots=1\nnode1 slots=1\n")
    marker = os.path.join(out, "checkpoints", f"step_{KILL_AFTER_CHECKPOINT:08d}", "COMPLETE")
    nodes = _start_nodes(zero2_e2e_run["recipe"], out, hostfile, logs, attempt=1)
    try:
        deadline = time.monotonic() + 900
        while not os.path.isfile(marker) and time.monotonic() < deadline and all(n.poll() is None for n in nodes):
            time.sleep(0.01)
        assert os.path.isfile(marker), _read(os.path.join(logs, "node0_attempt1.log"))[-4000:]
        victim = _rank_process(nodes[1])
        assert victim is not None
        victim.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        codes = []
        for node in nodes:
            try:
                codes.append(node.wait(timeout=max(DEATH_DEADLINE_S - (time.monotonic() - killed_at), 1)))
            except subprocess.TimeoutExpired:
                codes.append(None)
        died_after_s = time.monotonic() - killed_at
    finally:
        for node in nodes:
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)
                node.wait()
    at_kill = {"codes": codes, "died_after_s": died_after_s, "metrics": read_metrics(out)}
    relaunched = _start_nodes(zero2_e2e_run["recipe"], out, hostfile, logs, attempt=2)
    for node in relaunched:
        node.wait(timeout=900)
    return {"dir": out, "at_kill": at_kill, "codes": [n.returncode for n in relaunched],
            "logs": {name: _read(os.path.join(logs, f"{name}.log"))
                     for name in ("node0_attempt1", "node1_attempt1", "node0_attempt2", "node1_attempt2")}}


def test_killing_one_nodes_rank_ends_both_nodes_within_a_minute(two_nodes):
    at_kill = two_nodes["at_kill"]
    assert all(code is not None and code != 0 for code in at_kill["codes"]), at_kill
    assert at_kill["died_after_s"] < DEATH_DEADLINE_S
    assert len(at_kill["metrics"]) >= KILL_AFTER_CHECKPOINT


def test_relaunching_both_nodes_resumes_and_finishes(two_nodes):
    assert two_nodes["codes"] == [0, 0], two_nodes["logs"]["node0_attempt2"][-4000:]
    resumed = "resumed from " + os.path.join(two_nodes["dir"], "checkpoints", "step_")
    assert resumed in two_nodes["logs"]["node0_attempt2"]


def test_two_nodes_log_the_same_losses_as_one_node_with_two_ranks(two_nodes, zero2_e2e_run):
    reference = read_metrics(zero2_e2e_run["dir"])
    metrics = read_metrics(two_nodes["dir"])  # one writer (global rank 0): one line per step
    assert [m["step"] for m in metrics] == [m["step"] for m in reference]
    for ours, theirs in zip(metrics, reference):
        assert ours["num_tokens"] == theirs["num_tokens"], ours["step"]  # the same batches
        assert ours["loss"] == pytest.approx(theirs["loss"], rel=RELATIVE), ours["step"]


def test_two_nodes_end_with_the_same_weights(two_nodes, zero2_e2e_run):
    ours = load_safetensors_dir(os.path.join(two_nodes["dir"], "export", "final"))
    theirs = load_safetensors_dir(os.path.join(zero2_e2e_run["dir"], "export", "final"))
    assert ours.keys() == theirs.keys()
    for name in theirs:
        scale = theirs[name].abs().max().item()
        assert (ours[name] - theirs[name]).abs().max().item() <= RELATIVE * scale, name


def test_node_1_waits_for_node_0_to_prepare_and_every_rank_writes_its_shard(two_nodes):
    from crlft.checkpoint import latest_checkpoint

    log = two_nodes["logs"]["node1_attempt1"]
    assert "node 1: waiting for node 0 to prepare the dataset" in log and "prepared by node 0" in log
    assert "up to date" in two_nodes["logs"]["node0_attempt1"]  # node 0 ran `crlft prepare`
    files = os.listdir(latest_checkpoint(two_nodes["dir"]))
    assert sorted(f for f in files if f.endswith("optim_states.pt")) == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
