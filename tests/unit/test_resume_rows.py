"""Rows per step in the resume fingerprint and the refusal of other rows per step (crlft.reshard)."""

import pytest

from crlft import reshard
from crlft.errors import UserError


def _state(world_size, grad_accum):
    return {"world_size": world_size, "recipe": {"train": {"grad_accum": grad_accum}},
            "fingerprint": {"rows_per_step": world_size * grad_accum, "seed": 1}}


def test_same_rows_per_step_on_other_ranks_is_accepted_and_needs_resharding():
    reshard.check_rows_per_step(_state(2, 2), world_size=4, grad_accum=1, checkpoint="c")
    reshard.check_rows_per_step(_state(2, 2), world_size=1, grad_accum=4, checkpoint="c")
    assert reshard.needs_reshard(_state(2, 2), 4) and not reshard.needs_reshard(_state(2, 2), 2)


def test_other_rows_per_step_names_both_and_the_grad_accum_that_fits():
    with pytest.raises(UserError) as error:
        reshard.check_rows_per_step(_state(8, 1), world_size=2, grad_accum=1, checkpoint="run/checkpoints/step_9",
                                    where="r.yaml:7 (train.grad_accum)")
    message = str(error.value)
    assert message.startswith("r.yaml:7 (train.grad_accum): cannot resume from run/checkpoints/step_9")
    assert "8 rows per step (8 ranks × grad_accum 1)" in message
    assert "this run has 2 (2 ranks × grad_accum 1)" in message
    assert "set train.grad_accum=4 (2 ranks × 4 = 8)" in message


def test_no_grad_accum_fits_names_the_rank_counts_that_do():
    with pytest.raises(UserError, match=r"no train.grad_accum fits 3 ranks; run on 1, 2, 4, 8 ranks"):
        reshard.check_rows_per_step(_state(4, 2), world_size=3, grad_accum=1, checkpoint="c")


def test_fingerprints_written_before_rows_per_step_are_read_as_their_product():
    old = {"world_size": 2, "grad_accum": 4, "seed": 1}
    assert reshard.normalise_fingerprint(old) == {"rows_per_step": 8, "seed": 1}
    assert reshard.saved_rows_per_step(old) == 8


def test_universal_config_turns_on_load_universal_and_keeps_the_rest():
    config = {"zero_optimization": {"stage": 3}, "checkpoint": {"tag_validation": "WARN"}}
    out = reshard.universal_load_config(config)
    assert out["checkpoint"] == {"tag_validation": "WARN", "load_universal": True}
    assert out["zero_optimization"] == {"stage": 3} and "load_universal" not in config["checkpoint"]
