"""Talking to an exported model: ``crlft chat`` and the exact-match evaluation ``crlft eval``.

Prompts are rendered by the training renderer (``crlft.render``) with the template the export's chat template is
made from, so text typed into a prompt stays text, as in training: ``<|end_of_turn|>`` in a message never becomes
the control token. The export's chat template keeps them text too through
``apply_chat_template(..., sanitize_control_tokens=True)`` (the same ids except next to a typed control string); an
export whose chat template is none of crlft's is rendered that way.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import re
import sys
import time
from collections import defaultdict
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from crlft.config import Recipe
from crlft.conversation import Conversation, Message
from crlft.errors import UserError
from crlft.jsonl import JsonLineError, read_jsonl
from crlft.lora import ADAPTER_CONFIG_FILE, is_adapter_dir, load_adapter_model
from crlft.render import condition_problem, render_batch
from crlft.runlog import log_eval_to_wandb
from crlft.templates import TEMPLATES, Template


def load_export(model_dir: str, dtype: str = "auto") -> tuple[Any, Any]:
    """Load an exported Hugging Face directory (model + tokenizer) for generation on this machine.

    Args:
        model_dir: A directory written by training's export or ``crlft export``, or a LoRA export's ``adapter/``
            (loaded onto its base with ``peft``).
        dtype: ``auto`` (bf16 on GPUs, fp32 on CPUs), ``bfloat16`` or ``float32``.

    Returns:
        ``(model, tokenizer)``, the model in eval mode on the GPU when there is one.
    """
    adapter = is_adapter_dir(model_dir)
    if not adapter and not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise UserError(f"{model_dir}: not a model directory (no config.json) nor an adapter (no "
                        f"{ADAPTER_CONFIG_FILE}); pass an export directory, e.g. RUN/export/final")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dtype == "auto":
        torch_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        torch_dtype = getattr(torch, dtype)
    if adapter:  # a LoRA export's adapter/: its base (from adapter_config.json) with the adapter, through peft
        model, tokenizer = load_adapter_model(model_dir, torch_dtype)
        model = model.to(device).eval()
    else:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype).to(device).eval()
    if tokenizer.chat_template is None:
        raise UserError(f"{model_dir}: the tokenizer has no chat_template; export it with crlft")
    return model, tokenizer


def export_template(tokenizer: Any) -> Template | None:
    """The crlft template whose chat template the tokenizer carries (with the export's default condition), or None
    for a foreign one."""
    for template in TEMPLATES.values():
        if template.chat_template == tokenizer.chat_template:
            return template
        if template.uses_condition and tokenizer.chat_template:
            # Exports default to the recipe's best class (crlft.conditions.inference_template): recover it, and
            # accept it only if the template rebuilt with it is exactly the export's.
            match = _DEFAULT_CONDITION.search(tokenizer.chat_template)
            if match is not None:
                candidate = dataclasses.replace(template, inference_condition=_unquote_jinja(match.group(1)))
                if candidate.chat_template == tokenizer.chat_template:
                    return candidate
    return None


# How crlft.templates writes the default condition into a jinja chat template (a single-quoted jinja literal).
_DEFAULT_CONDITION = re.compile(r"\{%- set condition = '((?:[^'\\]|\\.)*)' %\}")


def _unquote_jinja(literal: str) -> str:
    return re.sub(r"\\(.)", lambda m: {"n": "\n", "r": "\r"}.get(m.group(1), m.group(1)), literal)


def prompt_ids(tokenizer: Any, messages: list[dict[str, str]], condition: str | None) -> list[int]:
    """Token ids of ``messages`` followed by the assistant's prefix; message text is tokenized as text.

    Args:
        tokenizer: The export's tokenizer.
        messages: ``[{"role": "system"|"user"|"assistant", "content": ...}, ...]``.
        condition: The class condition for templates that take one (OpenChat's); None uses the template's
            inference condition, "" the plain prefixes.

    Raises:
        UserError: A condition holding a control token, or a role other than system, user and assistant.
    """
    return batch_prompt_ids(tokenizer, [messages], condition)[0]


def batch_prompt_ids(tokenizer: Any, conversations: list[list[dict[str, str]]], condition: str | None
                     ) -> list[list[int]]:
    """``prompt_ids`` of many conversations under one condition, with one tokenizer call (``render_batch``)."""
    template = export_template(tokenizer)
    if template is None:  # not made by crlft: its chat template, with typed control tokens kept as text
        if "sanitize_control_tokens" not in inspect.signature(tokenizer.apply_chat_template).parameters:
            raise UserError("this chat template is none of crlft's, and this transformers version cannot keep "
                            "control tokens typed in a message as text (apply_chat_template's "
                            "sanitize_control_tokens); upgrade transformers or export the model with crlft")
        kwargs = {} if condition is None else {"condition": condition}
        return [list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                   return_dict=False, sanitize_control_tokens=True, **kwargs))
                for messages in conversations]
    if condition is not None:
        # An empty condition in a generation prompt means the template's inference condition: the one asked for.
        template = dataclasses.replace(template, inference_condition=condition)
        problem = condition_problem(condition, template, tokenizer)
        if problem:
            raise UserError(problem)
    return render_batch([_conversation(messages) for messages in conversations], template, tokenizer,
                        add_generation_prompt=True)[0]


def _conversation(messages: list[dict[str, str]]) -> Conversation:
    system = [m["content"] for m in messages if m.get("role") == "system"]
    turns = [m for m in messages if m.get("role") != "system"]
    for m in turns:
        if m.get("role") not in ("user", "assistant") or not isinstance(m.get("content"), str):
            raise UserError(f"a message must have role system, user or assistant and string content, got {m!r}")
    return Conversation([Message(m["role"], m["content"]) for m in turns], system="\n\n".join(system))


@torch.no_grad()
def generate_batch(model: Any, tokenizer: Any, batch_ids: list[list[int]], max_new_tokens: int,
                   temperature: float = 0.0) -> list[str]:
    """Generate a completion for each prompt (left-padded into one batch); greedy when ``temperature`` is 0.

    Returns:
        The completions' text, cut at the end-of-turn token (the generation config's eos).
    """
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    length = max(len(ids) for ids in batch_ids)
    input_ids = torch.full((len(batch_ids), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch_ids), length), dtype=torch.long)
    for i, ids in enumerate(batch_ids):
        input_ids[i, length - len(ids):] = torch.tensor(ids)
        attention_mask[i, length - len(ids):] = 1
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    out = model.generate(input_ids=input_ids.to(model.device), attention_mask=attention_mask.to(model.device),
                         max_new_tokens=max_new_tokens, pad_token_id=pad_id, **sampling)
    eos_ids = model.generation_config.eos_token_id
    eos_ids = set(eos_ids if isinstance(eos_ids, list) else [eos_ids])
    texts = []
    for row in out[:, length:].tolist():
        cut = next((i for i, token in enumerate(row) if token in eos_ids), len(row))
        texts.append(tokenizer.decode(row[:cut], skip_special_tokens=True))
    return texts


# --------------------------------------------------------------------------------------------------------------
# Exact-match evaluation
# --------------------------------------------------------------------------------------------------------------


def normalize_whitespace(text: str) -> str:
    """Collapse runs of whitespace to one space and strip the ends (the exact-match comparison)."""
    return " ".join(text.split())


def read_eval_prompts(path: str, max_samples: int | None = None) -> list[dict[str, Any]]:
    """Held-out prompts: a JSON-lines file of ``{"prompt": ..., "answer": ..., "task"?: ...}`` records.

    Raises:
        UserError: A missing file, a malformed line or a record without ``prompt``/``answer`` (file and line named).
    """
    if not os.path.isfile(path):
        raise UserError(f"eval prompts not found: {path}")
    records = []
    try:
        for line_number, record in read_jsonl(path):
            if not isinstance(record, dict) or not isinstance(record.get("prompt"), str) or "answer" not in record:
                raise UserError(f"{path}:{line_number}: an eval record needs a string 'prompt' and an 'answer'")
            records.append(record)
            if max_samples is not None and len(records) >= max_samples:
                break
    except JsonLineError as e:
        raise UserError(f"{path}:{e.line_number}: malformed JSON: {e.reason}") from None
    return records


def evaluate_exact_match(model: Any, tokenizer: Any, records: list[dict[str, Any]], conditions: list[str],
                         max_new_tokens: int = 32, batch_size: int = 64) -> dict[str, Any]:
    """Greedy answers to every held-out prompt under each condition, scored by exact match.

    Args:
        model: The model (eval mode).
        tokenizer: Its tokenizer with the chat template.
        records: From ``read_eval_prompts``.
        conditions: Conditions to prompt with (e.g. ``["GPT4", "GPT3"]``; "" for a plain ``User:`` prefix).
        max_new_tokens: Longest answer generated.
        batch_size: Prompts generated together.

    Returns:
        ``{condition: {"accuracy": float, "num_correct": int, "num_prompts": int, "per_task": {task: accuracy},
        "examples": [first few (prompt, answer, completion)]}}``.
    """
    results: dict[str, Any] = {}
    for condition in conditions:
        all_ids = batch_prompt_ids(tokenizer, [[{"role": "user", "content": r["prompt"]}] for r in records], condition)
        completions: list[str] = []
        for start in range(0, len(all_ids), batch_size):
            completions += generate_batch(model, tokenizer, all_ids[start:start + batch_size], max_new_tokens)
        per_task: dict[str, list[bool]] = defaultdict(list)
        correct_flags = []
        for record, completion in zip(records, completions):
            correct = normalize_whitespace(completion) == normalize_whitespace(str(record["answer"]))
            correct_flags.append(correct)
            per_task[str(record.get("task", "all"))].append(correct)
        results[condition] = {
            "accuracy": sum(correct_flags) / max(len(correct_flags), 1),
            "num_correct": sum(correct_flags),
            "num_prompts": len(correct_flags),
            "per_task": {task: sum(flags) / len(flags) for task, flags in sorted(per_task.items())},
            "examples": [{"prompt": r["prompt"], "answer": r["answer"], "completion": c}
                         for r, c in list(zip(records, completions))[:3]],
        }
    return results


def format_eval_table(results: dict[str, Any]) -> str:
    """The per-condition accuracy table ``crlft eval`` prints."""
    tasks = sorted({task for r in results.values() for task in r["per_task"]})
    header = f"{'condition':<16} {'accuracy':>9} {'correct':>9}" + "".join(f" {task:>9}" for task in tasks)
    lines = [header, "-" * len(header)]
    for condition, r in results.items():
        name = condition if condition else '""'
        lines.append(f"{name:<16} {r['accuracy']:>9.1%} {r['num_correct']:>4}/{r['num_prompts']:<4}"
                     + "".join(f" {r['per_task'].get(task, float('nan')):>9.1%}" for task in tasks))
    return "\n".join(lines)


def run_eval(recipe: Recipe, model_dir: str | None = None) -> str:
    """``crlft eval``: exact-match accuracy of an export on ``eval.prompts`` under each of ``eval.conditions``.

    Prints the table and writes ``train.output_dir/eval.json``.

    Args:
        recipe: the recipe (its ``eval`` section).
        model_dir: the export (default: ``train.output_dir/export/final``).

    Returns:
        The path of ``eval.json``.
    """
    e = recipe.eval
    if not e.prompts:
        raise UserError(f"{recipe.where('eval', 'prompts')}: no held-out prompts configured")
    model_dir = model_dir or os.path.join(recipe.train.output_dir, "export", "final")
    records = read_eval_prompts(e.prompts, e.max_samples)
    model, tokenizer = load_export(model_dir)
    started = time.perf_counter()
    results = evaluate_exact_match(model, tokenizer, records, e.conditions, e.max_new_tokens, e.batch_size)
    print(f"exact-match accuracy of {model_dir} on {len(records)} held-out prompts of {e.prompts} "
          f"(greedy, {time.perf_counter() - started:.0f} s):")
    print(format_eval_table(results))
    out_path = os.path.join(recipe.train.output_dir, "eval.json")
    os.makedirs(recipe.train.output_dir, exist_ok=True)
    with open(out_path, "w", encoding="utf-8") as f:
        json.dump({"model": model_dir, "prompts": e.prompts, "results": results}, f, indent=2)
    print(f"written: {out_path}")
    wandb_id = log_eval_to_wandb(recipe, model_dir, results, _export_step(model_dir))
    if wandb_id is not None:
        print(f"logged to wandb run {wandb_id}")
    return out_path


def _export_step(model_dir: str) -> int | None:
    try:
        with open(os.path.join(model_dir, "crlft_export.json"), encoding="utf-8") as f:
            return json.load(f).get("step")
    except (OSError, ValueError):
        return None


# --------------------------------------------------------------------------------------------------------------
# Chat
# --------------------------------------------------------------------------------------------------------------


def chat(model_dir: str, *, condition: str | None, system: str, prompt: str | None, max_new_tokens: int,
         temperature: float, show_prompt: bool) -> None:
    """``crlft chat``: answer ``prompt`` once, or talk interactively (/reset clears the history, /exit quits)."""
    model, tokenizer = load_export(model_dir)
    history: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []

    def answer(text: str) -> str:
        history.append({"role": "user", "content": text})
        ids = prompt_ids(tokenizer, history, condition)
        if show_prompt:
            print(f"[prompt] {tokenizer.decode(ids)!r}", file=sys.stderr)
        reply = generate_batch(model, tokenizer, [ids], max_new_tokens, temperature)[0]
        history.append({"role": "assistant", "content": reply})
        return reply

    if prompt is not None:
        print(answer(prompt))
        return
    interactive = sys.stdin.isatty()
    if interactive:
        shown = "the export's default condition" if condition is None else f"condition {condition!r}"
        print(f"crlft chat with {model_dir} ({shown}); /reset, /exit", file=sys.stderr)
    while True:
        try:
            text = input("you> " if interactive else "")
        except EOFError:
            return
        if text.strip() in ("/exit", "/quit"):
            return
        if text.strip() == "/reset":
            del history[1 if system else 0:]
            continue
        if text.strip():
            print(("bot> " if interactive else "") + answer(text), flush=True)


__all__ = [
    "batch_prompt_ids",
    "chat",
    "evaluate_exact_match",
    "export_template",
    "format_eval_table",
    "generate_batch",
    "load_export",
    "prompt_ids",
    "read_eval_prompts",
    "run_eval",
]
