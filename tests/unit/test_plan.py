"""`crlft plan`: parameter count on the meta device, memory formulas, steps per epoch and the auto learning rate."""

import json
import math
import os

import numpy as np
import pytest
from helpers import REPO_ROOT as ROOT

from crlft.cli import main as cli_main
from crlft.cli import plan_main
from crlft.errors import UserError
from crlft.memory import activation_bytes, memory_per_gpu
from crlft.plan import count_parameters, dataset_token_counts, resolve_lr, supervised_tokens_per_step
from crlft.recipe import load_recipe

OPENCHAT_RECIPE = os.path.join(ROOT, "recipes", "openchat_3.5.yaml")

# mistralai/Mistral-7B-v0.1's config.json, as published.
MISTRAL_7B_CONFIG = {
    "architectures": ["MistralForCausalLM"],
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 14336,
    "max_position_embeddings": 32768,
    "model_type": "mistral",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05,
    "rope_theta": 10000.0,
    "sliding_window": 4096,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.34.0.dev0",
    "use_cache": True,
    "vocab_size": 32000,
}
MISTRAL_7B_PARAMS = 7_241_732_096  # 32 x 218,112,000 per layer + 2 x 131,072,000 embeddings + 4,096 final norm
MISTRAL_7B_PARAMS_WITH_TEMPLATE = MISTRAL_7B_PARAMS + 2 * 2 * 4096  # two new rows in embed_tokens and lm_head


@pytest.fixture
def mistral_7b_dir(tmp_path):
    d = tmp_path / "mistral-7b-config"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(MISTRAL_7B_CONFIG))
    return d


def test_plan_openchat_recipe_gives_mistral_7b_parameter_count(mistral_7b_dir, capsys):
    assert plan_main([OPENCHAT_RECIPE, f"model.base={mistral_7b_dir}", "train.lr=auto", "--num_gpus", "8"]) == 0
    out = capsys.readouterr().out
    assert f"{MISTRAL_7B_PARAMS:,} (7.24B) before the template's tokens" in out
    assert f"{MISTRAL_7B_PARAMS_WITH_TEMPLATE:,} (7.24B) with vocabulary 32,002" in out
    assert "→ 2" in out  # the recipe's ZeRO stage is marked
    assert "not prepared" in out
    # lr auto without data: the formula with the Mistral divisor, at a supervised ratio of 1.
    upper = 3e-4 / 6 * math.sqrt(81920 * 8 / 4_000_000)
    assert f"lr = {upper:.3g} · sqrt(r)" in out


def test_count_parameters_on_meta(mistral_7b_dir):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(mistral_7b_dir)
    assert count_parameters(config) == MISTRAL_7B_PARAMS
    config.tie_word_embeddings = True
    assert count_parameters(config) == MISTRAL_7B_PARAMS - 32000 * 4096  # a tied lm_head is counted once


def test_resolve_lr_follows_openchat_rule():
    recipe = load_recipe(OPENCHAT_RECIPE, ["train.lr=auto"])  # the recipe holds the recorded value
    tokens = supervised_tokens_per_step(77824, 8, 1, 0.5)
    assert tokens == 311296
    lr, why = resolve_lr(recipe, tokens, "mistral")
    assert lr == pytest.approx(3e-4 / 6 * math.sqrt(311296 / 4e6))
    assert lr == pytest.approx(1.3948e-5, rel=1e-4)
    assert "3e-4" in why.replace("0.0003", "3e-4") and "/ 6 (mistral)" in why and "311,296" in why
    # Gradient accumulation multiplies the supervised tokens of a step.
    lr2, _ = resolve_lr(recipe, supervised_tokens_per_step(77824, 8, 2, 0.5), "mistral")
    assert lr2 == pytest.approx(lr * math.sqrt(2))
    # No divisor for other models.
    lr_llama, _ = resolve_lr(recipe, tokens, "llama")
    assert lr_llama == pytest.approx(6 * lr)
    with pytest.raises(UserError, match="supervised tokens per step"):
        resolve_lr(recipe, 0.0, "mistral")
    fixed = load_recipe(OPENCHAT_RECIPE, ["train.lr=2e-5"])
    assert resolve_lr(fixed, None, "mistral")[0] == 2e-5


