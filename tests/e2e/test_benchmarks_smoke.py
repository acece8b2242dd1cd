"""The benchmarks stay runnable: each one's small mode runs on the CPU, and bench_gpu's arithmetic is checked.

These are not timed tests: they check that the scripts run end to end, that both sides of a comparison did the
same work, and that the FLOP count behind the MFU figure is right.
"""

import importlib.util
import os
import sys

import pytest
import torch
from helpers import REPO_ROOT
from transformers import MistralConfig, MistralForCausalLM

sys.path.insert(0, os.path.join(REPO_ROOT, "benchmarks"))

import bench_gpu  # noqa: E402
import bench_loss  # noqa: E402
import bench_train  # noqa: E402
import gpu_check_report  # noqa: E402


def test_bench_gpu_smoke_runs_every_backend_with_and_without_checkpointing(tmp_path):
    out = tmp_path / "gpu.json"
    results = bench_gpu.main(["--smoke", "--steps", "1", "--warmup", "1", "--peak-tflops", "1", "--json", str(out)])
    assert out.exists()
    assert results["auto_choice"] == "crlft_varlen" and results["attention_log"].startswith("attention: ")
    runs = {(r["attn"], r["checkpointing"]): r for r in results["runs"] if "skipped" not in r}
    assert set(runs) == {(a, c) for a in ("crlft_varlen", "sdpa") for c in (False, True)}
    # PyTorch's FlashAttention-3/-4 backends are listed and skipped with their reason (no CUDA here).
    skipped = {(r["attn"], r["checkpointing"]): r["skipped"] for r in results["runs"] if "skipped" in r}
    assert set(skipped) == {(f"crlft_varlen+{i}", c) for i in ("FA3", "FA4") for c in (False, True)}
    assert skipped[("crlft_varlen+FA3", False)] == "FA3 needs a CUDA GPU (device cpu)"
    assert results["mfu_formula"].startswith("MFU = model FLOPs per step / step time / peak")
    for r in runs.values():
        assert "error" not in r, r
        assert r["tokens_per_s"] > 0 and r["peak_memory_gib"] > 0
        assert r["mfu"] == pytest.approx(r["tflops_per_s"] / 1.0)  # --peak-tflops 1
    assert results["mean_real_tokens_per_row"] >= 0.95 * results["row_tokens"]


def test_attention_pairs_count_causal_pairs_within_the_window():
    assert bench_gpu.attention_pairs([3], None) == 1 + 2 + 3
    assert bench_gpu.attention_pairs([5], 2) == 1 + 2 + 2 + 2 + 2
    assert bench_gpu.attention_pairs([5, 3], 8) == 15 + 6
    brute = sum(min(i + 1, 100) for n in (50, 300, 7) for i in range(n))
    assert bench_gpu.attention_pairs([50, 300, 7], 100) == brute


def test_step_flops_formula():
    config = MistralConfig(hidden_size=64, intermediate_size=160, num_attention_heads=4, num_key_value_heads=2,
                           vocab_size=100, sliding_window=4, num_hidden_layers=3)
    layer = MistralForCausalLM(config).model.layers[0]
    assert bench_gpu.layer_params(config) == sum(p.numel() for p in layer.parameters())
    lengths, supervised = [6, 2], 6
    pairs = (1 + 2 + 3 + 4 + 4 + 4) + (1 + 2)
    expected = 6 * bench_gpu.layer_params(config) * 3 * 8 + 6 * 100 * 64 * supervised + 12 * 3 * 64 * pairs
    assert bench_gpu.step_flops(config, 3, lengths, supervised) == expected


def test_layer_estimate_for_mistral_7b_shapes_is_plausible_and_monotone():
    layers_80 = bench_gpu.estimate_layers(bench_gpu.MISTRAL_7B, 80 * 2**30, 8192)
    layers_140 = bench_gpu.estimate_layers(bench_gpu.MISTRAL_7B, 140 * 2**30, 8192)
    # A 7B layer holds 218M parameters: 4.4 GB of state at 20 B/parameter, plus its activations.
    assert 8 <= layers_80 <= 14
    assert layers_140 > layers_80


def test_master_weight_adamw_matches_torch_adamw_on_fp32_weights():
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    reference = torch.nn.Linear(8, 4)
    reference.load_state_dict(model.state_dict())
    ours = bench_gpu.MasterWeightAdamW(model.parameters(), lr=1e-2, grad_clip=0.5)
    theirs = torch.optim.AdamW(reference.parameters(), lr=1e-2, betas=(0.9, 0.95), eps=1e-5, weight_decay=0.1)
    for _ in range(3):
        x = torch.randn(5, 8)
        model(x).square().sum().backward()
        reference(x).square().sum().backward()
        ours.step()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.5)
        theirs.step()
        theirs.zero_grad()
    for a, b in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b)


