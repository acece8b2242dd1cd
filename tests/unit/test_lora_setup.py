"""``model.lora`` in one process: validation, the fused loss through peft's trainable-token ``lm_head``, a few
optimizer steps that leave every frozen weight bit-identical, forward-only evaluation, and ``crlft plan``."""

import json
import os
import re

import pytest
import torch
from helpers import REPO_ROOT, tiny_mistral, write_recipe
from test_plan import MISTRAL_7B_CONFIG

from crlft.cli import plan_main
from crlft.collate import IGNORE_INDEX
from crlft.errors import UserError
from crlft.loss import WeightedLossModel, _fused_applicable, chunked_weighted_cross_entropy
from crlft.recipe import load_recipe

LORA_RECIPE = os.path.join(REPO_ROOT, "recipes", "openchat_3.5_lora.yaml")


def _peft(model, token_layers, targets=("q_proj", "v_proj")):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), trainable_token_indices=token_layers)
    return get_peft_model(model, config, autocast_adapter_dtype=False)


def test_lora_keys_are_validated_with_their_location(tmp_path):
    with pytest.raises(UserError) as error:
        load_recipe(write_recipe(tmp_path, "base"), ["model.lora.r=0", "model.lora.dropout=1.0",
                                                     "model.lora.target_modules=[]"])
    message = str(error.value)
    assert "(model.lora.r): must be ≥ 1" in message and "(model.lora.dropout): must be in [0, 1)" in message
    assert "(model.lora.target_modules): must name at least one module" in message
    with pytest.raises(UserError, match=r"\(model.lora.rank\): unknown key 'rank'; known keys: r, alpha"):
        load_recipe(write_recipe(tmp_path, "base"), ["model.lora.rank=8"])
    assert load_recipe(write_recipe(tmp_path, "base")).model.lora is None  # default: full fine-tuning


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_fused_loss_through_peft_trainable_tokens_equals_peft_forward(tied):
    """The fast path computes what peft's own lm_head forward computes, values and gradients (fp32)."""
    model = tiny_mistral(vocab=100, tied=tied)
    layers = {"embed_tokens": [98, 99]} if tied else {"embed_tokens": [98, 99], "lm_head": [98, 99]}
    peft_model = _peft(model, layers)
    lm_head = peft_model.get_output_embeddings()
    assert type(lm_head).__name__ == "TrainableTokensWrapper" and _fused_applicable(lm_head)
    rows = lm_head.token_adapter.trainable_tokens_delta["default"]
    with torch.no_grad():
        rows.add_(torch.randn_like(rows))  # trained rows differ from the base's
    torch.manual_seed(1)
    hidden = torch.randn(50, 32, requires_grad=True)
    labels = torch.randint(0, 100, (50,))
    labels[::3], labels[1::5] = 99, 98  # the new tokens are targets too
    weights = torch.rand(50)
    weights[::4] = 0
    labels[weights == 0] = IGNORE_INDEX
    results = {}
    for method in ("fused", "checkpoint"):  # "checkpoint" calls peft's module forward chunk by chunk
        hidden.grad = rows.grad = None
        parts = chunked_weighted_cross_entropy(hidden, lm_head, labels, weights, chunk_tokens=7, method=method)
        parts.weighted_ce_sum.backward()
        results[method] = (parts.weighted_ce_sum.detach(), hidden.grad.clone(), rows.grad.clone(), parts.ce)
    (total, grad_h, grad_rows, ce), (total_ref, grad_h_ref, grad_rows_ref, ce_ref) = results.values()
    assert total.item() == pytest.approx(total_ref.item(), rel=1e-6)
    assert torch.allclose(ce, ce_ref, atol=1e-5)
    assert torch.allclose(grad_h, grad_h_ref, atol=1e-6)
    assert torch.allclose(grad_rows, grad_rows_ref, atol=1e-6) and grad_rows.abs().max() > 1e-3
    assert lm_head.token_adapter.base_layer.weight.grad is None  # the frozen matrix gets no gradient


@pytest.fixture(scope="module")
def lora_model(tmp_path_factory, tiny_mistral_dir):
    """The trainer's model loading with ``model.lora`` (gradient checkpointing on) on the tiny Mistral."""
    from crlft.model import load_model
    from crlft.templates import TEMPLATES
    from crlft.tokenizer import load_tokenizer

    tmp = tmp_path_factory.mktemp("lora_unit")
    base = tiny_mistral_dir
    recipe = load_recipe(write_recipe(tmp, base), ["model.lora.r=4", "model.lora.dropout=0.0",
                                                   "model.gradient_checkpointing=true"])
    tokenizer = load_tokenizer(base, TEMPLATES["openchat_3.5"])
    return recipe, load_model(recipe, tokenizer, "cpu"), tokenizer


def _row(seed: int, length: int = 96):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, 32002, (1, length), generator=generator)
    input_ids[0, ::7] = 32000  # <|end_of_turn|> as input and as target
    labels = torch.roll(input_ids, -1, dims=1)
    weights = (torch.rand(1, length, generator=generator) > 0.4).float()
    labels[weights == 0] = IGNORE_INDEX
    positions = torch.cat([torch.arange(40), torch.arange(length - 40)])[None]  # two packed conversations
    return {"input_ids": input_ids, "position_ids": positions, "labels": labels, "loss_weights": weights}


