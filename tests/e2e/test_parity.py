"""The same global batch gives the same loss and the same update whatever the ranks, the accumulation or the ZeRO
stage (fp32, tolerance 1e-5).

The data is small enough that one optimizer step holds *all* of it in every configuration below, so every
configuration trains on exactly the same global batch, split differently:

    one_rank_two_micro     1 rank  x 2 micro-batches x 256 tokens   (python -m crlft.train, no launcher)
    one_rank_one_micro     1 rank  x 1 micro-batch   x 512 tokens   (python -m crlft.train, no launcher)
    two_ranks_zero2        2 ranks x 1 micro-batch   x 256 tokens   (deepspeed, ZeRO-2)
    two_ranks_zero3        2 ranks x 1 micro-batch   x 256 tokens   (deepspeed, ZeRO-3)

Two epochs = two steps: step 1's loss checks the forward and the global normalisation, step 2's loss and the
final weights check the gradients. Gradient clipping is off and AdamW's eps is raised to 1e-3 (about the size of
this model's gradient entries) so the update depends on the gradient's scale, not only on its sign: a wrong
factor in the loss scaling (e.g. DeepSpeed's averaging over ranks or accumulation steps not undone) changes the
weights by far more than 1e-5.
"""


import numpy as np
import pytest
import torch
from helpers import load_safetensors_dir, prepare_recipe, train_together, write_recipe

pytestmark = pytest.mark.slow

TOLERANCE = 1e-5
CONFIGS = {
    "one_rank_two_micro": {"ranks": 1, "overrides": ("train.grad_accum=2", "train.batch_max_len=256")},
    "one_rank_one_micro": {"ranks": 1, "overrides": ("train.grad_accum=1", "train.batch_max_len=512")},
    "two_ranks_zero2": {"ranks": 2, "overrides": ("train.grad_accum=1", "train.batch_max_len=256")},
    "two_ranks_zero3": {"ranks": 2, "overrides": ("train.grad_accum=1", "train.batch_max_len=256",
                                                  "deepspeed.zero_stage=3")},
}


@pytest.fixture(scope="module")
def parity_recipe(tmp_path_factory, tiny_mistral_dir):
    tmp = tmp_path_factory.mktemp("parity")
    recipe = write_recipe(tmp, tiny_mistral_dir, num_good=6, num_bad=3, data_seed=7, epochs=2, lr=1e-3,
                          grad_clip=0.0, eps=1e-3, lr_warmup_ratio=0.0, save_every_steps=None)
    prepare_recipe(recipe)
    return recipe, tmp


@pytest.fixture(scope="module")
def runs(parity_recipe):
    """Every configuration's metrics and final weights; the four runs are started together."""
    recipe, tmp = parity_recipe
    return train_together(recipe, tmp, {name: (c["ranks"], c["overrides"]) for name, c in CONFIGS.items()})


def test_every_configuration_sees_the_whole_dataset_in_one_step(parity_recipe):
    """The premise: the plan of every configuration is one step per epoch (else the batches would differ)."""
    from crlft.packing import plan_epoch
    from crlft.prepare import load_prepared
    from crlft.recipe import load_recipe

    recipe, _ = parity_recipe
    dataset = load_prepared(load_recipe(recipe), check=False)
    lengths = np.array(dataset["length"])
    for ranks, accum, max_tokens in ((1, 2, 256), (1, 1, 512), (2, 1, 256)):
        for epoch in (0, 1):
            plan = plan_epoch(lengths, max_tokens, ranks * accum, seed=42, epoch=epoch)
            assert len(plan) == 1, (ranks, accum, max_tokens, lengths.sum())
            assert all(len(b) > 0 for b in plan[0])  # no empty bin: every micro-batch has real work


@pytest.mark.parametrize("name", [n for n in CONFIGS if n != "one_rank_two_micro"])
def test_same_losses_and_weights_as_one_rank_with_two_micro_batches(runs, name):
    reference, other = runs["one_rank_two_micro"], runs[name]
    assert [m["step"] for m in other["metrics"]] == [1, 2]
    for ref_step, step in zip(reference["metrics"], other["metrics"]):
        assert step["loss"] == pytest.approx(ref_step["loss"], abs=TOLERANCE)
        assert step["supervised_tokens"] == ref_step["supervised_tokens"]
        assert step["weight_sum"] == pytest.approx(ref_step["weight_sum"], rel=1e-6)
    assert set(other["weights"]) == set(reference["weights"])
    worst = max((other["weights"][k] - reference["weights"][k]).abs().max().item() for k in reference["weights"])
    assert worst <= TOLERANCE, f"{name}: weights differ by up to {worst:.3g}"


def test_the_update_is_not_trivially_equal(runs, tiny_mistral_dir):
    """The check above is meaningful: the step moved the weights by far more than the tolerance."""
    base = load_safetensors_dir(tiny_mistral_dir)
    trained = runs["one_rank_two_micro"]["weights"]
    moved = max((trained[k] - base[k]).abs().max().item() for k in base)
    assert moved > 50 * TOLERANCE
    # and a scaling error would show: a 2x larger gradient moves AdamW's update this much at eps=1e-3
    g = torch.tensor([1e-3])
    assert (1e-3 * (2 * g / (2 * g + 1e-3) - g / (g + 1e-3))).item() > 10 * TOLERANCE
