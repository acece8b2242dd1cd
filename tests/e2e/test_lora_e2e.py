"""LoRA C-RLFT end to end on the tiny Mistral (fp32, CPU ranks): four runs share every assertion.

    zero2_killed     2 ranks, ZeRO-2 (deepspeed): SIGKILLed from outside once step 8 is logged (the newest complete
                     checkpoint is then step 5's, the first epoch's end), then relaunched with train.resume=auto
    one_rank_accum   1 rank x 2 micro-batches (python -m crlft.train, a world of one): the same bins per step
    zero3            2 ranks, ZeRO-3 (deepspeed)

The data is conftest's e2e set: 5 steps of 2 rows x 256 tokens per epoch, 2 epochs, the fifth step of each epoch
holding one row (one rank, or the second micro-batch, trains on an empty bin). 1 rank x 2 micro-batches and
2 ranks x 1 see the same bins, so the three runs must agree step for step (the same tolerance as full
fine-tuning's parity test, with gradient clipping off and AdamW's eps at 1e-3 so that a wrong gradient scale
shows). The relaunch re-does steps 6-8, which the killed run had logged: they must be bit-identical.
"""

import json
import os

import pytest
import torch
from helpers import (
    E2E_SETTINGS,
    END_OF_TURN_ID,
    PAD_ID,
    load_safetensors_dir,
    prepare_recipe,
    read_metrics,
    run_deepspeed,
    run_deepspeed_killed_after_step,
    start_deepspeed,
    start_single,
    write_recipe,
)

pytestmark = pytest.mark.slow

TOLERANCE = 1e-5
KILL_AFTER_STEP = 8
RESUMED_FROM_STEP = 5  # the epoch end: no checkpoint in between (save_every_steps null)
NEW_TOKENS = (END_OF_TURN_ID, PAD_ID)
LORA = ("model.lora.r=4", "model.lora.alpha=8", "model.lora.dropout=0.0")


@pytest.fixture(scope="module")
def lora_recipe(tmp_path_factory, tiny_mistral_dir):
    tmp = tmp_path_factory.mktemp("lora")
    settings = {**E2E_SETTINGS, "epochs": 2, "save_every_steps": None}
    recipe = write_recipe(tmp, tiny_mistral_dir, lr=1e-2, grad_clip=0.0, eps=1e-3, **settings)
    prepare_recipe(recipe)
    return recipe, tmp


@pytest.fixture(scope="module")
def runs(lora_recipe):
    recipe, tmp = lora_recipe
    out = {name: str(tmp / name) for name in ("zero2", "one_rank_accum", "zero3")}
    # The two comparison runs are independent of the killed one: started first, they run beside it.
    others = [start_single(recipe, (f"train.output_dir={out['one_rank_accum']}", "train.grad_accum=2", *LORA)),
              start_deepspeed(recipe, (f"train.output_dir={out['zero3']}", "deepspeed.zero_stage=3", *LORA))]
    killed = run_deepspeed_killed_after_step(recipe, (f"train.output_dir={out['zero2']}", *LORA), out["zero2"],
                                             KILL_AFTER_STEP)
    at_kill = read_metrics(out["zero2"])
    relaunch = run_deepspeed(recipe, (f"train.output_dir={out['zero2']}", "train.resume=auto", *LORA))
    for launch in others:
        launch.wait()
    return {"dirs": out, "killed_returncode": killed, "at_kill": at_kill,
            "log": relaunch.stdout + relaunch.stderr, "metrics": {k: read_metrics(d) for k, d in out.items()}}


def _final(run_dir: str) -> str:
    return os.path.join(run_dir, "export", "final")


def test_the_log_gives_trainable_and_total_parameters(runs):
    log = runs["log"]
    # 2 layers x r=4 x (in + out) of q, k, v, o (64+64, 64+32, 64+32, 64+64), gate, up (64+128) and down (128+64).
    adapters = 2 * 4 * (128 + 96 + 96 + 128 + 192 + 192 + 192)
    token_rows = 2 * 2 * 64  # two tokens, input and (untied) output rows, hidden 64
    assert f"parameters: {adapters + token_rows:,} trainable of " in log
    assert f"{adapters:,} in the adapters, {token_rows:,} in the token rows" in log
    assert "LoRA: r=4, alpha=8, dropout=0 on down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj" in log


def test_loss_falls_with_per_condition_metrics(runs):
    metrics = runs["metrics"]["zero2"]
    assert [m["step"] for m in metrics] == list(range(1, 11))
    losses = [m["loss"] for m in metrics]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3, losses
    assert all(any(k.startswith("loss/GPT4 Correct") for k in m) for m in metrics)


def test_kill_and_resume_redoes_the_lost_steps_bit_for_bit(runs):
    at_kill = runs["at_kill"]
    assert runs["killed_returncode"] != 0
    assert [m["step"] for m in at_kill] == list(range(1, KILL_AFTER_STEP + 1))
    resumed_from = os.path.join(runs["dirs"]["zero2"], "checkpoints", f"step_{RESUMED_FROM_STEP:08d}")
    assert f"resumed from {resumed_from}" in runs["log"]
    metrics = runs["metrics"]["zero2"]
    for before, after in zip(at_kill[RESUMED_FROM_STEP:], metrics[RESUMED_FROM_STEP:KILL_AFTER_STEP]):
        assert after["step"] == before["step"]
        assert after["loss"] == before["loss"] and after["grad_norm"] == before["grad_norm"], after["step"]
        assert after["num_tokens"] == before["num_tokens"]


