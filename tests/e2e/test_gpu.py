"""The CUDA path, on one GPU (``pytest -m gpu``; ``benchmarks/gpu_check.sh`` runs these first). Every test skips
without CUDA.

* Each attention backend that can run on this torch (``flash_attention_2`` with the flash-attn package,
  ``crlft_varlen`` through ``torch.nn.attention.varlen``, the same with PyTorch's FlashAttention-3 / -4 activated,
  ``flex_attention``, ``sdpa`` with transformers' dense mask) on a packed bf16 row of Mistral-7B-shaped attention
  (32 query / 8 key-value heads of 128), forward and backward, against an fp32 reference that runs every
  conversation on its own (eager attention): hidden states and the gradients of every attention projection and the
  embeddings, by ``‖x − ref‖ / ‖ref‖``. The same check on a row whose attention leaks across conversations must
  fail, so the tolerance is known to catch a leak. With and without a sliding window shorter than the longest
  conversation.
* The fused chunked loss (``crlft.loss.chunked_weighted_cross_entropy``) against the naive full-logits one
  (``benchmarks/bench_loss.py``) on a Mistral-sized ``lm_head`` in bf16: loss and gradients against an fp32
  reference, and its peak memory.
* ``crlft.train`` through the DeepSpeed launcher on one GPU, ZeRO-2, bf16: a 2-layer model of Mistral-7B's width
  (hidden 4096, 32 heads, 8 key-value heads, MLP 14336, vocabulary 32,002), 20 steps: the loss falls, the
  checkpoint and the export are written and the export loads.

``CRLFT_GPU_TESTS_ON_CPU=1`` runs the same code on the CPU with small shapes (for working on this file without a
GPU; its numbers say nothing about the GPU path).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import REPO_ROOT, free_port, read_metrics, write_recipe

sys.path.insert(0, os.path.join(REPO_ROOT, "benchmarks"))

import bench_gpu  # noqa: E402
import bench_loss  # noqa: E402

from crlft.attention import (  # noqa: E402
    VARLEN_ATTENTION,
    available_attn_implementations,
    packed_attention_kwargs,
    register_varlen_attention,
)
from crlft.collate import pack_row  # noqa: E402
from crlft.loss import chunked_weighted_cross_entropy  # noqa: E402

ON_CPU = os.environ.get("CRLFT_GPU_TESTS_ON_CPU") == "1"
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not (torch.cuda.is_available() or ON_CPU), reason="needs a CUDA GPU"),
]
DEVICE = torch.device("cpu" if ON_CPU else "cuda")

# Mistral-7B's attention; small MLP and vocabulary: the attention is what is compared.
ATTENTION_SHAPE = {"hidden_size": 4096, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
                   "intermediate_size": 1024, "vocab_size": 1024, "num_hidden_layers": 2}
# A packed row of 4,096 tokens: long and short conversations, a 1-token one, no padding.
ROW_LENGTHS = [700, 1, 33, 1500, 64, 900, 898]
WINDOW = 512  # shorter than three of the conversations
if ON_CPU:
    ATTENTION_SHAPE = {"hidden_size": 256, "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 32,
                       "intermediate_size": 128, "vocab_size": 256, "num_hidden_layers": 2}
    ROW_LENGTHS, WINDOW = [90, 1, 17, 150, 8, 46], 64

# bf16 operands land between 1e-3 and 1e-2 of an fp32 reference per operation; two layers and their backward.
FORWARD_TOLERANCE = 2e-2
GRAD_TOLERANCE = 5e-2

BACKENDS = ["flash_attention_2", VARLEN_ATTENTION, f"{VARLEN_ATTENTION}+FA3", f"{VARLEN_ATTENTION}+FA4",
            "flex_attention", "sdpa"]


def relative_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.detach().double(), ref.detach().double()
    error = float((x - ref).norm() / ref.norm())
    return error if error == error else float("inf")  # NaN never passes


def skip_reason(name: str) -> str | None:
    """Why backend ``name`` cannot run here, or None."""
    attn, impl = bench_gpu.split_backend(name)
    if impl is not None:
        return bench_gpu.torch_flash_impl_unavailable(impl, DEVICE)
    if attn in ("sdpa", VARLEN_ATTENTION):
        return None
    if attn not in available_attn_implementations(DEVICE, torch.bfloat16):
        return f"{attn} cannot run here (crlft.attention.available_attn_implementations)"
    return None


# ----------------------------------------------------------------------------------------------------------------
# Attention backends against an fp32 reference
# ----------------------------------------------------------------------------------------------------------------


def _model(window: int | None):
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(**ATTENTION_SHAPE, sliding_window=window, max_position_embeddings=8192,
                           attention_dropout=0.0, tie_word_embeddings=False, use_cache=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = MistralForCausalLM(config)
    return model.to(DEVICE).eval()  # eval: no dropout (there is none); the backward still runs


def _row():
    generator = torch.Generator().manual_seed(1)
    vocab = ATTENTION_SHAPE["vocab_size"]
    examples = [(torch.randint(0, vocab, (n,), generator=generator), torch.ones(n)) for n in ROW_LENGTHS]
    row = pack_row(examples, pad_to_multiple_of=None)
    assert row["num_tokens"] == sum(ROW_LENGTHS) and row["input_ids"].shape[1] == sum(ROW_LENGTHS)
    return {k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in row.items()}


def _attention_params(model) -> dict[str, torch.nn.Parameter]:
    names = ("q_proj", "k_proj", "v_proj", "o_proj")
    params = {n: p for n, p in model.named_parameters() if any(f"self_attn.{k}." in n for k in names)}
    params["embed_tokens"] = model.get_input_embeddings().weight
    return params


def _packed_pass(model, row, attn: str, probe: torch.Tensor, kwargs: dict) -> tuple[torch.Tensor, dict]:
    """The decoder on the whole packed row; backward of ⟨hidden, probe⟩. Returns (hidden [T, H] fp32, grads)."""
    model.zero_grad(set_to_none=True)
    model.set_attn_implementation(attn)
    hidden = model.get_decoder()(input_ids=row["input_ids"], position_ids=row["position_ids"], use_cache=False,
                                 **kwargs).last_hidden_state[0]
    (hidden.float() * probe).sum().backward()
    return hidden.detach().float(), {n: p.grad.detach().float().clone() for n, p in _attention_params(model).items()}


def _reference_pass(model, row, probe: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """fp32, eager attention, every conversation as its own sequence (positions 0..L-1): attention cannot leak."""
    model.zero_grad(set_to_none=True)
    model.set_attn_implementation("eager")
    bounds = row["cu_seqlens"].tolist()
    outputs = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        ids = row["input_ids"][:, start:end]
        positions = torch.arange(end - start, device=DEVICE)[None]
        hidden = model.get_decoder()(input_ids=ids, position_ids=positions, use_cache=False).last_hidden_state[0]
        (hidden * probe[start:end]).sum().backward()  # gradients add up over the conversations
        outputs.append(hidden.detach())
    return torch.cat(outputs), {n: p.grad.detach().clone() for n, p in _attention_params(model).items()}


@pytest.fixture(scope="module", params=[None, WINDOW], ids=["no-window", f"window-{WINDOW}"])
def reference(request):
    """The fp32 model, the row, a fixed probe, the reference pass and a pass whose attention leaks."""
    register_varlen_attention()
    model = _model(request.param).float()
    row = _row()
    generator = torch.Generator().manual_seed(2)
    probe = torch.randn(row["input_ids"].shape[1], ATTENTION_SHAPE["hidden_size"], generator=generator).to(DEVICE)
    ref_hidden, ref_grads = _reference_pass(model, row, probe)
    # One segment over the whole row: every token attends to the conversations before it (positions still restart).
    total = row["input_ids"].shape[1]
    one_segment = torch.tensor([0, total], dtype=torch.int32, device=DEVICE)
    leak_kwargs = {"cu_seq_lens_q": one_segment, "cu_seq_lens_k": one_segment, "max_length_q": total,
                   "max_length_k": total}
    leak_hidden, leak_grads = _packed_pass(model, row, VARLEN_ATTENTION, probe, leak_kwargs)
    return {"model": model, "row": row, "probe": probe, "hidden": ref_hidden, "grads": ref_grads,
            "leak_hidden": leak_hidden, "leak_grads": leak_grads, "window": request.param}


def test_the_reference_detects_attention_across_conversations(reference):
    """A packed pass that lets conversations see each other is far outside the tolerance: the check can fail."""
    hidden = relative_error(reference["leak_hidden"], reference["hidden"])
    grads = max(relative_error(reference["leak_grads"][n], g) for n, g in reference["grads"].items())
    print(f"leaking attention, window={reference['window']}: hidden {hidden:.2e}, worst gradient {grads:.2e}")
    assert hidden > 5 * FORWARD_TOLERANCE and grads > 5 * GRAD_TOLERANCE


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_backend_matches_fp32_reference_forward_and_backward(reference, backend):
    reason = skip_reason(backend)
    if reason:
        pytest.skip(reason)
    attn, impl = bench_gpu.split_backend(backend)
    model = copy.deepcopy(reference["model"]).to(torch.bfloat16)
    row = reference["row"]
    with bench_gpu.torch_flash_impl(impl):
        hidden, grads = _packed_pass(model, row, attn, reference["probe"], packed_attention_kwargs(row, attn, DEVICE))
    errors = {"hidden": relative_error(hidden, reference["hidden"])}
    errors.update({n: relative_error(g, reference["grads"][n]) for n, g in grads.items()})
    print(f"{backend} window={reference['window']}: " + ", ".join(f"{k} {v:.2e}" for k, v in errors.items()))
    assert errors["hidden"] < FORWARD_TOLERANCE, errors
    assert max(v for k, v in errors.items() if k != "hidden") < GRAD_TOLERANCE, errors


# ----------------------------------------------------------------------------------------------------------------
# The fused loss against the naive one
# ----------------------------------------------------------------------------------------------------------------


def test_fused_loss_matches_naive_loss_in_bf16_with_less_memory():
    tokens, hidden_size, vocab = (8192, 4096, 32002) if not ON_CPU else (512, 64, 1000)
    hidden, lm_head, labels, weights = bench_loss.make_inputs(tokens, vocab, hidden_size, 0.6, seed=3)
    weights[weights > 0] = torch.where(torch.rand(int((weights > 0).sum())) < 0.5, 1.0, 0.1)  # two rewards
    # fp32 reference: the naive loss on fp32 inputs.
    ref_hidden = hidden.detach().to(DEVICE).requires_grad_()
    ref_head = copy.deepcopy(lm_head).to(DEVICE)
    labels, weights = labels.to(DEVICE), weights.to(DEVICE)
    ref_loss = bench_loss.naive_loss(ref_hidden, ref_head, labels, weights)
    ref_loss.backward()
    reference = (float(ref_loss.detach()), ref_hidden.grad, ref_head.weight.grad)
    del ref_loss

    results = {}
    for kind in ("naive", "fused", "checkpoint"):
        h = hidden.detach().to(DEVICE, torch.bfloat16).requires_grad_()
        head = copy.deepcopy(lm_head).to(DEVICE, torch.bfloat16)
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            start = torch.cuda.memory_allocated()
        if kind == "naive":
            loss = bench_loss.naive_loss(h, head, labels, weights)
        else:
            loss = chunked_weighted_cross_entropy(h, head, labels, weights, method=kind).weighted_ce_sum
        loss.backward()
        peak = torch.cuda.max_memory_allocated() - start if DEVICE.type == "cuda" else None
        results[kind] = {"loss": float(loss), "grad_h": h.grad.float(), "grad_w": head.weight.grad.float(),
                         "peak": peak}
        del loss, h, head
    for kind, r in results.items():
        errors = (abs(r["loss"] - reference[0]) / abs(reference[0]), relative_error(r["grad_h"], reference[1]),
                  relative_error(r["grad_w"], reference[2]))
        print(f"{kind}: loss {errors[0]:.2e}, grad hidden {errors[1]:.2e}, grad lm_head {errors[2]:.2e}, "
              f"peak +{(r['peak'] or 0) / 2**30:.2f} GiB")
        assert errors[0] < 5e-3 and errors[1] < 2e-2 and errors[2] < 2e-2, (kind, errors)
    fused, naive = results["fused"], results["naive"]
    assert abs(fused["loss"] - naive["loss"]) / abs(naive["loss"]) < 5e-3
    assert relative_error(fused["grad_h"], naive["grad_h"]) < 2e-2
    if DEVICE.type == "cuda":
        # The naive loss holds several fp32 [T, V] tensors (1 GiB each here); the fused one a chunk's worth.
        assert fused["peak"] < naive["peak"] / 2, (fused["peak"], naive["peak"])


# ----------------------------------------------------------------------------------------------------------------
# crlft.train on one GPU through DeepSpeed ZeRO-2
# ----------------------------------------------------------------------------------------------------------------

MISTRAL_7B_WIDTH = {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 2,
                    "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 32002,
                    "max_position_embeddings": 8192}
TRAIN_STEPS = 20


def _gpu_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO_ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update({"HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false",
                "PYTHONUNBUFFERED": "1"})
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(name, None)
    if ON_CPU:
        env.update({"DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"})
    return env


def test_train_mistral_7b_width_on_one_gpu_with_deepspeed_zero2(tmp_path):
    from crlft.model import create_from_scratch

    shape = MISTRAL_7B_WIDTH if not ON_CPU else {**MISTRAL_7B_WIDTH, "hidden_size": 64, "intermediate_size": 128,
                                                  "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16}
    base = tmp_path / "base"
    create_from_scratch(str(base), shape, "openchat_3.5", seed=0)
    # ~40 conversations per 2,048-token row: 1,800 conversations are more than 20 steps; max_steps makes the run (and
    # its schedule) 20 steps long.
    recipe = write_recipe(tmp_path, str(base), num_good=1200, num_bad=600, zero_stage=2, dtype="bfloat16",
                          epochs=1, max_steps=TRAIN_STEPS, batch_max_len=2048, lr=2e-3 if ON_CPU else 3e-4,
                          lr_warmup_ratio=0.1,
                          save_every_steps=None, keep_last=1)
    launcher = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "1", "--master_port",
                str(free_port())]
    subprocess.run([sys.executable, "-m", "crlft", "prepare", recipe], cwd=REPO_ROOT, env=_gpu_env(), check=True,
                   capture_output=True, text=True, timeout=300)
    result = subprocess.run([*launcher, "--module", "crlft.train", recipe], cwd=REPO_ROOT, env=_gpu_env(),
                            capture_output=True, text=True, timeout=900)
    log = result.stdout + result.stderr
    (tmp_path / "train.log").write_text(log)
    assert result.returncode == 0, log[-6000:]
    attention = [line for line in log.splitlines() if "attention: " in line]
    print(attention[0] if attention else "no attention line in the log")

    run_dir = tmp_path / "run"
    metrics = read_metrics(str(run_dir))
    losses = [m["loss"] for m in metrics]
    print("losses: " + " ".join(f"{x:.3f}" for x in losses))
    assert [m["step"] for m in metrics] == list(range(1, TRAIN_STEPS + 1))
    assert all(x == x and x < 20 for x in losses)  # finite
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < first - 1.0, losses  # nats; from ln(32002) = 10.4 at the start

    from crlft.checkpoint import list_checkpoints

    assert [step for step, _ in list_checkpoints(str(run_dir))] == [TRAIN_STEPS]  # complete, at the last step
    export = run_dir / "export" / "final"
    config = json.loads((export / "config.json").read_text())
    assert (config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]) == (
        shape["hidden_size"], 2, 32002)
    assert any(name.endswith(".safetensors") for name in os.listdir(export))

    from transformers import AutoModelForCausalLM

    trained = AutoModelForCausalLM.from_pretrained(str(export), dtype=torch.bfloat16)
    initial = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.bfloat16)
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(trained.state_dict()[name], initial.state_dict()[name])  # trained, not the base copied
