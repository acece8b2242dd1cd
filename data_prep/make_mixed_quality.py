"""Write a synthetic mixed-quality ShareGPT dataset whose answers can be checked exactly.

A task a tiny model learns in minutes on a CPU ("Sort the digits of 53917." -> "13579") is answered by two sources,
like the GPT-4 / GPT-3.5 mix C-RLFT was made for:

* ``expert.jsonl``: always correct (``model: gpt-4``; train it with condition ``GPT4`` and reward 1.0);
* ``suboptimal.jsonl``: wrong for a set share of its answers (``model: gpt-3.5-turbo``; condition ``GPT3``,
  reward 0.1), correct otherwise;
* ``eval.jsonl``: held-out prompts with their exact answer (``{"id", "task", "prompt", "answer"}``), none of them
  a training prompt.

Why the sub-optimal answers are wrong the way they are
    Each wrong answer comes from one repeatable, plausible bug: an off-by-one loop bound that drops the last item
    (the largest digit of a sort, the first word of a reversal) or an answer off by one (addition). Two properties
    make C-RLFT's effect visible in miniature:

    * *Systematic*: a bug maps a prompt to one predictable wrong answer. With 85% sub-optimal data wrong 80% of the
      time, the bug's answer outweighs the correct one in the mixed data (0.68 vs 0.32), so plain SFT on everything
      learns the bug, while the source condition can learn to switch it off. Random slips (``--error-style
      random``: a digit off by one or two neighbours swapped, at a random place) spread over many wrong answers,
      the correct one stays the most likely, and greedy decoding after plain SFT loses little.
    * *Late*: the wrong answer agrees with the correct one up to its last token, so the sub-optimal data still
      teaches the whole skill except that token. An early bug (e.g. an insertion sort that never inserts the last
      digit) conflicts with the correct answer in the middle and slowed the conditioned model's learning badly.

Usage::

    python data_prep/make_mixed_quality.py --out DIR --num-conversations 2000 --expert-fraction 0.15 --seed 0

``score(eval_record, completion)`` is the exact-match checker (whitespace normalised) for ``eval.jsonl`` records.
Tasks: ``sort`` (the default; 4 to 6 digits), ``add`` (two numbers of 2 or 3 digits) and ``reverse`` (3 to 6
words). A 2-layer model learns sorting digits within ~1,000 small steps; in the same budget it learned next to
nothing of addition or reversal, and mixing a second task halved its accuracy, so the demo uses ``sort`` alone.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path

TASKS = ("sort", "add", "reverse")
DEFAULT_TASKS = ("sort",)
ERROR_STYLES = ("systematic", "random")

EXPERT_MODEL = "gpt-4"
SUBOPTIMAL_MODEL = "gpt-3.5-turbo"

WORDS = (
    "cat dog sun moon tree fish bird car book door hand star rain snow fire road ship king milk baby "
    "red blue green black white gold happy cold hot big small old new fast slow dark light water stone wood "
    "house river horse apple bread music paper table glass chair"
).split()

# Task sizes. Digits and these words are one token each in Mistral's tokenizer, so answers stay short.
ADD_OPERAND_RANGES = ((10, 99), (100, 999))  # each operand is drawn from one of these ranges
SORT_NUM_DIGITS = (4, 5, 6)
REVERSE_LIST_LENGTHS = (3, 4, 5, 6)


def normalize_whitespace(text: str) -> str:
    """Collapse runs of whitespace to one space and strip the ends."""
    return " ".join(text.split())


def score(eval_record: dict, completion: str) -> bool:
    """Exact-match checker for one held-out prompt.

    Args:
        eval_record: A record of ``eval.jsonl`` (needs the key ``answer``).
        completion: The model's answer text (no role prefix, no end-of-turn token).

    Returns:
        True when the completion equals the expected answer after whitespace normalisation.
    """
    return normalize_whitespace(completion) == normalize_whitespace(eval_record["answer"])


# ----------------------------------------------------------------------------------------------- prompts
def _sample_add(rng: random.Random) -> tuple[str, tuple[int, int]]:
    a, b = (rng.randint(*rng.choice(ADD_OPERAND_RANGES)) for _ in range(2))
    return f"What is {a} + {b}?", (a, b)


def _sample_sort(rng: random.Random) -> tuple[str, str]:
    num_digits = rng.choice(SORT_NUM_DIGITS)
    digits = str(rng.randint(10 ** (num_digits - 1), 10**num_digits - 1))
    return f"Sort the digits of {digits}.", digits


def _sample_reverse(rng: random.Random) -> tuple[str, list[str]]:
    words = rng.sample(WORDS, rng.choice(REVERSE_LIST_LENGTHS))
    return "Reverse the order of the words: " + " ".join(words), words


# ----------------------------------------------------------------------------------------------- answers
def _add_correct(operands: tuple[int, int]) -> str:
    return str(operands[0] + operands[1])


def _add_off_by_one(operands: tuple[int, int]) -> str:
    """The off-by-one bug: the sum plus one."""
    return str(operands[0] + operands[1] + 1)


def _sort_correct(digits: str) -> str:
    return "".join(sorted(digits))


def _sort_stops_early(digits: str) -> str:
    """Off-by-one loop bound: the sorted digits without the last (largest) one."""
    return _sort_correct(digits)[:-1]


def _reverse_correct(words: list[str]) -> str:
    return " ".join(reversed(words))


def _reverse_stops_early(words: list[str]) -> str:
    """Off-by-one loop bound: the reversal never emits the first word."""
    return " ".join(reversed(words[1:]))


def _slip_one_digit(answer: str, rng: random.Random) -> str:
    """One digit of the answer off by one, at a random place (a random slip, not a bug)."""
    positions = [i for i, ch in enumerate(answer) if ch.isdigit()]
    position = rng.choice(positions)
    digit = int(answer[position])
    if position == 0 and digit == 1 and len(positions) > 1:
        new_digit = 2  # keep the number's length: a leading 0 would be an implausible slip
    elif digit == 0:
        new_digit = 1
    elif digit == 9:
        new_digit = 8
    else:
        new_digit = digit + rng.choice((-1, 1))
    return answer[:position] + str(new_digit) + answer[position + 1 :]


def _slip_adjacent_swap(items: list[str], rng: random.Random) -> list[str] | None:
    """Two adjacent items swapped at a random place; None when every such swap leaves the list unchanged."""
    candidates = [i for i in range(len(items) - 1) if items[i] != items[i + 1]]
    if not candidates:
        return None
    i = rng.choice(candidates)
    items = list(items)
    items[i], items[i + 1] = items[i + 1], items[i]
    return items


def _wrong_answer(task: str, payload, correct: str, style: str, rng: random.Random) -> str:
    """A wrong answer for a sub-optimal record: the task's bug, or a random slip for ``style="random"``."""
    if style == "systematic":
        wrong = BUGS[task](payload)
        assert wrong != correct, (task, payload)  # every bug drops or changes a token
        return wrong
    if task == "reverse":
        return " ".join(_slip_adjacent_swap(correct.split(" "), rng))  # the words of a prompt are distinct
    if task == "sort":
        swapped = _slip_adjacent_swap(list(correct), rng)
        if swapped is not None:
            return "".join(swapped)
    return _slip_one_digit(correct, rng)  # addition, or digits all equal: only a changed digit makes it wrong


