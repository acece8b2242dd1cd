"""Validation during training: the held-out split ``crlft prepare`` writes, and the trainer's evaluation of it.

* The split (in this process): ``data.eval_fraction`` holds out a seeded share of every source, never trained on
  (disjoint by ``(source, index)``), the same when prepared again, rows rendered exactly as training rows.
* The evaluator (in this process, no DeepSpeed): its sums over the ranks' shares equal one rank's, and equal an
  independent recomputation with plain transformers; it draws no RNG, computes no gradients, restores train mode.
* The runs (conftest's ``zero2_e2e_run``, fp32, and ``zero3_e2e_run``, bf16, both with two held-out files
  evaluated every 4 steps): records at the right steps; the last ``eval_loss`` equals a recomputation from the
  final export (plain transformers, fp32, each held-out conversation alone) to 1e-5; and a run of the same recipe
  with evaluation off logs bit-identical training losses. The resume test (test_resume.py) checks that a killed
  and resumed run logs the same eval records.
"""

import json
import os
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import E2E_EVAL_STEPS, load_safetensors_dir, prepare_recipe, read_metrics, run_deepspeed, write_recipe

pytestmark = pytest.mark.slow

FRACTION = 0.25


def recompute_from_export(export_dir: str, eval_split) -> dict[str, float]:
    """``Σ w·CE / Σ w`` over the split, overall and per condition: plain transformers, fp32, one conversation at a
    time, no packing; the prepared weights shifted as in training (``loss_weights[t + 1]`` weighs predicting token
    ``t + 1`` from position ``t``)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(export_dir, dtype=torch.float32, attn_implementation="eager").eval()
    sums: dict[str, list[float]] = {}
    with torch.no_grad():
        for row in eval_split:
            ids = torch.tensor(row["input_ids"], dtype=torch.long)[None]
            weights = torch.tensor(row["loss_weights"], dtype=torch.float32)[1:].double()
            logits = model(input_ids=ids).logits[0, :-1].float()
            ce = F.cross_entropy(logits, ids[0, 1:], reduction="none").double()
            for key in ("", row["condition"]):
                entry = sums.setdefault(key, [0.0, 0.0])
                entry[0] += float((weights * ce).sum())
                entry[1] += float(weights.sum())
    return {key: num / den for key, (num, den) in sums.items()}


def eval_records(run_dir: str) -> list[dict]:
    return [m for m in read_metrics(run_dir) if "eval_loss" in m]


# --------------------------------------------------------------------------------------------------------------
# The split
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def held_out(tmp_path_factory, tiny_mistral_dir):
    """Prepared with ``eval_fraction`` 0.25 (34 + 16 conversations), then prepared again from scratch."""
    import datasets

    from crlft.prepare import REPORT_FILE
    from crlft.split import load_eval_split

    tmp = tmp_path_factory.mktemp("held_out")
    recipe = write_recipe(tmp, tiny_mistral_dir, num_good=34, num_bad=16, data_seed=5)
    prepare_recipe(recipe, (f"data.eval_fraction={FRACTION}",))
    data = str(tmp / "data")
    first = {"train": datasets.load_from_disk(data), "eval": load_eval_split(data),
             "report": json.loads(open(os.path.join(data, REPORT_FILE)).read())}
    prepare_recipe(recipe, (f"data.eval_fraction={FRACTION}", f"data.output_dir={tmp / 'again'}"))
    again = load_eval_split(str(tmp / "again"))
    none = tmp / "none"
    prepare_recipe(recipe, (f"data.output_dir={none}",))
    return {**first, "again": again, "all": datasets.load_from_disk(str(none)), "no_split": load_eval_split(str(none)),
            "recipe": recipe}


def keys(dataset) -> list[tuple[str, int]]:
    return list(zip(dataset["source"], dataset["index"]))


def test_held_out_rows_are_never_trained_on(held_out):
    train, held = set(keys(held_out["train"])), set(keys(held_out["eval"]))
    assert train.isdisjoint(held)
    assert train | held == set(keys(held_out["all"]))  # together: every conversation of the sources


def test_each_source_holds_out_its_share_chosen_by_seed(held_out):
    held = keys(held_out["eval"])
    assert sorted(i for s, i in held if s == "gpt4") != sorted(i for s, i in held if s == "gpt3")  # per source
    assert sum(s == "gpt4" for s, _ in held) == round(FRACTION * 34)
    assert sum(s == "gpt3" for s, _ in held) == round(FRACTION * 16)
    assert keys(held_out["again"]) == held  # prepared again: the same conversations
    assert held_out["no_split"] is None  # no fraction, no eval_sources: no split


def test_held_out_rows_are_rendered_like_training_rows(held_out):
    reference = {k: row for k, row in zip(keys(held_out["all"]), held_out["all"])}
    for key, row in zip(keys(held_out["eval"]), held_out["eval"]):
        assert row == reference[key]  # ids, weights, length, condition: the same rendering and weighting


def test_report_has_a_section_per_split(held_out):
    report = held_out["report"]
    assert report["total"]["kept"] == len(held_out["train"])
    assert report["eval"]["total"]["kept"] == len(held_out["eval"])
    assert report["total"]["read"] + report["eval"]["total"]["read"] == 50
    assert {g["source"] for g in report["eval"]["groups"]} == {"gpt4", "gpt3"}


def test_plan_counts_the_held_out_conversations(held_out):
    from crlft.plan import plan_text
    from crlft.recipe import load_recipe

    recipe = load_recipe(held_out["recipe"], [f"data.eval_fraction={FRACTION}", "train.eval_every_steps=2"])
    text = plan_text(recipe, 2)
    tokens = sum(held_out["eval"]["length"])
    assert f"eval split: {len(held_out['eval'])} held-out conversations, {tokens:,} tokens" in text


# --------------------------------------------------------------------------------------------------------------
# The evaluator, in this process
# --------------------------------------------------------------------------------------------------------------


class EngineStandIn:
    """What ``Evaluator.evaluate`` uses of a DeepSpeed engine."""

    def __init__(self, module):
        self.module = module

    def __call__(self, batch, **kwargs):
        return self.module(batch, **kwargs)

    def eval(self):
        self.module.train(False)

    def train(self, mode=True):
        self.module.train(mode)


@pytest.fixture
def world_of_one():
    from crlft.dist import free_port

    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield
    torch.distributed.destroy_process_group()


def test_evaluator_matches_a_recomputation_and_leaves_training_alone(held_out, tiny_mistral_dir, world_of_one):
    from crlft.evaluation import Evaluator
    from crlft.loss import WeightedLossModel
    from crlft.model import load_model
    from crlft.recipe import load_recipe
    from crlft.templates import TEMPLATES
    from crlft.tokenizer import load_tokenizer

    recipe = load_recipe(held_out["recipe"])
    model = load_model(recipe, load_tokenizer(tiny_mistral_dir, TEMPLATES["openchat_3.5"]), torch.device("cpu"))
    wrapped = WeightedLossModel(model).train()
    split = held_out["eval"]
    settings = {"max_tokens": 256, "pad_to_multiple_of": 64, "pad_token_id": 32001, "every_steps": None}
    one = Evaluator(split, world_size=1, rank=0, **settings)
    shares = [Evaluator(split, world_size=2, rank=r, **settings) for r in (0, 1)]
    device = torch.device("cpu")

    rng_before = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    metrics = one.evaluate(EngineStandIn(wrapped), device)
    assert torch.equal(rng_before[0], torch.get_rng_state())
    assert np.array_equal(rng_before[1], np.random.get_state()[1]) and rng_before[2] == random.getstate()
    assert wrapped.training  # train mode restored
    assert all(p.grad is None for p in wrapped.parameters())  # no gradient work

    split_sums = sum(e.local_sums(wrapped, device) for e in shares)  # each rank's share, summed: the same split
    assert torch.allclose(split_sums, one.local_sums(wrapped, device), rtol=1e-6, atol=0)
    plan = shares[0].loader._epoch_totals(0).plan
    assert sorted(np.concatenate([b for step in plan for b in step]).tolist()) == list(range(len(split)))  # once each
    assert shares[0].rows_per_rank == shares[1].rows_per_rank == plan.num_steps  # ranks stay in step

    model.save_pretrained(held_out["recipe"] + ".model")
    expected = recompute_from_export(held_out["recipe"] + ".model", split)
    assert metrics["eval_loss"] == pytest.approx(expected[""], rel=1e-5)
    assert metrics["eval_loss/GPT4 Correct"] == pytest.approx(expected["GPT4 Correct"], rel=1e-5)
    assert metrics["eval_loss/GPT3"] == pytest.approx(expected["GPT3"], rel=1e-5)
    assert metrics["eval_tokens"] == sum(int((np.asarray(w[1:]) > 0).sum()) for w in split["loss_weights"])
    assert metrics["eval_num_tokens"] == sum(split["length"])
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0


# --------------------------------------------------------------------------------------------------------------
# The DeepSpeed runs
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def without_evaluation(zero2_e2e_run):
    """The reference run's recipe and data with evaluation off, for its first epoch (the reference evaluates after
    steps 4 and 5, so step 5 trains after an evaluation); one checkpoint, at the end."""
    out = os.path.join(os.path.dirname(zero2_e2e_run["dir"]), "run_without_eval")
    run_deepspeed(zero2_e2e_run["recipe"], (f"train.output_dir={out}", "train.eval_every_steps=0",
                                            "train.stop_after_steps=5", "train.save_every_steps=null"))
    return out


def test_training_losses_with_and_without_evaluation_are_identical(zero2_e2e_run, without_evaluation):
    ours = read_metrics(without_evaluation)
    reference = read_metrics(zero2_e2e_run["dir"])[: len(ours)]
    assert len(ours) == 5 and not eval_records(without_evaluation)
    for key in ("loss", "grad_norm", "num_tokens", "lr", "weighted_accuracy"):
        assert [m[key] for m in ours] == [m[key] for m in reference], key  # exactly: same batches, same updates
    assert [m["step"] for m in eval_records(zero2_e2e_run["dir"])][:2] == [4, 5]  # evaluations were in between


@pytest.fixture(params=["zero2", "zero3"])
def run_with_eval(request):
    return request.getfixturevalue(f"{request.param}_e2e_run")


def test_evaluations_at_every_4_steps_and_each_epoch_end(run_with_eval):
    records = eval_records(run_with_eval["dir"])
    assert [m["step"] for m in records] == E2E_EVAL_STEPS
    for m in records:
        assert m["eval_num_tokens"] > m["eval_tokens"] > 0 and len(m["eval_split"]) > 8
        assert {"eval_loss/GPT4 Correct", "eval_loss/GPT3", "eval_accuracy"} <= set(m)
    assert len({m["eval_split"] for m in records}) == 1
    losses = [m["eval_loss"] for m in records]
    assert losses[-1] < losses[0] - 0.5, losses  # it learns the held-out conversations' pattern too
    assert "eval after step 4: loss" in run_with_eval["log"]


def test_last_eval_loss_equals_a_recomputation_from_the_final_export(run_with_eval):
    from crlft.recipe import load_recipe
    from crlft.split import load_eval_split

    recipe = load_recipe(run_with_eval["recipe"])
    split = load_eval_split(recipe.data.output_dir)
    last = eval_records(run_with_eval["dir"])[-1]
    expected = recompute_from_export(os.path.join(run_with_eval["dir"], "export", "final"), split)
    # fp32 training: the same numbers to 1e-5. bf16 (ZeRO-3): the trainer evaluates in bf16 like it trains, the
    # recomputation in fp32 from the bf16 weights; they agree to bf16's precision.
    tolerance = 1e-5 if run_with_eval["dtype"] == "float32" else 2e-2
    assert last["eval_loss"] == pytest.approx(expected[""], rel=tolerance)
    for condition in ("GPT4 Correct", "GPT3"):
        assert last[f"eval_loss/{condition}"] == pytest.approx(expected[condition], rel=tolerance)
    assert set(load_safetensors_dir(os.path.join(run_with_eval["dir"], "export", "final")))  # the export exists