def test_checkpoints_hold_only_what_trains(runs):
    from crlft.checkpoint import latest_checkpoint

    checkpoint = latest_checkpoint(runs["dirs"]["zero2"])
    module = torch.load(os.path.join(checkpoint, "mp_rank_00_model_states.pt"), weights_only=False)["module"]
    assert module and all(".lora_" in k or "trainable_tokens_delta" in k for k in module), sorted(module)[:5]
    assert os.path.isfile(os.path.join(checkpoint, "hf", "adapter_config.json"))


@pytest.mark.parametrize("other", ["one_rank_accum", "zero3"])
def test_one_rank_with_accumulation_and_zero3_match_two_ranks(runs, other):
    reference, metrics = runs["metrics"]["zero2"], runs["metrics"][other]
    assert [m["step"] for m in metrics] == [m["step"] for m in reference]
    for ours, theirs in zip(metrics, reference):
        assert ours["loss"] == pytest.approx(theirs["loss"], abs=TOLERANCE), ours["step"]
        assert ours["supervised_tokens"] == theirs["supervised_tokens"]
    ours = load_safetensors_dir(os.path.join(_final(runs["dirs"][other]), "adapter"))
    theirs = load_safetensors_dir(os.path.join(_final(runs["dirs"]["zero2"]), "adapter"))
    assert set(ours) == set(theirs)
    worst = max((ours[k] - theirs[k]).abs().max().item() for k in theirs)
    assert worst <= TOLERANCE, f"{other}: adapter weights differ by up to {worst:.3g}"


def test_only_the_adapters_and_the_new_token_rows_changed(runs, tiny_mistral_dir):
    """Against the base: the merged model differs only in adapted linear layers and in the new tokens' rows."""
    base = load_safetensors_dir(tiny_mistral_dir)
    merged = load_safetensors_dir(_final(runs["dirs"]["zero2"]))
    adapter = load_safetensors_dir(os.path.join(_final(runs["dirs"]["zero2"]), "adapter"))
    assert set(merged) == set(base)
    new = list(NEW_TOKENS)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        old_rows = torch.ones(base[name].shape[0], dtype=torch.bool)
        old_rows[new] = False
        assert torch.equal(merged[name][old_rows], base[name][old_rows]), name  # bit-identical
        # The input embedding's <|pad_0|> row is its padding_idx: zero and without gradient, as in full fine-tuning.
        trained = new if name == "lm_head.weight" else [END_OF_TURN_ID]
        assert (merged[name][trained] - base[name][trained]).abs().amax(dim=1).min() > 1e-4, name
    adapted = [k for k in base if k.endswith("proj.weight")]
    assert len(adapted) == 2 * 7
    for name in base:
        if name in adapted:
            moved = (merged[name] - base[name]).abs().max().item()
            assert moved > 1e-4, name  # the adapter's update, merged in
        elif name not in ("model.embed_tokens.weight", "lm_head.weight"):
            assert torch.equal(merged[name], base[name]), name  # norms: untouched
    assert all(".lora_A." in k or ".lora_B." in k or "trainable_tokens_delta" in k for k in adapter)
    assert max(v.abs().max().item() for k, v in adapter.items() if ".lora_B." in k) > 1e-4  # B left zero


def test_merged_export_logits_equal_base_plus_adapter_with_plain_peft(runs, tiny_mistral_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    final = _final(runs["dirs"]["zero2"])
    config = json.loads(open(os.path.join(final, "adapter", "adapter_config.json")).read())
    assert config["base_model_name_or_path"] == os.path.abspath(tiny_mistral_dir)
    assert not os.path.exists(os.path.join(final, "adapter_config.json"))  # the merged model is a plain model
    merged = AutoModelForCausalLM.from_pretrained(final).eval()
    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_mistral_dir),
                                             os.path.join(final, "adapter")).eval()
    ids = torch.tensor([[1, 420, 6316, 28781, 3198, 3123, 1247, 28747, 22557, END_OF_TURN_ID, 420, PAD_ID, 28747]])
    with torch.no_grad():
        a, b = merged(ids).logits, with_adapter(ids).logits
        plain = AutoModelForCausalLM.from_pretrained(tiny_mistral_dir).eval()(ids).logits
    assert (a - b).abs().max().item() <= 1e-5
    assert (a - plain).abs().max().item() > 1e-3  # and the adapter does change them
    assert merged.generation_config.eos_token_id == END_OF_TURN_ID


def test_crlft_export_and_chat_handle_the_merged_model_and_the_adapter(runs, tmp_path, capsys):
    from crlft.checkpoint import latest_checkpoint
    from crlft.cli import main

    final = _final(runs["dirs"]["zero2"])
    out = tmp_path / "again"
    assert main(["export", latest_checkpoint(runs["dirs"]["zero2"]), str(out)]) == 0
    again, before = load_safetensors_dir(str(out)), load_safetensors_dir(final)
    assert set(again) == set(before) and all(torch.equal(again[k], before[k]) for k in before)
    capsys.readouterr()
    answers = []
    for model_dir in (final, os.path.join(final, "adapter")):
        assert main(["chat", model_dir, "--prompt", "Repeat: red cat", "--max-new-tokens", "4"]) == 0
        answers.append(capsys.readouterr().out)
    assert answers[0] == answers[1]  # greedy: the merged model and base + adapter say the same