SAMPLERS: dict[str, Callable[[random.Random], tuple[str, object]]] = {
    "sort": _sample_sort,
    "add": _sample_add,
    "reverse": _sample_reverse,
}
CORRECT: dict[str, Callable] = {
    "sort": _sort_correct,
    "add": _add_correct,
    "reverse": _reverse_correct,
}
BUGS: dict[str, Callable] = {
    "sort": _sort_stops_early,
    "add": _add_off_by_one,
    "reverse": _reverse_stops_early,
}
# How to read a task's payload back from its prompt (for solve()).
PROMPT_PATTERNS: dict[str, tuple[re.Pattern, Callable]] = {
    "sort": (re.compile(r"Sort the digits of (\d+)\."), lambda m: m[1]),
    "add": (re.compile(r"What is (\d+) \+ (\d+)\?"), lambda m: (int(m[1]), int(m[2]))),
    "reverse": (re.compile(r"Reverse the order of the words: (\w+(?: \w+)*)"), lambda m: m[1].split(" ")),
}


# ----------------------------------------------------------------------------------------------- dataset
def _sample_unique(task: str, rng: random.Random, excluded: set[str], max_attempts: int = 1000):
    for _ in range(max_attempts):
        prompt, payload = SAMPLERS[task](rng)
        if prompt not in excluded:
            excluded.add(prompt)
            return prompt, payload
    raise ValueError(f"task {task!r}: no new distinct prompt in {max_attempts} tries; ask for fewer conversations")


