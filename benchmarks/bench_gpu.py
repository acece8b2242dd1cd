"""GPU training throughput of Mistral-7B-shaped decoder layers on packed 8k rows, per attention backend.

The model: Mistral-7B's layer shape (hidden 4096, MLP 14336, 32 query / 8 key-value heads of 128, vocabulary
32,002, sliding window 4096, RMSNorm, RoPE), as many layers as fit on the GPU with their AdamW state (see
"Memory"), randomly initialised, bf16. The data: conversations of log-normal lengths (mu=6.5, sigma=1.0,
clipped to [16, 8192]) packed by ``crlft.packing.plan_epoch`` into rows of 8,192 tokens (``pack_row``, padded to
exactly 8,192 so every step has the same shape); every position but each conversation's last is supervised.
A step is crlft's: the decoder on one packed row with the backend's ``crlft.attention.packed_attention_kwargs``,
``crlft.loss.causal_lm_loss_parts`` (chunked weighted cross-entropy), backward, gradient clipping at 1.0 and
AdamW. For every available attention backend (``crlft.attention.available_attn_implementations``, plus ``sdpa``
with transformers' dense block-diagonal mask as a reference) and with activation checkpointing off and on, it
reports tokens/s, MFU and peak memory.

PyTorch's own FlashAttention-3 and -4: ``torch.nn.attention.activate_flash_attention_impl("FA3")`` (torch >= 2.11;
Hopper, compute capability 9.0) swaps the kernels behind ``torch.ops.aten._flash_attention_forward`` /
``_backward``, which ``torch.nn.attention.varlen.varlen_attn`` and so ``crlft_varlen`` call, for FlashAttention-3's;
"FA4" likewise (compute capability 9.0 or 10.0). Torch ships only the registration: the kernels come from the
``flash_attn_interface`` module (FlashAttention-3's Hopper build, not on PyPI) and ``flash_attn.cute`` (the
``flash-attn-4`` package with NVIDIA's CUTLASS DSL). The backends ``crlft_varlen+FA3`` and ``crlft_varlen+FA4``
run ``crlft_varlen`` with that implementation active, and are reported as skipped, with the reason, where it
cannot run (``torch_flash_impl_unavailable``).

DeepSpeed is not used: the step is timed on the bare model with an optimizer that keeps what DeepSpeed's bf16
optimizer keeps on one GPU (bf16 weights and gradients, fp32 master weights, fp32 gradients and fp32 AdamW
moments: 20 bytes per parameter), so the memory and the per-step work match a single-rank crlft run.

MFU (model FLOPs utilisation) = model FLOPs per step / step time / peak bf16 dense FLOP/s of the GPU (989.4e12 for
H100 SXM and H200, 756e12 for H100 PCIe, 312e12 for A100; ``--peak-tflops`` otherwise), with

    model FLOPs = 6 · N_layers · T + 6 · V · H · S + 12 · n_layers · H · P

where ``N_layers`` is the parameter count of the decoder layers, ``T`` the real (non-padding) tokens of the row,
``V · H`` the output projection, ``S`` the supervised positions (the chunked loss computes logits only for
them; here S = T − number of conversations), ``H`` the hidden size (= query heads x head dim) and ``P`` the number
of (query, key) pairs attended: ``Σ_conversations Σ_{i<L} min(i + 1, window)`` (causal, per conversation, within
the sliding window). ``12 · H · P`` per layer is the forward's 2 matmuls (QKᵀ and AV, 2 FLOPs per multiply-add)
times 3 for forward + backward. Recomputation (activation checkpointing) is not counted: MFU counts the model's
FLOPs, not the hardware's. (The fused chunked loss computes its gradients in the forward, with no second pass.)

Memory: ``--layers auto`` estimates how many layers fit without activation checkpointing from the free memory
(20 B/parameter of state plus ~2.2 GB of activations per layer per 8k row), then steps down one layer at a time
while a step runs out of memory. The same layer count is then used for every backend and for checkpointing on,
so the rows of the table are comparable.

Run on a GPU: ``python benchmarks/bench_gpu.py`` (``--json FILE`` to keep the figures; ``benchmarks/gpu_check.sh``
runs it after the tests marked ``gpu``, with ``--layers 8 --steps 6 --warmup 2``). ``--smoke`` runs the same
code on tiny shapes on the CPU in seconds (``tests/test_benchmarks_smoke.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import json
import os
import sys
import time
import traceback

# Before torch starts OpenMP: on a shared CPU, threads that spin while waiting take the cores the other
# processes need and make every small op slow; PASSIVE makes them sleep (set OMP_WAIT_POLICY to override).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the benchmarks' shared helpers
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # crlft, from a checkout

from bench_train import PeakRSS, lognormal_lengths, machine_summary, print_and_save  # noqa: E402

from crlft.attention import (  # noqa: E402
    available_attn_implementations,
    choose_attn_implementation,
    packed_attention_kwargs,
    register_varlen_attention,
)
from crlft.collate import pack_row  # noqa: E402
from crlft.loss import causal_lm_loss_parts  # noqa: E402
from crlft.packing import plan_epoch  # noqa: E402

MISTRAL_7B = {"hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32, "num_key_value_heads": 8,
              "vocab_size": 32002, "sliding_window": 4096}
SMOKE = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
         "vocab_size": 512, "sliding_window": 64}

# Peak dense bf16 tensor FLOP/s by device name (vendor datasheets), most specific name first.
PEAK_BF16_FLOPS = [("H100 PCIe", 756e12), ("H100", 989.4e12), ("H200", 989.4e12), ("GH200", 989.4e12),
                   ("A100", 312e12), ("L40S", 362e12)]

MFU_FORMULA = ("MFU = model FLOPs per step / step time / peak bf16 dense FLOP/s; model FLOPs = 6·N_layers·T + "
               "6·V·H·S + 12·n_layers·H·P (N_layers: decoder-layer parameters, T: real tokens, V·H: lm_head, S: "
               "supervised positions, P: causal (query, key) pairs within the window; recomputation not counted)")

# PyTorch's pluggable flash-attention implementations (torch.nn.attention.activate_flash_attention_impl): the
# compute capabilities torch accepts for each and the module its kernels come from (not shipped with torch).
TORCH_FLASH_IMPLS = {
    "FA3": ((9,), "flash_attn_interface", "FlashAttention-3's Hopper build (flash-attention/hopper; no PyPI wheel)"),
    "FA4": ((9, 10), "flash_attn.cute.interface", "the flash-attn-4 package and nvidia-cutlass-dsl"),
}

STATE_BYTES_PER_PARAM = 20  # bf16 weight + bf16 grad + fp32 master + fp32 grad + 2 fp32 AdamW moments
ACTIVATION_BYTES_PER_LAYER_PER_TOKEN = 270_000  # measured order of magnitude for a 4096/14336 layer in bf16


# ----------------------------------------------------------------------------------------------------------------
# FLOPs
# ----------------------------------------------------------------------------------------------------------------


def attention_pairs(lengths, window: int | None) -> int:
    """(query, key) pairs a causal attention with a sliding window of ``window`` keys attends per conversation."""
    total = 0
    for n in (int(x) for x in lengths):
        if window is None or n <= window:
            total += n * (n + 1) // 2
        else:
            total += window * (window + 1) // 2 + (n - window) * window
    return total


def layer_params(config) -> int:
    """Parameters of one decoder layer (projections, MLP, two RMSNorm weights)."""
    h, f = config.hidden_size, config.intermediate_size
    head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q = h * config.num_attention_heads * head_dim
    kv = 2 * h * config.num_key_value_heads * head_dim
    o = config.num_attention_heads * head_dim * h
    return q + kv + o + 3 * h * f + 2 * h


def step_flops(config, num_layers: int, lengths, num_supervised: int) -> float:
    """Model FLOPs of one training step on one packed row (forward + backward); see the module docstring."""
    tokens = int(sum(int(x) for x in lengths))
    hidden = config.num_attention_heads * (getattr(config, "head_dim", None) or
                                           config.hidden_size // config.num_attention_heads)
    dense = 6 * layer_params(config) * num_layers * tokens + 6 * config.vocab_size * config.hidden_size * num_supervised
    attention = 12 * num_layers * hidden * attention_pairs(lengths, config.sliding_window)
    return float(dense + attention)


def peak_flops(device: torch.device, override_tflops: float | None) -> float | None:
    """Peak bf16 dense FLOP/s of the device, or None when unknown (CPU)."""
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS if key in name), None)


# ----------------------------------------------------------------------------------------------------------------
# PyTorch's FlashAttention-3 / -4
# ----------------------------------------------------------------------------------------------------------------


def split_backend(name: str) -> tuple[str, str | None]:
    """``"crlft_varlen+FA3"`` -> ``("crlft_varlen", "FA3")``; a plain backend name -> ``(name, None)``."""
    attn, _, impl = name.partition("+")
    return attn, impl or None


def torch_flash_impl_unavailable(impl: str, device: torch.device) -> str | None:
    """Why PyTorch's flash-attention implementation ``impl`` ("FA3", "FA4") cannot run on ``device``; None if it can.

    Checks what ``torch.nn.attention`` offers in this torch, the GPU's compute capability against the one torch's
    ``_fa3``/``_fa4`` accept, and whether the module holding the kernels is importable.
    """
    import torch.nn.attention as attention

    where = f"torch {torch.__version__}"
    if not hasattr(attention, "activate_flash_attention_impl"):
        return f"{where} has no torch.nn.attention.activate_flash_attention_impl (added in torch 2.10/2.11)"
    offered = attention.list_flash_attention_impls()
    if impl not in offered:
        return f"{where}: torch.nn.attention offers {offered}, not {impl!r}"
    if impl not in TORCH_FLASH_IMPLS:
        return f"{impl!r}: not one of the implementations this benchmark knows ({', '.join(TORCH_FLASH_IMPLS)})"
    majors, module, package = TORCH_FLASH_IMPLS[impl]
    if device.type != "cuda":
        return f"{impl} needs a CUDA GPU (device {device})"
    major, minor = torch.cuda.get_device_capability(device)
    if major not in majors:
        return f"{impl} needs compute capability {' or '.join(f'{m}.0' for m in majors)}; this GPU is {major}.{minor}"
    try:
        found = importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a parent package of a dotted name is missing
        found = False
    if not found:
        return (f"{where} registers {impl} (activate_flash_attention_impl({impl!r})) but its kernels come from the "
                f"`{module}` module, {package}, which is not installed")
    return None


@contextlib.contextmanager
def torch_flash_impl(impl: str | None):
    """Runs the block with PyTorch's flash-attention implementation ``impl`` active (None: the default FA2)."""
    if impl is None:
        yield
        return
    from torch.nn.attention import activate_flash_attention_impl, restore_flash_attention_impl

    activate_flash_attention_impl(impl)
    try:
        yield
    finally:
        restore_flash_attention_impl()


