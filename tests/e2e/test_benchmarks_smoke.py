"""The benchmarks stay runnable: each one's small mode runs on the CPU, and bench_gpu's arithmetic is checked.

These are not timed tests: they check that the scripts run end to end, that both sides of a comparison did the
same work, and that the FLOP count behind the MFU figure is right.
"""

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


def test_bench_gpu_smoke_runs_every_backend_with_and_without_checkpointing(tmp_path):
    out = tmp_path / "gpu.json"
    results = bench_gpu.main(["--smoke", "--steps", "1", "--warmup", "1", "--peak-tflops", "1", "--json", str(out)])
    assert out.exists()
    assert results["auto_choice"] == "crlft_varlen" and results["attention_log"].startswith("attention: ")
    runs = {(r["attn"], r["checkpointing"]): r for r in results["runs"]}
    assert set(runs) == {(a, c) for a in ("crlft_varlen", "sdpa") for c in (False, True)}
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