def test_memory_formulas():
    psi, n = 1_000_000_000, 8
    ds = {"zero_optimization": {"overlap_comm": True, "reduce_bucket_size": 5e8, "allgather_bucket_size": 5e8}}
    s0 = memory_per_gpu(psi, n, 0, 0, ds)
    assert (s0.weights, s0.gradients, s0.optimizer, s0.buffers) == (2e9, 2e9, 12e9, 0)
    s1 = memory_per_gpu(psi, n, 1, 0, ds)
    assert (s1.weights, s1.gradients, s1.optimizer) == (2e9, 2e9, 1.5e9)
    assert s1.buffers == 2 * 5e8 * 2  # two gradient buckets with overlap_comm (DeepSpeed 0.19's setup_buckets)
    s2 = memory_per_gpu(psi, n, 2, 123, ds)
    # the bf16 gradient partition and its fp32 copy at the step
    assert (s2.weights, s2.gradients, s2.optimizer, s2.activations) == (2e9, 7.5e8, 1.5e9, 123)
    assert s2.total == s2.weights + s2.gradients + s2.optimizer + s2.buffers + 123
    s3 = memory_per_gpu(psi, n, 3, 0, ds, offload_optimizer=True, offload_param=True)
    assert (s3.weights, s3.gradients, s3.optimizer) == (0, 7.5e8, 0)
    assert s3.cpu == 2.5e8 + 1.5e9
    fp32 = memory_per_gpu(psi, n, 0, 0, ds, bf16=False)
    assert (fp32.weights, fp32.gradients, fp32.optimizer) == (4e9, 4e9, 8e9)  # no master copy: fp32 without ZeRO
    fp32_zero2 = memory_per_gpu(psi, n, 2, 0, ds, bf16=False)
    assert (fp32_zero2.gradients, fp32_zero2.optimizer) == (1e9, 1.5e9)  # DeepSpeed clones the partition to fp32
    no_overlap = memory_per_gpu(psi, n, 2, 0, {"zero_optimization": {"reduce_bucket_size": 5e8}})
    assert no_overlap.buffers == 5e8 * 2
    # ZeRO-3: live gathered parameters + the gradient bucket + reduce_scatter_coalesced's concatenated copy of it
    assert memory_per_gpu(psi, n, 3, 0, ds).buffers == (1e9 + 2 * 5e8) * 2
    all_reduce = {"zero_optimization": {"reduce_bucket_size": 5e8, "reduce_scatter": False}}
    assert memory_per_gpu(psi, n, 3, 0, all_reduce).buffers == (1e9 + 5e8) * 2


def test_activation_formula(mistral_7b_dir):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(mistral_7b_dir)
    per_token_layer = 16 * 4096 + 4 * 1024 + 8 * 14336  # bf16: norms, q/k/v/out, four MLP tensors
    tokens = 77824
    # Fused loss: two fp32 copies of a 4096-target chunk's logits, grad_W [V, h] and grad_h [T, h] in bf16.
    loss = 2 * 4096 * 32000 * 4 + 32000 * 4096 * 2 + tokens * 4096 * 2
    assert activation_bytes(config, tokens, False) == 32 * tokens * per_token_layer + loss
    assert activation_bytes(config, tokens, True) == 32 * tokens * 4096 * 2 + tokens * per_token_layer + loss
    checkpointed = activation_bytes(config, tokens, True, loss_method="checkpoint")
    assert checkpointed == 32 * tokens * 4096 * 2 + tokens * per_token_layer + 3 * 4096 * 32000 * 4


def test_dataset_token_counts():
    import datasets

    ds = datasets.Dataset.from_dict({"loss_weights": [[1.0, 1.0, 0.0, 0.5], [0.0, 0.0, 1.0], [2.0]]})
    # Element 0 of a row never counts (nothing predicts the first token): 1 + 1 + 0 supervised.
    assert dataset_token_counts(ds) == (8, 3)


def _tiny_config_dir(tmp_path):
    from transformers import MistralConfig

    d = tmp_path / "tiny"
    MistralConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1).save_pretrained(d)
    return d