# ----------------------------------------------------------------------------------------------------------------
# The optimizer DeepSpeed's bf16 mode amounts to on one GPU
# ----------------------------------------------------------------------------------------------------------------


class MasterWeightAdamW:
    """AdamW on fp32 master copies of half-precision weights; the weights are refreshed from them each step.

    Args:
        params: the model's (bf16) parameters.
        lr: learning rate.
        grad_clip: global gradient-norm clipping (0 disables).
    """

    def __init__(self, params, lr: float = 1e-5, grad_clip: float = 1.0):
        self.params = [p for p in params if p.requires_grad]
        self.masters = [p.detach().to(torch.float32, copy=True).requires_grad_() for p in self.params]
        for master in self.masters:
            master.grad = torch.zeros_like(master)  # persistent fp32 gradient buffer, as DeepSpeed keeps one
        fused = all(p.is_cuda for p in self.params)
        self.optimizer = torch.optim.AdamW(self.masters, lr=lr, betas=(0.9, 0.95), eps=1e-5, weight_decay=0.1,
                                           fused=fused or None)
        self.grad_clip = grad_clip

    def step(self) -> None:
        """Copies the gradients to fp32, clips, steps, and writes the updated weights back."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        torch._foreach_copy_([m.grad for m in self.masters], grads)
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.masters, self.grad_clip, foreach=True)
        self.optimizer.step()
        with torch.no_grad():
            torch._foreach_copy_(self.params, self.masters)
        for p in self.params:
            p.grad = None


# ----------------------------------------------------------------------------------------------------------------
# Data and model
# ----------------------------------------------------------------------------------------------------------------


def make_rows(num_rows: int, row_tokens: int, vocab: int, length_scale: float, seed: int) -> list[dict]:
    """``num_rows`` packed rows of exactly ``row_tokens`` tokens from log-normal conversations."""
    rng = np.random.default_rng(seed)
    mean_length = np.exp(7.0) * length_scale
    lengths = lognormal_lengths(int((num_rows + 4) * row_tokens / mean_length * 1.5) + 64, rng, length_scale)
    lengths = np.minimum(lengths, row_tokens)
    plan = plan_epoch(lengths, row_tokens, 1, seed, 0)
    rows = []
    for step in range(plan.num_steps):
        indices = plan.bin(step, 0)
        examples = [(rng.integers(0, vocab, int(lengths[i])), np.ones(int(lengths[i]), np.float32)) for i in indices]
        row = pack_row(examples, pad_to_multiple_of=row_tokens)
        if row["num_tokens"] < 0.95 * row_tokens:  # the plan's last, under-full bins are not representative
            continue
        row["lengths"] = [int(lengths[i]) for i in indices]
        rows.append(row)
        if len(rows) == num_rows:
            return rows
    raise RuntimeError(f"only {len(rows)} full rows of {row_tokens} tokens could be made")


def build_model(shape: dict, num_layers: int, device: torch.device, dtype: torch.dtype, attn: str,
                checkpointing: bool):
    """A randomly initialised Mistral of ``shape`` with ``num_layers`` layers, on ``device``."""
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(**shape, num_hidden_layers=num_layers, max_position_embeddings=32768,
                           tie_word_embeddings=False, use_cache=False)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialise directly in the training dtype: no fp32 copy of 3B parameters
    try:
        with device:
            model = MistralForCausalLM(config)
    finally:
        torch.set_default_dtype(default_dtype)
    model.set_attn_implementation(attn)
    if checkpointing:
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model.train()


def estimate_layers(shape: dict, free_bytes: int, row_tokens: int) -> int:
    """Layers whose state and activations (no checkpointing) fit in ``free_bytes``, leaving 10% headroom."""
    from transformers import MistralConfig

    config = MistralConfig(**shape, num_hidden_layers=1)
    fixed = STATE_BYTES_PER_PARAM * 2 * config.vocab_size * config.hidden_size  # embedding + lm_head
    loss_chunk = 3 * 4096 * config.vocab_size * 4  # the chunked loss's logits, log-softmax, gradient
    per_layer = STATE_BYTES_PER_PARAM * layer_params(config) + ACTIVATION_BYTES_PER_LAYER_PER_TOKEN * row_tokens
    return max(1, int((0.9 * free_bytes - fixed - loss_chunk) // per_layer))


# ----------------------------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_config(shape, num_layers, rows, device, dtype, attn, checkpointing, warmup, steps, peak, memory):
    """Builds the model, runs warm-up and timed steps; returns one table row (raises on OOM)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    phase = f"{attn}/{checkpointing}"
    name, attn = attn, split_backend(attn)[0]
    with memory.measure(phase), torch_flash_impl(split_backend(name)[1]):
        model = build_model(shape, num_layers, device, dtype, attn, checkpointing)
        optimizer = MasterWeightAdamW(model.parameters())
        device_rows = [{k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in row.items()}
                       for row in rows]
        step_seconds, flops, tokens = [], 0.0, 0
        for i in range(warmup + steps):
            row = device_rows[i % len(device_rows)]
            _sync(device)
            started = time.perf_counter()
            parts = causal_lm_loss_parts(model, row, **packed_attention_kwargs(row, attn, device))
            (parts.weighted_ce_sum / parts.weights.sum()).backward()
            optimizer.step()
            _sync(device)
            if i >= warmup:
                step_seconds.append(time.perf_counter() - started)
                tokens += row["num_tokens"]
                num_supervised = row["num_tokens"] - row["num_conversations"]
                flops += step_flops(model.config, num_layers, row["lengths"], num_supervised)
    seconds = sum(step_seconds)
    result = {
        "attn": name,
        "checkpointing": checkpointing,
        "layers": num_layers,
        "params": sum(p.numel() for p in model.parameters()),
        "steps": steps,
        "tokens_per_s": tokens / seconds,
        "seconds_per_step": seconds / steps,
        "tflops_per_s": flops / seconds / 1e12,
        "mfu": flops / seconds / peak if peak else None,
    }
    if device.type == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        result["peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2**30
    else:
        result["peak_memory_gib"] = memory.peaks[phase] / 2**30
    del model, optimizer, device_rows, parts
    gc.collect()
    return result


def _is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error).lower()