def test_training_changes_only_the_adapters_and_the_token_rows(lora_model):
    """AdamW with weight decay, five steps of the real loss: every frozen tensor stays bit-identical."""
    from crlft.model import is_gradient_checkpointing
    from crlft.schedule import build_optimizer

    recipe, model, _ = lora_model
    assert is_gradient_checkpointing(model.get_base_model())
    wrapped = WeightedLossModel(model)
    assert _fused_applicable(model.get_output_embeddings())  # LoRA keeps the fused loss
    frozen = {n: p.detach().clone() for n, p in wrapped.named_parameters() if not p.requires_grad}
    trained = {n: p.detach().clone() for n, p in wrapped.named_parameters() if p.requires_grad}
    assert frozen and all(".lora_" in n or "trainable_tokens_delta" in n for n in trained)
    optimizer = build_optimizer(wrapped, recipe, 1e-2, torch.device("cpu"))
    assert recipe.train.weight_decay > 0 and sum(len(g["params"]) for g in optimizer.param_groups) == len(trained)
    losses = []
    for step in range(5):
        parts = wrapped(_row(step % 2))
        (parts.weighted_ce_sum / parts.weights.sum()).backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(parts.weighted_ce_sum.item())
    assert losses[-1] < losses[0] - 1e-3, losses
    for name, before in frozen.items():
        assert torch.equal(dict(wrapped.named_parameters())[name], before), name
    params = dict(wrapped.named_parameters())
    for name, before in trained.items():
        if ".lora_" in name or "embed_tokens" in name:  # embed: only <|end_of_turn|>'s row gets a gradient...
            row = slice(0, 1) if "embed_tokens" in name else slice(None)  # ...<|pad_0|> is its padding_idx
            assert not torch.equal(params[name][row], before[row]), name
        else:  # lm_head rows: both new tokens are output classes
            assert (params[name] - before).abs().amax(dim=1).min() > 0, name


def test_forward_only_evaluation_through_the_wrapped_model(lora_model):
    """What a validation pass does: the same wrapped model under no_grad (fused loss, no gradients kept)."""
    _, model, _ = lora_model
    wrapped = WeightedLossModel(model)
    wrapped.eval()
    with torch.no_grad():
        evaluated = wrapped(_row(7))
    wrapped.train()
    trained = wrapped(_row(7))
    assert not evaluated.weighted_ce_sum.requires_grad
    assert evaluated.weighted_ce_sum.item() == pytest.approx(trained.weighted_ce_sum.item(), rel=1e-5)


def test_unknown_target_modules_and_tokens_are_located(lora_model):
    from transformers import AutoModelForCausalLM

    from crlft.lora import lora_config

    recipe, _, tokenizer = lora_model
    base = AutoModelForCausalLM.from_pretrained(recipe.model.base)
    bad = load_recipe(recipe.source_path, ["model.lora.target_modules=[q_proj, qkv]"])
    with pytest.raises(UserError, match=r"recipe.yaml \(model.lora.target_modules\): \['qkv'\] are not linear"):
        lora_config(bad, base, tokenizer)
    bad = load_recipe(recipe.source_path, ["model.lora.trainable_tokens=['<|nope|>']"])
    with pytest.raises(UserError, match=r"\(model.lora.trainable_tokens\): '<\|nope\|>' is not a token"):
        lora_config(bad, base, tokenizer)


def test_plan_of_the_lora_recipe_fits_one_24_gb_gpu(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(MISTRAL_7B_CONFIG))
    assert plan_main([LORA_RECIPE, f"model.base={tmp_path}", "--num_gpus", "1"]) == 0
    out = capsys.readouterr().out
    # r=16 on all 7 linear layers of 32 blocks: r·(in + out) each; plus 2 token rows in embed_tokens and lm_head.
    per_block = 16 * ((4096 + 4096) * 2 + (4096 + 1024) * 2 + (4096 + 14336) * 3)
    assert f": {32 * per_block:,} adapter parameters" in out
    trainable = 32 * per_block + 2 * 2 * 4096
    assert f"trainable: {trainable:,} of " in out
    stage2 = re.search(r"→ 2 .* (\d+\.\d) GiB +\d+\.\d GiB\n", out)
    total_gib = float(stage2.group(1))
    assert total_gib * 2**30 <= 24e9, out
    # The recipe's comment (and the README) quote this figure.
    assert f"{total_gib} GiB" in open(LORA_RECIPE).read()


def test_the_lora_benchmark_runs_are_valid_lora_recipes(tmp_path):
    """benchmarks/lora_effect.py: crlft_effect's three runs, as adapters on the given base (no run here)."""
    import sys

    sys.path.insert(0, os.path.join(REPO_ROOT, "benchmarks"))
    from lora_effect import METHODS, lora_overrides

    demo = os.path.join(REPO_ROOT, "recipes", "demo.yaml")
    seen = {}
    for method in METHODS:
        recipe = load_recipe(demo, lora_overrides(method, 1, str(tmp_path), "/base/export", 3, 90, 1e-2, 8))
        assert recipe.model.base == "/base/export" and recipe.model.create_if_missing is None
        assert (recipe.model.lora.r, recipe.model.lora.alpha) == (8, 16)
        assert recipe.train.seed == 1 and recipe.train.stop_after_steps == 90 and recipe.train.lr == 1e-2
        assert recipe.train.output_dir == str(tmp_path / f"{method}_s1")
        seen[method] = [(s.condition, s.reward) for s in recipe.data.sources]
    assert seen == {"lora_sft_all": [("", 1.0), ("", 1.0)], "lora_sft_expert": [("", 1.0)],
                    "lora_crlft": [("GPT4", 1.0), ("GPT3", 0.1)]}
