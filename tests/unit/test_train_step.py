"""``train_step`` on its own: one process, a stand-in for the DeepSpeed engine, a tiny model.

The stand-in does what DeepSpeed does to the loss and the gradients (divides each backward by the accumulation
steps, updates only at the boundary); the update must still be the gradient of the step's global loss
``Σ w·CE / Σ w`` over both micro-batches, and the metrics must report that loss.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import MistralConfig, MistralForCausalLM

from crlft.collate import IGNORE_INDEX, pack_row
from crlft.dist import free_port
from crlft.loader import PackedStep
from crlft.loss import WeightedLossModel
from crlft.trainer import train_step


class EngineStandIn:
    """The parts of a DeepSpeed engine ``train_step`` uses, with DeepSpeed's scaling of accumulated gradients."""

    def __init__(self, module: torch.nn.Module, grad_accum: int, lr: float):
        self.module, self.grad_accum = module, grad_accum
        self.optimizer = torch.optim.SGD(module.parameters(), lr=lr)
        self.micro_steps = 0
        self.gradients_at_update: dict[str, torch.Tensor] = {}

    def __call__(self, batch, **kwargs):
        return self.module(batch, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.grad_accum).backward()  # DeepSpeed averages over the accumulation steps

    def is_gradient_accumulation_boundary(self) -> bool:
        return (self.micro_steps + 1) % self.grad_accum == 0

    def step(self) -> None:
        if self.is_gradient_accumulation_boundary():
            self.gradients_at_update = {n: p.grad.clone() for n, p in self.module.named_parameters()}
            self.optimizer.step()
            self.optimizer.zero_grad()
        self.micro_steps += 1

    def get_global_grad_norm(self) -> float:
        return 1.5


@pytest.fixture
def world_of_one():
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield
    torch.distributed.destroy_process_group()


def tiny_model() -> MistralForCausalLM:
    torch.manual_seed(0)
    config = MistralConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64)
    return MistralForCausalLM(config).float().train()


def conversation(length: int, seed: int, weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 40, (length,), generator=g)
    weights = torch.zeros(length)
    weights[length // 2:] = weight  # the second half is the assistant's
    return ids, weights


def test_train_step_updates_with_the_global_loss_of_all_micro_batches(world_of_one):
    rows = [
        pack_row([conversation(9, 0, 1.0), conversation(6, 1, 0.1)], pad_to_multiple_of=8,
                 conditions=["GPT4", "GPT3"]),
        pack_row([conversation(12, 2, 0.1)], pad_to_multiple_of=8, conditions=["GPT3"]),
    ]
    weight_sum = sum(float(r["loss_weights"].sum()) for r in rows)
    num_supervised = sum(int((r["loss_weights"] > 0).sum()) for r in rows)
    step = PackedStep(micro_batches=rows, global_weight_sum=weight_sum, global_num_supervised_tokens=num_supervised,
                      global_num_tokens=sum(r["num_tokens"] for r in rows), epoch=0, step_in_epoch=0,
                      steps_per_epoch=1)
    model = tiny_model()
    reference = copy.deepcopy(model)
    engine = EngineStandIn(WeightedLossModel(model), grad_accum=2, lr=0.25)

    metrics = train_step(engine, step, world_size=1, grad_accum=2, loss_normalization="weight_sum",
                         conditions=["GPT3", "GPT4"], device=torch.device("cpu"))

    loss = 0.0
    for row in rows:  # the naive global loss: full logits, every position, one denominator for the step
        logits = reference(input_ids=row["input_ids"], position_ids=row["position_ids"], use_cache=False).logits[0]
        ce = F.cross_entropy(logits.float(), row["labels"][0], reduction="none", ignore_index=IGNORE_INDEX)
        loss = loss + (ce * row["loss_weights"][0]).sum() / weight_sum
    loss.backward()
    for name, param in reference.named_parameters():
        assert torch.allclose(engine.gradients_at_update[f"model.{name}"], param.grad, atol=1e-6), name
    assert metrics["loss"] == pytest.approx(loss.item(), rel=1e-5)
    assert metrics["lr"] == 0.25 and metrics["grad_norm"] == 1.5
    assert engine.micro_steps == 2


def test_train_step_refuses_a_step_with_the_wrong_number_of_micro_batches(world_of_one):
    row = pack_row([conversation(5, 0, 1.0)], pad_to_multiple_of=8)
    step = PackedStep([row], 1.0, 1, 5, 0, 0, 1)
    engine = EngineStandIn(WeightedLossModel(tiny_model()), grad_accum=2, lr=0.1)
    with pytest.raises(AssertionError, match="expected 2"):
        train_step(engine, step, world_size=1, grad_accum=2, loss_normalization="weight_sum", conditions=[""],
                   device=torch.device("cpu"))