def test_bench_train_small_compares_the_same_conversations(tmp_path):
    results = bench_train.main(["--small", "--dense-sdpa", "--json", str(tmp_path / "train.json")])
    sides = results["sides"]
    assert sides["packed"]["useful_tokens"] == sides["padded"]["useful_tokens"] == sides["packed-sdpa"][
        "useful_tokens"] > 0
    assert sides["padded"]["padding_fraction"] > 0.1  # pad-to-longest of log-normal lengths wastes a lot
    assert sides["packed"]["padding_fraction"] < 0.06  # at most the row's last partial multiple of 64
    assert sides["padded"]["optimizer_steps"] > sides["packed"]["optimizer_steps"]
    assert results["speedup_packed_over_padded"] > 0
    assert results["attention"].startswith("attention: crlft_varlen")


def test_bench_loss_small_agrees_with_the_naive_loss(tmp_path):
    results = bench_loss.main(["--small", "--repeats", "1", "--json", str(tmp_path / "loss.json")])
    assert results["loss_relative_difference"] < 1e-4  # the script also asserts this and the gradients
    assert results["side_by_side_tokens"] == 1024 and results["full_tokens"] == 2048
    assert results["full"]["naive_fp32_logits_gib"] == pytest.approx(2048 * 4096 * 4 / 2**30)
    for side in results["side_by_side"].values():
        assert side["seconds"] > 0 and side["peak_rss_gib"] > 0


# ----------------------------------------------------------------------------------------------------------------
# benchmarks/gpu_check.sh and its report
# ----------------------------------------------------------------------------------------------------------------

def _tiny_wheel(directory) -> str:
    """A minimal valid wheel (one module), standing in for the carried ones: the install step really installs it."""
    import zipfile

    name, version = "crlft_gpu_check_probe", "0.1"
    files = {
        f"{name}/__init__.py": "VALUE = 42\n",
        f"{name}-{version}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{name}-{version}.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                             "Tag: py3-none-any\n",
    }
    record = f"{name}-{version}.dist-info/RECORD"
    path = os.path.join(str(directory), f"{name}-{version}-py3-none-any.whl")
    with zipfile.ZipFile(path, "w") as wheel:
        for member, text in files.items():
            wheel.writestr(member, text)
        wheel.writestr(record, "".join(f"{member},,\n" for member in files) + f"{record},,\n")
    return path


def test_gpu_check_smoke_runs_every_phase_on_the_cpu(tmp_path):
    import subprocess

    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _tiny_wheel(wheels)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": REPO_ROOT + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else "")}
    env.pop("OUT", None)
    done = subprocess.run([os.path.join(REPO_ROOT, "benchmarks", "gpu_check.sh"), "--smoke", "--out", str(out),
                           "--wheels", str(wheels)], cwd=str(tmp_path), env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert len(os.listdir(out)) <= 8  # what the device machine sends back
    phases = {p["name"]: gpu_check_report.phase_outcome(p) for p in gpu_check_report.read_phases(str(out))}
    assert phases == {"install": "ok", "probe": "ok", "tests": "ok", "bench": "ok"}
    assert "crlft_gpu_check_probe" in (out / "install.log").read_text()  # installed into the --target folder
    summary = (out / "summary.md").read_text()
    assert summary.startswith("# crlft GPU check (smoke): PASS")
    cases = gpu_check_report.read_junit(str(out / "gpu_tests.xml"))
    assert len(cases) >= 10 and {c["outcome"] for c in cases} == {"skipped"}  # every gpu test, none run here
    assert all(c["message"] == "needs a CUDA GPU" for c in cases)
    assert "| crlft_varlen | on |" in summary and "skipped: FA3 needs a CUDA GPU (device cpu)" in summary
    assert "MFU = model FLOPs per step / step time / peak" in summary


def test_gpu_check_report_fails_on_a_phase_that_timed_out_or_failed(tmp_path):
    (tmp_path / "phases.tsv").write_text("install\t0\t3\t120\tinstall.log\ntests\t124\t270\t270\tgpu_tests.log\n"
                                         "bench\tskipped\t0\t-\tno time left\n")
    text, ok = gpu_check_report.summary(str(tmp_path), "gpu", 480)
    assert not ok and text.startswith("# crlft GPU check (gpu): FAIL")
    assert "| tests | TIMED OUT | 270 | 270 |" in text and "| bench | skipped |" in text
    assert "No JUnit report" in text and "No bench_gpu.json" in text
    (tmp_path / "phases.tsv").write_text("install\t1\t3\t120\tinstall.log\n")
    assert gpu_check_report.summary(str(tmp_path), "gpu", 480)[1] is False
    (tmp_path / "phases.tsv").write_text("install\tskipped\t0\t-\tno wheels\nprobe\t0\t9\t120\tinstall.log\n")
    assert gpu_check_report.summary(str(tmp_path), "gpu", 480)[1] is True


def test_torch_flash_impl_check_names_what_is_missing(monkeypatch):
    """FA3/FA4 through torch.nn.attention: each reason the benchmark gives for skipping them."""
    import torch.nn.attention as attention

    cuda = torch.device("cuda", 0)
    assert "not 'FA9'" in bench_gpu.torch_flash_impl_unavailable("FA9", cuda)
    if not hasattr(attention, "activate_flash_attention_impl"):
        pytest.skip(f"torch {torch.__version__} has no pluggable flash-attention implementations")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert bench_gpu.torch_flash_impl_unavailable("FA3", cuda) == (
        "FA3 needs compute capability 9.0; this GPU is 8.0")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    if importlib.util.find_spec("flash_attn_interface") is None:
        assert "`flash_attn_interface` module" in bench_gpu.torch_flash_impl_unavailable("FA3", cuda)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object())
    assert bench_gpu.torch_flash_impl_unavailable("FA3", cuda) is None
    assert bench_gpu.split_backend("crlft_varlen+FA3") == ("crlft_varlen", "FA3")
    assert bench_gpu.split_backend("sdpa") == ("sdpa", None)


