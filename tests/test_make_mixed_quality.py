"""data_prep/make_mixed_quality.py: the synthetic expert / sub-optimal / held-out data for the C-RLFT demo."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "data_prep", "make_mixed_quality.py")


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


def test_same_seed_same_records_other_seed_other_records(mmq):
    first = mmq.make_mixed_quality(600, seed=3)
    again = mmq.make_mixed_quality(600, seed=3)
    other = mmq.make_mixed_quality(600, seed=4)
    assert first == again
    assert first["expert"] != other["expert"] and first["eval"] != other["eval"]


def test_sizes_models_and_task_balance(mmq):
    splits = mmq.make_mixed_quality(1000, expert_fraction=0.15, num_eval=90, seed=0)
    assert len(splits["expert"]) == 150 and len(splits["suboptimal"]) == 850 and len(splits["eval"]) == 90
    assert {r["model"] for r in splits["expert"]} == {"gpt-4"}
    assert {r["model"] for r in splits["suboptimal"]} == {"gpt-3.5-turbo"}
    assert [sum(r["task"] == t for r in splits["eval"]) for t in ("add", "sort", "reverse")] == [30, 30, 30]
    prefixes = {"What is ": "add", "Sort in ascending order: ": "sort", "Reverse the order of the words: ": "reverse"}
    counts = dict.fromkeys(prefixes.values(), 0)
    for record in splits["suboptimal"]:
        prompt, _ = _prompt_answer(record)
        counts[next(task for prefix, task in prefixes.items() if prompt.startswith(prefix))] += 1
    assert sorted(counts.values()) == [283, 283, 284]


def test_expert_always_correct_and_eval_answers_correct(mmq):
    splits = mmq.make_mixed_quality(900, seed=1)
    for record in splits["expert"]:
        prompt, answer = _prompt_answer(record)
        assert mmq.score({"answer": mmq.solve(prompt)}, answer), record
    for record in splits["eval"]:
        assert record["answer"] == mmq.solve(record["prompt"])


@pytest.mark.parametrize("error_rate", [0.0, 0.6, 0.8, 1.0])
@pytest.mark.parametrize("error_style", ["systematic", "random"])
def test_suboptimal_error_rate_is_the_target(mmq, error_rate, error_style):
    splits = mmq.make_mixed_quality(
        1200, expert_fraction=0.15, suboptimal_error_rate=error_rate, seed=2, error_style=error_style
    )
    num_wrong = sum(not mmq.score({"answer": mmq.solve(p)}, a) for p, a in map(_prompt_answer, splits["suboptimal"]))
    assert num_wrong == round(len(splits["suboptimal"]) * error_rate)
    assert mmq.summarize(splits)["suboptimal"] == {"num_conversations": 1020, "num_wrong": num_wrong}


def test_systematic_errors_are_the_plausible_bugs(mmq):
    splits = mmq.make_mixed_quality(1500, suboptimal_error_rate=1.0, seed=5)  # 1275 sub-optimal: 425 a task
    by_bug = {"add": 0, "sort": 0, "reverse": 0}
    for prompt, answer in map(_prompt_answer, splits["suboptimal"]):
        if prompt.startswith("What is "):
            a, b = (int(x) for x in prompt[len("What is ") : -1].split(" + "))
            no_carry = int("".join(str((int(x) + int(y)) % 10) for x, y in zip(f"{a:04d}", f"{b:04d}")))
            by_bug["add"] += answer == str(no_carry)
        elif prompt.startswith("Sort in ascending order: "):
            by_bug["sort"] += answer.split() == sorted(prompt.split(": ")[1].split())
        else:
            by_bug["reverse"] += answer.split() == prompt.split(": ")[1].split()[1:][::-1]
    # The bug is the answer whenever it is wrong at all; the rest (no carry, same-length numbers) get a slip.
    assert by_bug["reverse"] == 425
    assert 0.7 * 425 < by_bug["add"] < 425 and 0.6 * 425 < by_bug["sort"] < 425


def test_random_slips_are_near_misses(mmq):
    splits = mmq.make_mixed_quality(900, suboptimal_error_rate=1.0, seed=6, error_style="random")
    for prompt, answer in map(_prompt_answer, splits["suboptimal"]):
        correct = mmq.solve(prompt)
        assert answer != correct
        if prompt.startswith("What is "):  # one digit changed by one, same length
            diffs = [(int(x), int(y)) for x, y in zip(correct, answer) if x != y]
            assert len(answer) == len(correct) and len(diffs) == 1 and abs(diffs[0][0] - diffs[0][1]) == 1
        else:
            assert sorted(answer.split()) == sorted(correct.split()) or len(answer) == len(correct)


def test_eval_prompts_held_out_and_training_prompts_distinct(mmq):
    splits = mmq.make_mixed_quality(3000, num_eval=600, seed=7)
    train_prompts = [_prompt_answer(r)[0] for r in splits["expert"] + splits["suboptimal"]]
    eval_prompts = [r["prompt"] for r in splits["eval"]]
    assert len(set(train_prompts)) == len(train_prompts) and len(set(eval_prompts)) == len(eval_prompts)
    assert not set(train_prompts) & set(eval_prompts)


def test_score_normalises_whitespace_only(mmq):
    record = {"prompt": "Sort in ascending order: 3 1 2", "answer": "1 2 3"}
    assert mmq.score(record, " 1  2\n3 ")
    assert not mmq.score(record, "1 3 2") and not mmq.score(record, "123") and not mmq.score(record, "1, 2, 3")


def test_bad_arguments_raise_value_error(mmq):
    with pytest.raises(ValueError, match="expert_fraction"):
        mmq.make_mixed_quality(10, expert_fraction=1.5)
    with pytest.raises(ValueError, match="unknown"):
        mmq.make_mixed_quality(10, tasks=("add", "divide"))
    with pytest.raises(ValueError, match="error_style"):
        mmq.make_mixed_quality(10, error_style="subtle")
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
    # Deterministic on disk too.
    again = tmp_path / "again"
    subprocess.run(
        [sys.executable, SCRIPT, "--out", str(again), *args[2:], "--seed", "9"], check=True, capture_output=True
    )
    assert (again / "suboptimal.jsonl").read_text() == (out / "suboptimal.jsonl").read_text()
