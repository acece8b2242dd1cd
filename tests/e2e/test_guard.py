"""The non-finite guard on a real DeepSpeed engine in this process (world of one, CPU, a tiny model).

A step whose loss is not finite must leave the weights, the fp32 master weights, the Adam moments and the schedule
exactly as they were (DeepSpeed's overflow path drops the update), count as skipped within ``train.nonfinite_skips``
and stop the run, naming the step, beyond it. A non-finite state is found and named.
"""

import copy
import math
import os

import pytest
import torch

from crlft.collate import pack_row
from crlft.guard import NonFiniteError, NonFiniteGuard, check_state_finite, discard_if_not_finite, nonfinite_state
from crlft.loader import PackedStep
from crlft.loss import WeightedLossModel
from crlft.trainer import train_step


def _tiny_model():
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    config = MistralConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64)
    return MistralForCausalLM(config).float().train()


def _step(weight: float) -> PackedStep:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 40, (12,), generator=g)
    weights = torch.zeros(12)
    weights[6:] = weight
    row = pack_row([(ids, weights)], pad_to_multiple_of=8, conditions=["GPT4"])
    return PackedStep([row], float(row["loss_weights"].double().sum()), int((row["loss_weights"] != 0).sum()),
                      row["num_tokens"], 0, 0, 1)


@pytest.fixture(scope="module")
def engine():
    """A ZeRO-2 fp32 engine with AdamW and a schedule, in this process; the process group is left afterwards."""
    import deepspeed

    from crlft.dist import init_distributed
    from crlft.schedule import lr_scheduler_factory

    saved = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    for k in saved:
        os.environ.pop(k, None)
    init_distributed()
    wrapped = WeightedLossModel(_tiny_model())
    optimizer = torch.optim.AdamW(wrapped.parameters(), lr=1e-2, weight_decay=0.1)
    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
              "zero_optimization": {"stage": 2}, "steps_per_print": 10**9}
    engine, _, _, _ = deepspeed.initialize(model=wrapped, optimizer=optimizer, config=config,
                                           lr_scheduler=lr_scheduler_factory(10, 0.5, 0.1))
    yield engine
    torch.distributed.destroy_process_group()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _state(engine) -> dict[str, torch.Tensor]:
    base = engine.optimizer.optimizer
    state = {f"module.{n}": p.detach().clone() for n, p in engine.module.named_parameters()}
    for i, p in enumerate(base.param_groups[0]["params"]):
        state[f"fp32.{i}"] = p.detach().clone()
        state.update({f"adam.{i}.{k}": v.detach().clone() for k, v in base.state[p].items()})
    return state


def _run(engine, weight: float) -> dict[str, float]:
    return train_step(engine, _step(weight), world_size=1, grad_accum=1, loss_normalization="weight_sum",
                      conditions=["GPT4"], device=torch.device("cpu"))


def _nan_hidden_states(module, args, output):
    return output * math.nan  # a diverged forward: the final norm's output is NaN


@pytest.mark.parametrize("how", ["nan_loss", "overflowing_gradients"])
def test_a_nonfinite_step_leaves_weights_moments_and_schedule_unchanged(engine, how):
    good = _run(engine, 1.0)
    assert math.isfinite(good["loss"]) and engine.was_step_applied()
    before, lr_before = _state(engine), engine.lr_scheduler.last_epoch

    if how == "nan_loss":
        hook = engine.module.model.model.norm.register_forward_hook(_nan_hidden_states)
        try:
            bad = _run(engine, 1.0)
        finally:
            hook.remove()
        assert math.isnan(bad["loss"])
    else:  # a finite weight whose gradients overflow float32; the loss (summed in float64) stays finite
        bad = _run(engine, 3e38)
        assert math.isfinite(bad["loss"]) and bad["grad_norm"] == math.inf
    assert not engine.was_step_applied()
    after = _state(engine)
    assert set(after) == set(before) and any(k.startswith("adam.") for k in after)
    for key in before:
        assert torch.equal(before[key], after[key]), key
    assert engine.lr_scheduler.last_epoch == lr_before

    guard = NonFiniteGuard(max_skips=1)
    assert guard.check_step(7, bad["loss"], bad.get("grad_norm"), engine.was_step_applied(), "ck/step_00000004")
    with pytest.raises(NonFiniteError) as error:
        guard.check_step(9, bad["loss"], bad.get("grad_norm"), engine.was_step_applied(), "ck/step_00000004")
    message = str(error.value)
    assert message.startswith("step 9: the loss is")
    assert "non-finite steps so far: [7, 9]" in message and "the last good checkpoint is ck/step_00000004" in message

    again = _run(engine, 1.0)  # training goes on from the unchanged state
    assert math.isfinite(again["loss"]) and engine.was_step_applied()
    assert not torch.equal(_state(engine)["fp32.0"], before["fp32.0"])


def test_only_a_nonfinite_step_has_its_last_backward_poisoned():
    loss = torch.tensor(2.0)
    assert discard_if_not_finite(loss, torch.tensor([[1.0, 2.0]], dtype=torch.float64)) is loss
    assert math.isnan(discard_if_not_finite(loss, torch.tensor([[1.0, math.inf]], dtype=torch.float64)).item())


def test_the_default_stops_at_the_first_nonfinite_step_and_an_applied_update_always_stops():
    with pytest.raises(NonFiniteError, match=r"^step 3: the loss is nan and the gradient norm inf; stopping"):
        NonFiniteGuard().check_step(3, math.nan, math.inf, False, None)
    with pytest.raises(NonFiniteError, match="applied the update anyway"):
        NonFiniteGuard(max_skips=5).check_step(3, 1.0, math.nan, True, None)
    assert not NonFiniteGuard().check_step(3, 2.5, 0.7, True, None)


def test_a_nonfinite_state_is_found_and_named(engine):
    check_state_finite(engine, "after step 1", "stopping")  # finite: nothing happens
    base = engine.optimizer.optimizer
    moment = base.state[base.param_groups[0]["params"][0]]["exp_avg"]
    saved = moment.clone()
    moment.view(-1)[3] = math.nan
    try:
        assert nonfinite_state(engine) == ["optimizer exp_avg (group 0, tensor 0)"]
        with pytest.raises(NonFiniteError, match=r"after step 12 are not finite on some rank \(here: optimizer "
                                                 r"exp_avg \(group 0, tensor 0\)\); stopping"):
            check_state_finite(engine, "after step 12", "stopping")
    finally:
        moment.copy_(saved)
    weight = copy.deepcopy(engine.module.model.model.norm.weight.data)
    engine.module.model.model.norm.weight.data[0] = math.inf
    try:
        assert nonfinite_state(engine) == ["model.model.norm.weight"]
    finally:
        engine.module.model.model.norm.weight.data.copy_(weight)