def run(args: argparse.Namespace) -> dict:
    """Runs every (backend, checkpointing) configuration; returns the figures."""
    device = torch.device(args.device)
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[args.dtype]
    shape = dict(SMOKE if args.smoke else MISTRAL_7B)
    if args.sliding_window is not None:
        shape["sliding_window"] = args.sliding_window or None
    register_varlen_attention()
    log_lines: list[str] = []
    chosen = choose_attn_implementation("auto", device, dtype, log=log_lines.append)
    print(log_lines[0], flush=True)
    if args.backends:
        backends = args.backends.split(",")
    else:
        available = available_attn_implementations(device, dtype)
        backends = available + [f"crlft_varlen+{impl}" for impl in TORCH_FLASH_IMPLS] + ["sdpa"]
    unavailable = {name: torch_flash_impl_unavailable(impl, device) for name in backends
                   for impl in [split_backend(name)[1]] if impl}
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.checkpointing]
    rows = make_rows(max(args.steps, 4), args.row_tokens, shape["vocab_size"], args.length_scale, args.seed)
    peak = peak_flops(device, args.peak_tflops)
    memory = PeakRSS()

    num_layers = args.layers
    if num_layers is None:
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            num_layers = estimate_layers(shape, free, args.row_tokens)
        else:
            num_layers = 2
    results = {
        "command": "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:]),
        "machine": machine_summary(),
        "device": str(device),
        "dtype": args.dtype,
        "shape": shape,
        "row_tokens": args.row_tokens,
        "auto_choice": chosen,
        "attention_log": log_lines[0],
        "peak_flops": peak,
        "mfu_formula": MFU_FORMULA,
        "mean_conversations_per_row": float(np.mean([r["num_conversations"] for r in rows])),
        "mean_real_tokens_per_row": float(np.mean([r["num_tokens"] for r in rows])),
        "runs": [],
    }
    first = True
    started = time.monotonic()

    def record(result: dict) -> None:
        results["runs"].append(result)
        print(format_run(result), flush=True)
        if args.json:  # after every run, so a run stopped from outside keeps what it measured
            with open(args.json, "w") as f:
                json.dump({**results, "layers": num_layers}, f, indent=2)

    for checkpointing in modes:
        for attn in backends:
            reason = unavailable.get(attn)
            if reason is None and args.time_budget and time.monotonic() - started > args.time_budget:
                reason = f"time budget of {args.time_budget:.0f} s spent (--time-budget)"
            if reason:
                record({"attn": attn, "checkpointing": checkpointing, "layers": num_layers, "skipped": reason})
                continue
            while True:
                error_message = None
                try:
                    result = run_config(shape, num_layers, rows, device, dtype, attn, checkpointing, args.warmup,
                                        args.steps, peak, memory)
                except Exception as error:  # noqa: BLE001 - one failing backend must not hide the others
                    oom = _is_oom(error)
                    error_message = f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"
                    if not oom:
                        traceback.print_exc()
                if error_message is None:
                    break
                # Out of the except block, so the traceback no longer holds the model: its memory can go back.
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                if oom and first and args.layers is None and num_layers > 1:
                    num_layers -= 1  # still fitting the model: one layer fewer and try again
                    print(f"out of memory; trying {num_layers} layers", flush=True)
                    continue
                result = {"attn": attn, "checkpointing": checkpointing, "layers": num_layers, "error": error_message}
                break
            first = first and "error" in result
            record(result)
    memory.close()
    results["layers"] = num_layers
    return results


