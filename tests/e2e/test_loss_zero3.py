"""ZeRO-3 on two spawned CPU ranks: the fused loss's one lm_head call per row and the globally normalised gradient."""

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_mistral

from crlft.collate import IGNORE_INDEX, pack_row
from crlft.loss import WeightedLossModel, loss_scale_for_backward, num_chunks_for


def _zero3_worker(rank, world_size, port, out_dir, tied=False):
    import os
    from collections import OrderedDict

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
    )
    import deepspeed
    from deepspeed.utils import safe_get_full_grad

    deepspeed.init_distributed(dist_backend="gloo")
    model = tiny_mistral(tied=tied).train()
    rows = zero3_rows()
    denominator = sum(float(r["loss_weights"].sum()) for r in rows)
    wrapped = WeightedLossModel(model, chunk_tokens=4, num_chunks=num_chunks_for(64, 4))
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        # Threshold 0: every parameter is sharded and all-gathered per module call, lm_head included.
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "optimizer": {"type": "SGD", "params": {"lr": 0.0}},
        "zero_allow_untested_optimizer": True,
    }
    engine, *_ = deepspeed.initialize(model=wrapped, model_parameters=wrapped.parameters(), config=config)

    # What lm_head sees: its calls, and its weight's size inside them and before. The weight is read from the raw
    # dict: during the forward, ZeRO-3's parameter dict gathers a partitioned weight on plain attribute access.
    def raw_weight_numel():
        return OrderedDict.__getitem__(model.lm_head._parameters, "weight").numel()

    seen = {"numel_inside": [], "numel_before": raw_weight_numel()}

    def record_call(module, args):
        seen["numel_inside"].append(raw_weight_numel())

    model.lm_head.register_forward_pre_hook(record_call)  # after DeepSpeed's hooks: runs after their gather
    parts = engine(rows[rank])
    engine.backward(parts.weighted_ce_sum * loss_scale_for_backward(denominator, world_size, 1))
    full = {name: safe_get_full_grad(p).clone() for name, p in engine.module.model.named_parameters()}
    engine.step()
    seen["numel_after"] = raw_weight_numel()
    torch.save(seen, os.path.join(out_dir, f"lm_head_rank{rank}.pt"))
    if rank == 0:
        torch.save(full, os.path.join(out_dir, "grads.pt"))


def zero3_rows():

    g = torch.Generator().manual_seed(3)
    rows = []
    for n in (40, 9):  # very different numbers of supervised targets: different chunk sizes per rank
        ids = torch.randint(3, 64, (n,), generator=g)
        w = torch.zeros(n)
        w[n // 3 :] = 1.0
        rows.append(pack_row([(ids.numpy(), w.numpy())], pad_to_multiple_of=8))
    return rows


@pytest.mark.slow
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_zero3_two_ranks_gradient_equals_global_reference(tmp_path, monkeypatch, tied):
    """Under ZeRO-3 (lm_head sharded, gathered by its module hooks for the one fused call per row, its gradient
    reduced by DeepSpeed's hooks) two ranks with rows of different sizes run in step and produce the globally
    normalised gradient; also when lm_head shares its weight with the input embeddings."""
    import torch.multiprocessing as mp

    from crlft.dist import free_port

    port = free_port()
    # Inherited by the spawned ranks: CPU DeepSpeed, and one thread each so two ranks share two cores.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    mp.start_processes(
        _zero3_worker, args=(2, port, str(tmp_path), tied), nprocs=2, start_method="spawn", join=True
    )
    got = torch.load(tmp_path / "grads.pt")
    for rank in range(2):
        seen = torch.load(tmp_path / f"lm_head_rank{rank}.pt")
        # One call (the fused path, not one per chunk), with the weight gathered for it and partitioned around it.
        assert seen["numel_inside"] == [64 * 32]
        assert seen["numel_before"] < 64 * 32 and seen["numel_after"] < 64 * 32

    model = tiny_mistral(tied=tied).train()
    rows = zero3_rows()
    denominator = sum(float(r["loss_weights"].sum()) for r in rows)
    total = 0.0
    for row in rows:  # the naive reference: the full model's logits for every position
        logits = model(input_ids=row["input_ids"], position_ids=row["position_ids"], use_cache=False).logits[0]
        ce = F.cross_entropy(logits.float(), row["labels"][0], reduction="none", ignore_index=IGNORE_INDEX)
        total = total + (ce * row["loss_weights"][0]).sum() / denominator
    names = [n for n, _ in model.named_parameters()]
    reference = dict(zip(names, torch.autograd.grad(total, list(model.parameters()))))
    assert got.keys() == reference.keys()
    for name in reference:
        torch.testing.assert_close(got[name], reference[name], rtol=1e-4, atol=1e-6, msg=name)
