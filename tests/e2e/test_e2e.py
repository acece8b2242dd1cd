"""End-to-end on CPU: a tiny random Mistral with the real OpenChat 3.5 tokenizer, 2 DeepSpeed ranks, ZeRO-2 and
ZeRO-3: the loss falls, checkpoints and exports are written, the export loads with ``AutoModelForCausalLM`` and
generates, and its tokenizer reproduces the model card's ids.

ZeRO-2 (fp32) runs through ``launch.sh`` (prepare + DeepSpeed launcher); ZeRO-3 (bf16, the default dtype) through
``deepspeed --num_gpus 2 --module crlft.train`` directly. That ZeRO-2 and ZeRO-3 compute the same update is shown
exactly (fp32) in test_parity.py.
"""

import json
import math
import os

import pytest
import torch
from helpers import (
    CARD_MESSAGES,
    CARD_MULTI_TURN_IDS,
    E2E_EPOCHS,
    END_OF_TURN_ID,
    PAD_ID,
    load_safetensors_dir,
    read_metrics,
    wandb_history,
)

from crlft.dist import shm_buffer_path

pytestmark = pytest.mark.slow

EPOCHS = E2E_EPOCHS
CARD_SINGLE_TURN = "GPT4 Correct User: Hello<|end_of_turn|>GPT4 Correct Assistant:"
CARD_SINGLE_TURN_IDS = [1, 420, 6316, 28781, 3198, 3123, 1247, 28747, 22557, 32000, 420, 6316, 28781, 3198, 3123,
                        21631, 28747]


@pytest.fixture(scope="module")
def zero2_run(zero2_e2e_run):
    """ZeRO-2, fp32, through launch.sh (conftest: shared with test_resume.py as its uninterrupted run)."""
    return zero2_e2e_run


@pytest.fixture(scope="module")
def zero3_run(zero3_e2e_run):
    """ZeRO-3, bf16, `deepspeed --num_gpus 2 --module crlft.train` (conftest: shared with test_validation.py)."""
    return zero3_e2e_run


@pytest.fixture(params=["zero2", "zero3"])
def run(request):
    return request.getfixturevalue(f"{request.param}_run")


def test_launch_sh_prepared_the_data_and_used_two_cpu_ranks(zero2_run):
    assert "no CUDA; DeepSpeed CPU accelerator with 2 ranks per node" in zero2_run["log"]
    assert "wrote 50 rows" in zero2_run["log"]  # crlft prepare's report, before DeepSpeed started


def test_wandb_offline_run_written_without_network(zero3_run):
    wandb_dir = os.path.join(zero3_run["dir"], "wandb")
    runs = [d for d in os.listdir(wandb_dir) if d.startswith("offline-run-")]
    assert len(runs) == 1
    files = os.listdir(os.path.join(wandb_dir, runs[0]))
    data = [f for f in files if f.endswith(".wandb")]
    assert data and os.path.getsize(os.path.join(wandb_dir, runs[0], data[0])) > 0


def test_no_shared_memory_left_behind(zero3_run):
    # DeepSpeed's CPU all-reduce makes a 66 MB /dev/shm file per rank and never removes it (crlft.dist unlinks it).
    leftovers = [shm_buffer_path(rank, "127.0.0.1", str(zero3_run["master_port"])) for rank in range(2)]
    assert [p for p in leftovers if os.path.exists(p)] == []
def test_wandb_gets_every_step_whatever_log_every(zero3_run):
    rows = wandb_history(zero3_run["dir"])
    assert [int(row["_step"]) for row in rows] == list(range(1, 16))
    metrics = read_metrics(zero3_run["dir"])
    assert [float(row["loss"]) for row in rows] == pytest.approx([m["loss"] for m in metrics])
    printed = [line for line in zero3_run["log"].splitlines() if line.startswith("step ")]
    # log_every=100: only the last step and the steps that evaluated the held-out split are printed.
    expected = [f"{m['step']}/15" for m in metrics if "eval_loss" in m or m["step"] == 15]
    assert [line.split()[1] for line in printed] == expected and len(expected) < 15


def test_loss_falls_and_every_step_is_logged(run):
    metrics = read_metrics(run["dir"])
    steps = [m["step"] for m in metrics]
    assert steps == list(range(1, len(metrics) + 1))
    assert 10 <= len(metrics) <= 20
    assert metrics[-1]["epoch"] == pytest.approx(EPOCHS)
    for m in metrics:
        for key in ("epoch", "loss", "lr", "num_tokens", "tokens_per_s", "weighted_accuracy", "grad_norm"):
            assert key in m, key
        assert any(k.startswith("loss/GPT4 Correct") for k in m) or any(k.startswith("loss/GPT3") for k in m)
    losses = [m["loss"] for m in metrics]
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < first - 1.0, losses
    # linear warm-up then cosine down to lr · lr_min_ratio (0.1) at the last step
    assert metrics[0]["lr"] < metrics[1]["lr"]
    assert metrics[-1]["lr"] == pytest.approx(2e-3 * 0.1, rel=1e-4)


