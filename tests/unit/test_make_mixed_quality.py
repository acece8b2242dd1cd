"""data_prep/make_mixed_quality.py: the synthetic expert / sub-optimal / held-out data of the C-RLFT demo."""

import importlib.util
import json
import os
import subprocess
import sys
from collections import Counter

import pytest
from helpers import REPO_ROOT as ROOT

SCRIPT = os.path.join(ROOT, "data_prep", "make_mixed_quality.py")
ALL_TASKS = ("sort", "add", "reverse")
PREFIXES = {"Sort the digits of ": "sort", "What is ": "add", "Reverse the order of the words: ": "reverse"}


@pytest.fixture(scope="module")
def mmq():
    spec = importlib.util.spec_from_file_location("make_mixed_quality", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _prompt_answer(record):
    turns = record["conversations"]
    assert [t["from"] for t in turns] == ["human", "gpt"]
    return turns[0]["value"], turns[1]["value"]


def _task_of(prompt):
    return next(task for prefix, task in PREFIXES.items() if prompt.startswith(prefix))


def test_same_seed_same_records_other_seed_other_records(mmq):
    first = mmq.make_mixed_quality(600, seed=3, tasks=ALL_TASKS)
    again = mmq.make_mixed_quality(600, seed=3, tasks=ALL_TASKS)
    other = mmq.make_mixed_quality(600, seed=4, tasks=ALL_TASKS)
    assert first == again
    assert first["expert"] != other["expert"] and first["eval"] != other["eval"]


def test_default_is_the_sort_task(mmq):
    splits = mmq.make_mixed_quality(200, num_eval=20, seed=0)
    prompts = [_prompt_answer(r)[0] for r in splits["expert"] + splits["suboptimal"]]
    assert {_task_of(p) for p in prompts} == {"sort"} and {r["task"] for r in splits["eval"]} == {"sort"}
    assert all(4 <= len(p[len("Sort the digits of ") : -1]) <= 6 for p in prompts)


def test_sizes_models_and_task_balance(mmq):
    splits = mmq.make_mixed_quality(1000, expert_fraction=0.15, num_eval=90, seed=0, tasks=ALL_TASKS)
    assert len(splits["expert"]) == 150 and len(splits["suboptimal"]) == 850 and len(splits["eval"]) == 90
    assert {r["model"] for r in splits["expert"]} == {"gpt-4"}
    assert {r["model"] for r in splits["suboptimal"]} == {"gpt-3.5-turbo"}
    assert Counter(r["task"] for r in splits["eval"]) == {"sort": 30, "add": 30, "reverse": 30}
    counts = Counter(_task_of(_prompt_answer(r)[0]) for r in splits["suboptimal"])
    assert sorted(counts.values()) == [283, 283, 284]


def test_expert_always_correct_and_eval_answers_correct(mmq):
    splits = mmq.make_mixed_quality(900, seed=1, tasks=ALL_TASKS)
    for record in splits["expert"]:
        prompt, answer = _prompt_answer(record)
        assert mmq.score({"answer": mmq.solve(prompt)}, answer), record
    for record in splits["eval"]:
        assert record["answer"] == mmq.solve(record["prompt"])
    assert mmq.solve("Sort the digits of 53917.") == "13579" and mmq.solve("What is 47 + 385?") == "432"
    assert mmq.solve("Reverse the order of the words: cat sun red") == "red sun cat"


@pytest.mark.parametrize("error_rate", [0.0, 0.6, 0.8, 1.0])
@pytest.mark.parametrize("error_style", ["systematic", "random"])
def test_suboptimal_error_rate_is_the_target(mmq, error_rate, error_style):
    splits = mmq.make_mixed_quality(
        1200, expert_fraction=0.15, suboptimal_error_rate=error_rate, seed=2, error_style=error_style, tasks=ALL_TASKS
    )
    num_wrong = sum(not mmq.score({"answer": mmq.solve(p)}, a) for p, a in map(_prompt_answer, splits["suboptimal"]))
    assert num_wrong == round(len(splits["suboptimal"]) * error_rate)
    assert mmq.summarize(splits)["suboptimal"] == {"num_conversations": 1020, "num_wrong": num_wrong}
    assert mmq.summarize(splits)["expert"] == {"num_conversations": 180, "num_wrong": 0}


def test_systematic_errors_are_the_bugs_and_keep_the_answer_up_to_its_end(mmq):
    splits = mmq.make_mixed_quality(1500, suboptimal_error_rate=1.0, seed=5, tasks=ALL_TASKS)
    for prompt, answer in map(_prompt_answer, splits["suboptimal"]):
        task, correct = _task_of(prompt), mmq.solve(prompt)
        if task == "sort":  # the largest digit is missing
            assert answer == correct[:-1], (prompt, answer)
        elif task == "add":  # the sum plus one
            assert int(answer) == int(correct) + 1, (prompt, answer)
        else:  # the last word of the reversal (the prompt's first word) is missing
            assert answer.split() == correct.split()[:-1], (prompt, answer)


def test_random_slips_are_near_misses(mmq):
    splits = mmq.make_mixed_quality(900, suboptimal_error_rate=1.0, seed=6, error_style="random", tasks=ALL_TASKS)
    num_swaps = 0
    for prompt, answer in map(_prompt_answer, splits["suboptimal"]):
        correct = mmq.solve(prompt)
        assert answer != correct and len(answer) == len(correct), (prompt, answer)
        if _task_of(prompt) == "add":  # one digit changed by one
            diffs = [(int(x), int(y)) for x, y in zip(correct, answer) if x != y]
            assert len(diffs) == 1 and abs(diffs[0][0] - diffs[0][1]) == 1, (prompt, answer)
        else:  # two neighbours swapped, or (digits all equal) one digit changed
            items, wrong = (
                (list(correct), list(answer)) if _task_of(prompt) == "sort" else (correct.split(), answer.split())
            )
            positions = [i for i, (x, y) in enumerate(zip(items, wrong)) if x != y]
            swapped = len(positions) == 2 and positions[1] == positions[0] + 1 and sorted(items) == sorted(wrong)
            num_swaps += swapped
            assert swapped or len(set(items)) == 1, (prompt, answer)
    assert num_swaps > 500


def test_eval_prompts_held_out_and_training_prompts_distinct(mmq):
    splits = mmq.make_mixed_quality(3000, num_eval=600, seed=7)
    train_prompts = [_prompt_answer(r)[0] for r in splits["expert"] + splits["suboptimal"]]
    eval_prompts = [r["prompt"] for r in splits["eval"]]
    assert len(set(train_prompts)) == len(train_prompts) and len(set(eval_prompts)) == len(eval_prompts)
    assert not set(train_prompts) & set(eval_prompts)


def test_score_normalises_whitespace_only(mmq):
    record = {"prompt": "Reverse the order of the words: cat sun red", "answer": "red sun cat"}
    assert mmq.score(record, " red  sun\ncat ")
    assert (
        not mmq.score(record, "red sun") and not mmq.score(record, "redsuncat") and not mmq.score(record, "Red sun cat")
    )


def test_bad_arguments_raise_value_error(mmq, monkeypatch):
    with pytest.raises(ValueError, match="expert_fraction"):
        mmq.make_mixed_quality(10, expert_fraction=1.5)
    with pytest.raises(ValueError, match="unknown"):
        mmq.make_mixed_quality(10, tasks=("add", "divide"))
    with pytest.raises(ValueError, match="error_style"):
        mmq.make_mixed_quality(10, error_style="subtle")
    monkeypatch.setattr(mmq, "SORT_NUM_DIGITS", (2,))  # only 90 distinct prompts
    with pytest.raises(ValueError, match="fewer conversations"):
        mmq.make_mixed_quality(80, num_eval=20)
    with pytest.raises(ValueError, match="not a prompt"):
        mmq.solve("What is love?")


def test_cli_writes_three_sharegpt_files(tmp_path):
    out = tmp_path / "mixed"
    args = ["--out", str(out), "--num-conversations", "200", "--expert-fraction", "0.2", "--num-eval", "30"]
    result = subprocess.run([sys.executable, SCRIPT, *args, "--seed", "9"], capture_output=True, text=True, check=True)
    summary = json.loads(result.stdout)
    assert summary["expert"] == {"num_conversations": 40, "num_wrong": 0}
    assert summary["suboptimal"] == {"num_conversations": 160, "num_wrong": 128}
    files = {name: (out / f"{name}.jsonl").read_text().splitlines() for name in ("expert", "suboptimal", "eval")}
    assert [len(lines) for lines in files.values()] == [40, 160, 30]
    first = json.loads(files["expert"][0])
    assert set(first) == {"id", "model", "conversations"} and first["model"] == "gpt-4"
    assert set(json.loads(files["eval"][0])) == {"id", "task", "prompt", "answer"}
    bad = subprocess.run(
        [sys.executable, SCRIPT, "--out", str(out), "--tasks", "sort,divide"], capture_output=True, text=True
    )
    assert bad.returncode == 2 and "unknown ['divide']" in bad.stderr
    # Deterministic on disk too.
    again = tmp_path / "again"
    subprocess.run(
        [sys.executable, SCRIPT, "--out", str(again), *args[2:], "--seed", "9"], check=True, capture_output=True
    )
    assert (again / "suboptimal.jsonl").read_text() == (out / "suboptimal.jsonl").read_text()