def _balanced_tasks(count: int, tasks: tuple[str, ...], rng: random.Random) -> list[str]:
    """``count`` task names, as equal a share each as the count allows, in random order."""
    names = [tasks[i % len(tasks)] for i in range(count)]
    rng.shuffle(names)
    return names


def _exact_flags(count: int, fraction: float, rng: random.Random) -> list[bool]:
    """``count`` flags of which exactly ``round(count * fraction)`` are True, in random order."""
    num_true = round(count * fraction)
    flags = [True] * num_true + [False] * (count - num_true)
    rng.shuffle(flags)
    return flags


def _sharegpt(record_id: str, model: str, prompt: str, answer: str) -> dict:
    return {
        "id": record_id,
        "model": model,
        "conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value": answer}],
    }


def make_mixed_quality(
    num_conversations: int,
    expert_fraction: float = 0.15,
    suboptimal_error_rate: float = 0.8,
    num_eval: int = 300,
    seed: int = 0,
    tasks: tuple[str, ...] = DEFAULT_TASKS,
    error_style: str = "systematic",
) -> dict[str, list[dict]]:
    """Build the three splits in memory.

    Args:
        num_conversations: Training conversations in total (expert plus sub-optimal).
        expert_fraction: Share of the training conversations that come from the expert source.
        suboptimal_error_rate: Share of sub-optimal answers that are wrong (exactly, up to rounding).
        num_eval: Held-out prompts, split evenly over the tasks.
        seed: Seed of every random choice; the same arguments give the same records.
        tasks: Task names to mix, a subset of ``TASKS``.
        error_style: ``"systematic"`` (a repeatable plausible bug per task) or ``"random"`` (random slips).

    Returns:
        ``{"expert": [...], "suboptimal": [...], "eval": [...]}``; training records are ShareGPT dicts,
        eval records are ``{"id", "task", "prompt", "answer"}``.

    Raises:
        ValueError: On an unknown task or error style, or a count or fraction out of range.
    """
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise ValueError(f"tasks: unknown {unknown} (choose from {list(TASKS)})")
    if error_style not in ERROR_STYLES:
        raise ValueError(f"error_style: {error_style!r} is not one of {list(ERROR_STYLES)}")
    if num_conversations < 1 or num_eval < 0:
        raise ValueError(f"num_conversations ({num_conversations}) must be >= 1 and num_eval ({num_eval}) >= 0")
    for name, value in (("expert_fraction", expert_fraction), ("suboptimal_error_rate", suboptimal_error_rate)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name}: {value} is not in [0, 1]")

    # Separate streams, so that e.g. changing the error rate does not change which prompts are drawn.
    prompt_rng = random.Random(f"{seed}-prompts")
    error_rng = random.Random(f"{seed}-errors")
    seen_prompts: set[str] = set()

    # Eval prompts are drawn first and then excluded from training, so they are held out by construction.
    eval_records = []
    for i, task in enumerate(_balanced_tasks(num_eval, tasks, prompt_rng)):
        prompt, payload = _sample_unique(task, prompt_rng, seen_prompts)
        eval_records.append({"id": f"eval-{i}", "task": task, "prompt": prompt, "answer": CORRECT[task](payload)})

    num_expert = round(num_conversations * expert_fraction)
    num_suboptimal = num_conversations - num_expert
    expert_records = []
    for i, task in enumerate(_balanced_tasks(num_expert, tasks, prompt_rng)):
        prompt, payload = _sample_unique(task, prompt_rng, seen_prompts)
        expert_records.append(_sharegpt(f"expert-{i}", EXPERT_MODEL, prompt, CORRECT[task](payload)))

    suboptimal_records = []
    wrong_flags = _exact_flags(num_suboptimal, suboptimal_error_rate, error_rng)
    for i, task in enumerate(_balanced_tasks(num_suboptimal, tasks, prompt_rng)):
        prompt, payload = _sample_unique(task, prompt_rng, seen_prompts)
        answer = CORRECT[task](payload)
        if wrong_flags[i]:
            answer = _wrong_answer(task, payload, answer, error_style, error_rng)
        suboptimal_records.append(_sharegpt(f"suboptimal-{i}", SUBOPTIMAL_MODEL, prompt, answer))

    return {"expert": expert_records, "suboptimal": suboptimal_records, "eval": eval_records}