def test_a_rank_with_an_empty_bin_stays_in_step(run):
    """Each epoch's last step holds one row of left-overs (65-89 tokens): rank 1 trains on a zero-weight padding
    row (forward, backward, collectives like everyone) and the run goes on."""
    metrics = read_metrics(run["dir"])
    epoch_ends = [m for m in metrics if float(m["epoch"]).is_integer()]
    assert len(epoch_ends) == EPOCHS
    assert all(m["num_tokens"] <= 256 for m in epoch_ends)  # at most one row of 256: the other bin was empty
    assert all(math.isfinite(m["loss"]) and m["supervised_tokens"] > 0 for m in epoch_ends)


def test_checkpoints_are_complete_and_pruned(run):
    from crlft.checkpoint import list_checkpoints

    steps = [m["step"] for m in read_metrics(run["dir"])]
    kept = list_checkpoints(run["dir"])
    assert [s for s, _ in kept][-1] == steps[-1]
    assert len(kept) == 2  # keep_last
    names = sorted(os.listdir(kept[-1][1]))
    for expected in ("COMPLETE", "trainer_state.json", "rng_state_rank0.json", "rng_state_rank1.json", "hf"):
        assert expected in names
    assert any(name.endswith("model_states.pt") for name in names)
    assert sum(name.endswith("_optim_states.pt") for name in names) == 2  # one ZeRO shard per rank
    assert not [n for n in os.listdir(os.path.join(run["dir"], "checkpoints")) if n.endswith(".tmp")]


def test_exports_every_epoch_and_final(run):
    export_dir = os.path.join(run["dir"], "export")
    assert sorted(os.listdir(export_dir)) == [*(f"epoch_{k}" for k in range(1, EPOCHS + 1)), "final"]
    final = load_safetensors_dir(os.path.join(export_dir, "final"))
    last_epoch = load_safetensors_dir(os.path.join(export_dir, f"epoch_{EPOCHS}"))
    first_epoch = load_safetensors_dir(os.path.join(export_dir, "epoch_1"))
    assert all(torch.equal(final[k], last_epoch[k]) for k in final)
    assert not all(torch.equal(final[k], first_epoch[k]) for k in final)


def test_export_loads_generates_and_has_the_model_cards_chat_template(run):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    final = os.path.join(run["dir"], "export", "final")
    tokenizer = AutoTokenizer.from_pretrained(final)
    assert tokenizer.apply_chat_template(CARD_MESSAGES, add_generation_prompt=True, tokenize=True,
                                         return_dict=False) == CARD_MULTI_TURN_IDS
    assert tokenizer(CARD_SINGLE_TURN).input_ids == CARD_SINGLE_TURN_IDS
    generation = GenerationConfig.from_pretrained(final)
    assert generation.eos_token_id == END_OF_TURN_ID
    assert generation.pad_token_id == PAD_ID
    model = AutoModelForCausalLM.from_pretrained(final)
    assert model.config.vocab_size == 32002
    assert next(model.parameters()).dtype == getattr(torch, run["dtype"])  # exported in the training dtype
    prompt = torch.tensor([CARD_MULTI_TURN_IDS])
    out = model.generate(prompt, max_new_tokens=6, do_sample=False)
    assert out.shape[0] == 1 and prompt.shape[1] < out.shape[1] <= prompt.shape[1] + 6
    assert torch.equal(out[0, : prompt.shape[1]], prompt[0])


def test_export_config_stops_at_the_end_of_turn_without_a_generation_config(run, tmp_path):
    """As OpenChat's release: config.json has eos = <|end_of_turn|> and max_position_embeddings = max_context."""
    import shutil

    from transformers import AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList

    final = os.path.join(run["dir"], "export", "final")
    config = json.loads(open(os.path.join(final, "config.json")).read())
    assert config["eos_token_id"] == END_OF_TURN_ID
    assert config["max_position_embeddings"] == 256  # the recipe's max_context (the base has 1024)
    bare = tmp_path / "no_generation_config"
    shutil.copytree(final, bare, ignore=shutil.ignore_patterns("generation_config.json"))
    model = AutoModelForCausalLM.from_pretrained(bare)
    prompt = torch.tensor([CARD_MULTI_TURN_IDS])

    class EndOfTurnAtThirdToken(LogitsProcessor):
        def __call__(self, input_ids, scores):
            if input_ids.shape[1] == prompt.shape[1] + 2:
                scores[:] = -math.inf
                scores[:, END_OF_TURN_ID] = 0.0
            return scores

    out = model.generate(prompt, max_new_tokens=10, do_sample=False,
                         logits_processor=LogitsProcessorList([EndOfTurnAtThirdToken()]))
    assert out.shape[1] == prompt.shape[1] + 3 and out[0, -1].item() == END_OF_TURN_ID  # stopped there


def test_crlft_export_rebuilds_the_final_export_from_the_checkpoint(run, tmp_path):
    from crlft.checkpoint import latest_checkpoint
    from crlft.cli import main

    out = tmp_path / "exported"
    assert main(["export", latest_checkpoint(run["dir"]), str(out)]) == 0
    again = load_safetensors_dir(str(out))
    final = load_safetensors_dir(os.path.join(run["dir"], "export", "final"))
    assert set(again) == set(final)
    assert all(torch.equal(again[k], final[k]) for k in final)
    info = json.loads((out / "crlft_export.json").read_text())
    assert info["step"] == read_metrics(run["dir"])[-1]["step"]
    # a run directory works too (its newest checkpoint)
    assert main(["export", run["dir"], str(tmp_path / "from_run")]) == 0