def format_run(r: dict) -> str:
    """One table line."""
    head = f"{r['attn']:<18}{'on' if r['checkpointing'] else 'off':>5}{r['layers']:>7}"
    if "skipped" in r:
        return f"{head}  skipped: {r['skipped']}"
    if "error" in r:
        return f"{head}  {r['error']}"
    mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
    return (f"{head}{r['tokens_per_s']:>12.0f}{r['seconds_per_step']:>10.3f}{r['tflops_per_s']:>10.1f}{mfu:>8}"
            f"{r['peak_memory_gib']:>11.1f}")


def print_table(results: dict) -> None:
    """The human-readable summary."""
    print()
    print(results["attention_log"])
    print(f"{results['device']} ({results['machine'].get('gpu', results['machine']['cpu'])}), {results['dtype']}, "
          f"shape {results['shape']}, rows of {results['row_tokens']} tokens "
          f"({results['mean_real_tokens_per_row']:.0f} real, {results['mean_conversations_per_row']:.1f} "
          f"conversations on average), peak {results['peak_flops']} FLOP/s")
    print(results["mfu_formula"])
    print(f"{'attention':<18}{'ckpt':>5}{'layers':>7}{'tokens/s':>12}{'s/step':>10}{'TFLOP/s':>10}{'MFU':>8}"
          f"{'peak GiB':>11}")
    for r in results["runs"]:
        print(format_run(r))