@pytest.mark.slow
def test_gpu_wheels_builds_the_carried_folder(tmp_path):
    """benchmarks/gpu_wheels.sh with PyPI reachable: every pinned wheel for CPython 3.12 x86-64, under the limit."""
    import subprocess

    probe = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "hjson==3.1.0", "-d",
                            str(tmp_path / "probe")], capture_output=True, text=True, timeout=120)
    if probe.returncode != 0:
        pytest.skip(f"PyPI not reachable: {probe.stderr.strip()[-200:]}")
    out = tmp_path / "whl"
    done = subprocess.run([os.path.join(REPO_ROOT, "benchmarks", "gpu_wheels.sh"), str(out)], env={
        **os.environ, "PYTHON": sys.executable}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    wheels = sorted(os.listdir(out))
    names = {w.split("-")[0].lower() for w in wheels}
    assert names == {"deepspeed", "hjson", "pydantic", "pydantic_core", "annotated_types", "typing_inspection",
                     "typing_extensions", "datasets", "dill", "multiprocess", "mistral_common"}
    assert all(w.endswith("-none-any.whl") or "-cp312-cp312-" in w for w in wheels), wheels
    assert sum(os.path.getsize(out / w) for w in wheels) < 48 * 2**20
    assert "11 wheels" in done.stdout


# ----------------------------------------------------------------------------------------------------------------
# benchmarks/bench_peers.py (crlft vs TRL): its runs take minutes, so only its pieces are checked here
# ----------------------------------------------------------------------------------------------------------------


def test_bench_peers_finds_the_training_processes_not_the_launchers():
    import bench_peers

    ranks = [["/usr/bin/python", "-u", "-m", "crlft.train", "--local_rank=0", "r.yaml"],
             ["/venv/bin/python", "-u", "/repo/benchmarks/peers_trl.py", "--model", "m"],
             ["/venv/bin/python", "/repo/benchmarks/peers_trl.py", "--model", "m"]]
    launchers = [["/usr/bin/python", "/usr/bin/deepspeed", "--num_gpus", "2", "--module", "crlft.train", "r.yaml"],
                 ["/usr/bin/python", "-u", "-m", "deepspeed.launcher.launch", "--module", "crlft.train"],
                 ["/venv/bin/python", "-m", "accelerate.commands.launch", "--multi_gpu", "/repo/peers_trl.py"],
                 ["bash", "/repo/launch.sh", "r.yaml"], ["/usr/bin/python", "-m", "crlft", "prepare", "r.yaml"]]
    assert all(bench_peers.is_training_process(a) for a in ranks)
    assert not any(bench_peers.is_training_process(a) for a in launchers)


def test_bench_peers_long_tailed_set_and_summary():
    import bench_peers

    records = bench_peers.long_tailed_conversations(300, 600, seed=0, tokens_per_word=0.95)
    assert len(records) == 300 and {len(r["conversations"]) for r in records} == {2, 4, 6}  # 1-3 turns
    words = sorted(sum(len(m["value"].split()) for m in r["conversations"]) for r in records)
    assert 500 < words[150] < 700 and words[-1] > 3 * words[150]  # median ~600 tokens, a long tail
    run = {"steps": [{"num_tokens": 100, "seconds": 10.0, "loss": 3.0}] + [
        {"num_tokens": 100, "seconds": s, "loss": 2.0} for s in (1.0, 2.0, 4.0)], "wall_s": 9.0,
        "peak_rss_gib": [1.5, 1.0]}
    summary = bench_peers.side_summary([run, run], warmup_steps=1)
    assert summary["median_tokens_per_s"] == 50.0 and summary["tokens_per_step"] == 100
    assert summary["peak_rss_gib"] == 1.5 and summary["processes"] == 2
    assert summary["first_loss"] == [3.0, 3.0] and summary["last_loss"] == [2.0, 2.0]
