"""ZeRO-3 loading on two spawned CPU ranks: the model is created partitioned, each rank reads only its part of the
weights, no rank ever holds a parameter unpartitioned or gathers one while loading, and the gathered weights (and
buffers) equal a plain ``from_pretrained`` with mean-initialised new token rows (the base has 32,000 rows, the
OpenChat 3.5 tokenizer 32,002)."""

import os

import pytest
import torch
from helpers import write_recipe

pytestmark = pytest.mark.slow

BASE_ROWS = 32000  # Mistral's vocabulary; the template adds <|end_of_turn|> and <|pad_0|>


def _worker(rank, world_size, port, recipe_path, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    import deepspeed

    from crlft.config import deepspeed_config
    from crlft.model import load_model
    from crlft.recipe import load_recipe
    from crlft.templates import TEMPLATES
    from crlft.tokenizer import load_tokenizer
    from crlft.zero3_load import full_numel

    deepspeed.init_distributed(dist_backend="gloo")
    recipe = load_recipe(recipe_path)
    tokenizer = load_tokenizer(recipe.model.base, TEMPLATES[recipe.model.template])
    gathers = []  # every GatheredParameters made while loading (transformers' re-initialisation makes them)
    original = deepspeed.zero.GatheredParameters

    class Counting(original):
        def __init__(self, params, *args, **kwargs):
            gathers.append(len(list(params)) if isinstance(params, (list, tuple)) else 1)
            super().__init__(params, *args, **kwargs)

    broadcasts = []  # zero.Init broadcasts every new parameter from rank 0 unless crlft skips it
    original_broadcast = deepspeed.comm.broadcast

    def counting_broadcast(tensor, *args, **kwargs):
        broadcasts.append(tensor.numel())
        return original_broadcast(tensor, *args, **kwargs)

    deepspeed.zero.GatheredParameters, deepspeed.comm.broadcast = Counting, counting_broadcast
    try:
        model = load_model(recipe, tokenizer, "cpu", ds_config=deepspeed_config(recipe))
    finally:
        deepspeed.zero.GatheredParameters, deepspeed.comm.broadcast = original, original_broadcast
    # Right after loading: what this rank holds of each parameter (its data and its partition).
    held = {name: (p.data.numel(), p.ds_tensor.numel(), full_numel(p)) for name, p in model.named_parameters()}
    gathered = {}
    for name, p in model.named_parameters():
        with deepspeed.zero.GatheredParameters([p]):
            gathered[name] = p.data.clone()
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    torch.save({"held": held, "gathered": gathered, "buffers": buffers, "gathers": gathers, "broadcasts": broadcasts},
               os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A 2-layer Mistral with Mistral's 32,000 rows and the OpenChat 3.5 tokenizer (32,002 tokens)."""
    from transformers import MistralConfig, MistralForCausalLM

    from crlft.tokenizer import build_tokenizer

    out = tmp_path_factory.mktemp("zero3_load") / "base"
    tokenizer = build_tokenizer("openchat_3.5", str(out))
    torch.manual_seed(0)
    config = MistralConfig(vocab_size=BASE_ROWS, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                           bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    MistralForCausalLM(config).save_pretrained(str(out))
    return str(out)


@pytest.fixture(scope="module")
def loaded(tmp_path_factory, base_dir):
    import torch.multiprocessing as mp

    from crlft.dist import free_port

    tmp = tmp_path_factory.mktemp("zero3_load_run")
    recipe = write_recipe(tmp, base_dir, zero_stage=3, dtype="bfloat16")
    env = {"OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        mp.start_processes(_worker, args=(2, free_port(), recipe, str(tmp)), nprocs=2, start_method="spawn",
                           join=True)
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    return recipe, [torch.load(tmp / f"rank{r}.pt") for r in range(2)]


def test_no_rank_holds_any_parameter_unpartitioned(loaded):
    _, ranks = loaded
    for state in ranks:
        for name, (data_numel, partition_numel, full) in state["held"].items():
            assert data_numel == 0, name  # the parameter's own data is released: only the partition is kept
            assert partition_numel == -(-full // 2), name  # half (rounded up) of every parameter
        assert sum(p for _, p, _ in state["held"].values()) < 0.51 * sum(f for _, _, f in state["held"].values())


def test_loading_gathers_and_broadcasts_nothing(loaded):
    """Neither the new rows' mean nor a random initialisation gathers parameters while loading, and zero.Init's
    broadcast of each new parameter's initial values (overwritten by the checkpoint) is skipped."""
    _, ranks = loaded
    assert [state["gathers"] for state in ranks] == [[], []]
    assert [state["broadcasts"] for state in ranks] == [[], []]


def test_gathered_weights_equal_from_pretrained_with_mean_rows(loaded, base_dir):
    from transformers import AutoModelForCausalLM

    from crlft.model import resize_embeddings_with_mean

    _, ranks = loaded
    reference = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16)
    resize_embeddings_with_mean(reference, BASE_ROWS + 2)
    expected = dict(reference.named_parameters())
    for state in ranks:
        assert state["gathered"].keys() == expected.keys()
        for name, value in state["gathered"].items():
            assert torch.equal(value, expected[name].data), name
    embed = ranks[0]["gathered"]["model.embed_tokens.weight"]
    mean = embed[:BASE_ROWS].double().mean(dim=0).to(torch.bfloat16)
    assert torch.equal(embed[BASE_ROWS], mean) and torch.equal(embed[BASE_ROWS + 1], mean)


def test_buffers_equal_from_pretrained(loaded, base_dir):
    """The parameters' random initialisation is skipped (``without_random_init``); the buffers it also sets (the
    rotary frequencies) are the same as a plain load's."""
    from transformers import AutoModelForCausalLM

    _, ranks = loaded
    expected = dict(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16).named_buffers())
    assert expected  # inv_freq at least
    for state in ranks:
        assert state["buffers"].keys() == expected.keys()
        for name, value in state["buffers"].items():
            assert value.dtype == expected[name].dtype and torch.equal(value, expected[name]), name
