"""``weight_sum_row_mean`` is OpenChat's loss as 3.5 was trained: the ``weight_sum`` loss divided by the rows of a step.

Under AdamW that rescaling is the same as multiplying ``eps`` and the clipping threshold by the number of rows (8
here, as the recorded run's 8 ranks): ``m / (sqrt(v) + eps)`` with a gradient ``g / R`` equals ``m / (sqrt(v) + R·eps)``
with ``g``; weight decay is decoupled. So a ``weight_sum_row_mean`` run with ``eps`` 1e-5 and ``grad_clip`` 1.0 must
end with the weights of a ``weight_sum`` run with ``eps`` 8e-5 and ``grad_clip`` 8.0, and log a loss 8x smaller;
a ``weight_sum`` run with ``eps`` 1e-5 must end elsewhere (the check can fail). fp32, two epochs of one step each.

The ``weight_sum_row_mean`` run has 2 ranks x ``grad_accum`` 4 (DeepSpeed), the two ``weight_sum`` runs 1 rank x
``grad_accum`` 8 (``python -m crlft.train``): the same 8 rows per step, so the same bins, and test_parity.py shows
that ``weight_sum`` gives one update whatever the ranks and the accumulation; so the equality below also checks that
the rows are counted over ranks and micro-batches alike.
"""


import pytest
from helpers import prepare_recipe, train_together, write_recipe

pytestmark = pytest.mark.slow

ROWS_PER_STEP = 8  # 2 ranks x grad_accum 4, or 1 rank x grad_accum 8
RUNS = {  # name: (ranks, overrides)
    "row_mean": (2, ("train.loss_normalization=weight_sum_row_mean", "train.eps=1e-5", "train.grad_clip=1.0")),
    "weight_sum_scaled": (1, ("train.loss_normalization=weight_sum", "train.eps=8e-5", "train.grad_clip=8.0",
                              "train.grad_accum=8")),
    "weight_sum": (1, ("train.loss_normalization=weight_sum", "train.eps=1e-5", "train.grad_clip=1.0",
                       "train.grad_accum=8")),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_mistral_dir):
    tmp = tmp_path_factory.mktemp("loss_scale")
    # Small enough that one step (8 rows of 256 tokens) holds all of it: two epochs, two steps.
    recipe = write_recipe(tmp, tiny_mistral_dir, num_good=8, num_bad=4, data_seed=3, epochs=2, lr=3e-3,
                          batch_max_len=256, grad_accum=4, lr_warmup_ratio=0.0, save_every_steps=None)
    prepare_recipe(recipe)
    # The three runs are independent: started together, they share the two cores.
    return train_together(recipe, tmp, RUNS)


def _worst_difference(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_row_mean_equals_weight_sum_with_eps_and_clip_scaled_by_the_rows(runs):
    ours, scaled = runs["row_mean"], runs["weight_sum_scaled"]
    assert [m["step"] for m in ours["metrics"]] == [1, 2]
    for a, b in zip(ours["metrics"], scaled["metrics"]):
        assert a["loss"] == pytest.approx(b["loss"] / ROWS_PER_STEP, rel=1e-5)
    assert _worst_difference(ours["weights"], scaled["weights"]) <= 1e-5


def test_row_mean_differs_from_weight_sum_with_the_same_eps(runs):
    worst = _worst_difference(runs["row_mean"]["weights"], runs["weight_sum"]["weights"])
    assert worst > 1e-4, f"the rescaling should change the update at eps=1e-5, got {worst:.3g}"