def test_plan_with_prepared_data_gives_steps_and_lr(tmp_path, monkeypatch, capsys):
    """With a prepared dataset: steps per epoch come from the packing plan, lr auto from its supervised ratio."""
    import datasets

    import crlft.plan
    from crlft.loader import PackedLoader

    rng = np.random.default_rng(0)
    lengths = rng.integers(10, 120, size=200)
    weights = [[0.0] * (n // 2) + [1.0] * (n - n // 2) for n in lengths]
    ds = datasets.Dataset.from_dict({
        "input_ids": [list(range(n)) for n in lengths],
        "loss_weights": weights,
        "length": lengths.tolist(),
        "condition": ["GPT4 Correct"] * len(lengths),
    })
    monkeypatch.setattr(crlft.plan, "load_prepared", lambda recipe, check=True: ds)
    base = _tiny_config_dir(tmp_path)
    overrides = [f"model.base={base}", "model.max_context=128", "train.batch_max_len=256", "train.epochs=2",
                 "train.grad_accum=2", "train.lr=auto"]
    assert plan_main([OPENCHAT_RECIPE, *overrides, "--num_gpus", "2"]) == 0
    out = capsys.readouterr().out

    loader = PackedLoader(ds, max_tokens=256, num_ranks=2, grad_accum=2, seed=42, num_epochs=2)
    assert f"steps per epoch: {loader.steps_per_epoch(0):,}" in out
    assert f"total steps: {loader.total_steps():,} over 2 epoch(s)" in out
    num_tokens, num_supervised = int(lengths.sum()), sum(n - n // 2 - (1 if n // 2 == 0 else 0) for n in lengths)
    ratio = num_supervised / num_tokens
    per_step = 256 * 2 * 2 * ratio
    lr = 3e-4 / 6 * math.sqrt(per_step / 4e6)
    assert f"= {per_step:,.0f}" in out
    assert f"= {lr:.3g}" in out
    assert "(+0)" not in out and "vocabulary 102" in out  # 2 template tokens added to the 100-token vocabulary


def test_cli_plan_reports_user_errors(tmp_path, capsys):
    assert cli_main(["plan", OPENCHAT_RECIPE, "train.epoch=3"]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'epoch'" in err and "did you mean 'epochs'" in err
    assert cli_main(["plan", OPENCHAT_RECIPE, f"model.base={tmp_path / 'nowhere' / 'model'}"]) == 0
    assert "directory not found" in capsys.readouterr().out


def test_plan_knows_the_published_shapes_without_downloading(capsys, monkeypatch):
    import crlft.model

    monkeypatch.setattr(crlft.model, "try_to_load_from_cache", lambda *a, **k: None)  # nothing downloaded, anywhere
    assert plan_main([OPENCHAT_RECIPE, "--num_gpus", "8"]) == 0
    out = capsys.readouterr().out
    assert "mistralai/Mistral-7B-v0.1, its published shape" in out
    assert f"{MISTRAL_7B_PARAMS:,} (7.24B) before" in out and f"{MISTRAL_7B_PARAMS_WITH_TEMPLATE:,}" in out
    assert "→ 2" in out and "memory per GPU" in out  # the memory table, for the recipe's ZeRO stage
    # Llama 3 8B under the openchat_3.6 template: its header and end-of-turn tokens exist, only <|pad_0|> is new.
    llama = ["model.base=meta-llama/Meta-Llama-3-8B", "model.template=openchat_3.6", "--num_gpus", "8"]
    assert plan_main([OPENCHAT_RECIPE, *llama]) == 0
    out = capsys.readouterr().out
    assert "8,030,261,248 (8.03B) before" in out
    assert f"{8_030_261_248 + 2 * 4096:,} (8.03B) with vocabulary 128,257" in out


def test_plan_defaults_to_this_machines_ranks(capsys, monkeypatch):
    import torch

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert plan_main([OPENCHAT_RECIPE]) == 0
    assert "on 2 GPU(s) (no CUDA: launch.sh's CPU ranks" in capsys.readouterr().out
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert plan_main([OPENCHAT_RECIPE]) == 0
    assert "on 4 GPU(s) (this machine's GPUs)" in capsys.readouterr().out
    monkeypatch.setenv("WORLD_SIZE", "16")
    assert plan_main([OPENCHAT_RECIPE]) == 0
    assert "on 16 GPU(s) ($WORLD_SIZE)" in capsys.readouterr().out