def main(argv: list[str] | None = None) -> dict:
    """Parses arguments, runs, prints and optionally writes JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU, a couple of steps")
    parser.add_argument("--layers", type=int, help="decoder layers (default: as many as fit)")
    parser.add_argument("--row-tokens", type=int, default=8192)
    parser.add_argument("--length-scale", type=float, default=1.0, help="multiplies the conversation lengths")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation, allocator)")
    parser.add_argument("--backends", help="comma-separated attn implementations (default: all available + sdpa)")
    parser.add_argument("--checkpointing", choices=["off", "on", "both"], default="both")
    parser.add_argument("--sliding-window", type=int, help="override the window (0: none)")
    parser.add_argument("--peak-tflops", type=float, help="peak bf16 TFLOP/s for MFU if the GPU is not known")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the figures to this file (rewritten after every run)")
    parser.add_argument("--time-budget", type=float,
                        help="seconds: configurations not started by then are reported as skipped")
    args = parser.parse_args(argv)
    if args.smoke:
        args.device, args.dtype = "cpu", "float32"
        args.row_tokens, args.length_scale = 512, 1 / 16
        args.layers = args.layers or 2
        args.steps, args.warmup = min(args.steps, 2), min(args.warmup, 1)
    return print_and_save(run(args), print_table, args.json)


if __name__ == "__main__":
    main()