def write_jsonl(path: Path, records: list[dict]) -> None:
    """Write one JSON object a line (UTF-8)."""
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def read_jsonl(path: str | Path) -> list[dict]:
    """Read a JSON-lines file written by :func:`write_jsonl`."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def summarize(splits: dict[str, list[dict]]) -> dict:
    """Counts per split and task, and the measured share of wrong sub-optimal answers (checked exactly)."""
    summary: dict = {}
    for name in ("expert", "suboptimal"):
        records = splits[name]
        num_wrong = 0
        for record in records:
            prompt, answer = record["conversations"][0]["value"], record["conversations"][1]["value"]
            num_wrong += not score({"answer": solve(prompt)}, answer)
        summary[name] = {"num_conversations": len(records), "num_wrong": num_wrong}
    summary["eval"] = {"num_prompts": len(splits["eval"]), "per_task": dict(Counter(r["task"] for r in splits["eval"]))}
    return summary


def solve(prompt: str) -> str:
    """The correct answer of any prompt this generator writes (used to audit the training files).

    Raises:
        ValueError: If the prompt is not one of this generator's task prompts.
    """
    for task, (pattern, payload_of) in PROMPT_PATTERNS.items():
        match = pattern.fullmatch(prompt)
        if match:
            return CORRECT[task](payload_of(match))
    raise ValueError(f"not a prompt of make_mixed_quality: {prompt!r}")


def main(argv: list[str] | None = None) -> None:
    """Command-line entry: write ``expert.jsonl``, ``suboptimal.jsonl`` and ``eval.jsonl`` into ``--out``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output directory (created if missing)")
    parser.add_argument("--num-conversations", type=int, default=2000, help="training conversations in total")
    parser.add_argument("--expert-fraction", type=float, default=0.15)
    parser.add_argument("--suboptimal-error-rate", type=float, default=0.8, help="share of wrong sub-optimal answers")
    parser.add_argument("--num-eval", type=int, default=300, help="held-out prompts")
    parser.add_argument("--tasks", default=",".join(DEFAULT_TASKS), help=f"comma-separated subset of {','.join(TASKS)}")
    parser.add_argument("--error-style", choices=ERROR_STYLES, default="systematic")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    try:
        splits = make_mixed_quality(
            num_conversations=args.num_conversations,
            expert_fraction=args.expert_fraction,
            suboptimal_error_rate=args.suboptimal_error_rate,
            num_eval=args.num_eval,
            seed=args.seed,
            tasks=tuple(t.strip() for t in args.tasks.split(",") if t.strip()),
            error_style=args.error_style,
        )
    except ValueError as error:
        parser.error(str(error))
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, records in splits.items():
        write_jsonl(out_dir / f"{name}.jsonl", records)
    print(json.dumps({"out": str(out_dir), **summarize(splits)}))


if __name__ == "__main__":
    main()
