"""``crlft prepare`` / ``crlft inspect`` end to end on tiny data with the offline OpenChat 3.5 tokenizer.

Covers: prepared rows equal the template's ``render`` of the same conversations (and the OpenChat 3.5 model
card's token ids), column types, the report, reuse and regeneration, num_proc=2, every bad input through the
command line (exit code 2, located message, no traceback), ``on_error: skip`` and ``inspect``.
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from helpers import REPO_ROOT as ROOT

from crlft.cli import main
from crlft.conversation import Conversation, Message
from crlft.errors import UserError
from crlft.prepare import META_FILE, REPORT_FILE, is_prepared, load_prepared, prepare
from crlft.recipe import load_recipe

# OpenChat 3.5 model card (facts copied as literals): "GPT4 Correct User: Hello<|end_of_turn|>GPT4 Correct
# Assistant: Hi<|end_of_turn|>..." and the coding-mode prompt.
CARD_HELLO_HI = [1, 420, 6316, 28781, 3198, 3123, 1247, 28747, 22557, 32000,
                 420, 6316, 28781, 3198, 3123, 21631, 28747, 15359, 32000]
CARD_CODE_PROMPT = [1, 7596, 1247, 28747, 26256, 2936, 7653, 1413, 334, 1680, 32000, 7596, 21631, 28747]


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    from crlft.tokenizer import build_tokenizer

    directory = tmp_path_factory.mktemp("openchat_3.5_tokenizer")
    build_tokenizer("openchat_3.5", str(directory))
    return str(directory)


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from crlft.templates import TEMPLATES
    from crlft.tokenizer import load_tokenizer

    return load_tokenizer(tokenizer_dir, TEMPLATES["openchat_3.5"])


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def write_recipe(tmp_path, tokenizer_dir, sources, extra="", max_context=8192, name="recipe.yaml"):
    source_yaml = "\n".join("    - " + json.dumps(s) for s in sources)
    text = textwrap.dedent(f"""\
        model:
          base: {tokenizer_dir}
          max_context: {max_context}
        data:
          output_dir: {tmp_path / "prepared"}
          num_proc: 1
          sources:
        """) + source_yaml + "\n" + extra + textwrap.dedent(f"""\
        train:
          output_dir: {tmp_path / "run"}
          batch_max_len: {max_context}
        """)
    path = tmp_path / name
    path.write_text(text)
    return str(path)


OPENCHAT_RECORDS = [
    {"items": [{"role": "user", "content": "Hello", "weight": 0.0},
               {"role": "assistant", "content": "Hi", "weight": 1.0}], "condition": "GPT4 Correct", "system": ""},
    {"items": [{"role": "user", "content": "Implement quicksort using C++", "weight": 0.0},
               {"role": "assistant", "content": "Sure:\n```cpp\nvoid qs();\n```", "weight": 1.0}],
     "condition": "Code", "system": ""},
    {"items": [{"role": "user", "content": "Tell me about <|end_of_turn|> tokens.", "weight": 0.0},
               {"role": "assistant", "content": "They end turns.", "weight": 0.1},
               {"role": "user", "content": "  And  spaces?\n", "weight": 0.0},
               {"role": "assistant", "content": "Kept as text. ünïcødé 日本語 🙂", "weight": 0.1}],
     "condition": "GPT3", "system": "You are a careful assistant."},
    {"items": [{"role": "user", "content": "no condition here", "weight": 0.0},
               {"role": "assistant", "content": "fine", "weight": 1.0}], "condition": "", "system": ""},
]


def _conversation(record):
    return Conversation([Message(i["role"], i["content"], i["weight"]) for i in record["items"]],
                        system=record["system"], condition=record["condition"])


def test_prepared_rows_equal_render_and_the_model_card(tmp_path, tokenizer_dir, tokenizer):
    from crlft.render import render

    data = write_jsonl(tmp_path / "oc.jsonl", OPENCHAT_RECORDS)
    recipe = load_recipe(write_recipe(tmp_path, tokenizer_dir, [
        {"name": "oc", "path": data, "format": "openchat", "condition": "Fallback", "reward": 1.0}]))
    prepare(recipe, log=lambda line: None)
    dataset = load_prepared(recipe)
    assert dataset.features["input_ids"].feature.dtype == "int32"
    assert dataset.features["loss_weights"].feature.dtype == "float32"
    assert len(dataset) == len(OPENCHAT_RECORDS)
    for row, record in zip(dataset, OPENCHAT_RECORDS):
        conversation = _conversation(record)
        if not record["condition"]:
            conversation.condition = "Fallback"  # the source's condition fills in what the record lacks
        ids, weights = render(conversation, "openchat_3.5", tokenizer)
        assert row["input_ids"] == ids
        assert np.array_equal(np.asarray(row["loss_weights"], np.float32), np.asarray(weights, np.float32))
        assert row["loss_weights"][0] == 0.0 and row["loss_weights"][-1] > 0
        assert row["length"] == len(ids) and row["source"] == "oc" and row["condition"] == conversation.condition
    assert dataset["index"] == [0, 1, 2, 3]

    # OpenChat's post-processing after its template (ochat/data/generate_dataset.py): cut to the model's context,
    # then drop trailing zero-weight tokens, and drop a conversation left empty. Same rows here for a short context.
    short = load_recipe(write_recipe(tmp_path, tokenizer_dir, [
        {"name": "oc", "path": data, "format": "openchat", "condition": "Fallback", "reward": 1.0}],
        max_context=24, name="short.yaml"), [f"data.output_dir={tmp_path / 'short'}"])
    prepare(short, log=lambda line: None)
    expected_rows = []
    for index, record in enumerate(OPENCHAT_RECORDS):
        conversation = _conversation(record)
        conversation.condition = conversation.condition or "Fallback"
        ids, weights = render(conversation, "openchat_3.5", tokenizer)
        ids, weights = ids[:24], weights[:24]
        while weights and weights[-1] == 0:
            ids, weights = ids[:-1], weights[:-1]
        if ids:
            expected_rows.append((index, ids, np.asarray(weights, np.float32).tolist()))
    short_rows = load_prepared(short)
    assert [(r["index"], r["input_ids"], r["loss_weights"]) for r in short_rows] == expected_rows
    assert len(expected_rows) == 3  # the system-prompted conversation has no answer within 24 tokens

    first = dataset[0]
    assert first["input_ids"] == CARD_HELLO_HI
    assert first["loss_weights"] == [0.0] * 17 + [1.0, 1.0]  # " Hi" and <|end_of_turn|> are learned
    assert dataset[1]["input_ids"][: len(CARD_CODE_PROMPT)] == CARD_CODE_PROMPT
    # Control tokens typed in message text stay text.
    assert dataset[2]["input_ids"].count(32000) == 1 + 4  # system block + four turns


def test_report_counts_max_samples_repeat_and_reuse(tmp_path, tokenizer_dir, capsys):
    gpt4 = write_jsonl(tmp_path / "gpt4.jsonl", [
        {"conversations": [{"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": f"answer {i}"}]}
        for i in range(5)])
    gpt35 = write_jsonl(tmp_path / "gpt35.jsonl", [
        {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a " * 300}]},  # truncated
        {"conversations": [{"from": "human", "value": "q " * 300}, {"from": "gpt", "value": "a"}]},  # cut away
        {"conversations": [{"from": "human", "value": "only a question"}]},
        {"conversations": []},
    ])
    recipe_path = write_recipe(tmp_path, tokenizer_dir, [
        {"name": "gpt4", "path": gpt4, "format": "sharegpt", "condition": "GPT4 Correct", "reward": 1.0,
         "max_samples": 3, "repeat": 2},
        {"name": "gpt35", "path": gpt35, "format": "sharegpt", "condition": "GPT3", "reward": 0.1},
    ], max_context=128)
    assert main(["prepare", recipe_path]) == 0
    out = capsys.readouterr().out
    assert "gpt4" in out and "truncated_away 1" in out and "wrote 7 rows" in out

    output_dir = str(tmp_path / "prepared")
    with open(os.path.join(output_dir, REPORT_FILE)) as f:
        report = json.load(f)
    groups = {g["source"]: g for g in report["groups"]}
    assert (groups["gpt4"]["read"], groups["gpt4"]["kept"], groups["gpt4"]["rows"]) == (3, 3, 6)
    g35 = groups["gpt35"]
    assert (g35["condition"], g35["read"], g35["kept"], g35["truncated"]) == ("GPT3", 4, 1, 1)
    assert g35["dropped"] == {"empty": 1, "no_assistant_turn": 1, "truncated_away": 1}
    assert g35["tokens"] == 128 and g35["mean_weight"] == pytest.approx(0.1)
    assert g35["trailing_user_turns_dropped"] == 1

    recipe = load_recipe(recipe_path)
    dataset = load_prepared(recipe)
    assert dataset["source"] == ["gpt4"] * 6 + ["gpt35"]
    assert dataset["index"] == [0, 1, 2, 0, 1, 2, 0]
    assert dataset["condition"] == ["GPT4 Correct"] * 6 + ["GPT3"]

    # Unchanged inputs: reused. Any change (an override, the file's content): regenerated.
    meta_mtime = os.stat(os.path.join(output_dir, META_FILE)).st_mtime_ns
    assert is_prepared(recipe)
    assert main(["prepare", recipe_path]) == 0
    assert "up to date" in capsys.readouterr().out
    assert os.stat(os.path.join(output_dir, META_FILE)).st_mtime_ns == meta_mtime
    assert not is_prepared(load_recipe(recipe_path, ["data.sources.1.reward=0.2"]))
    assert main(["prepare", recipe_path, "data.sources.1.reward=0.2"]) == 0
    assert "wrote 7 rows" in capsys.readouterr().out
    assert load_prepared(load_recipe(recipe_path, ["data.sources.1.reward=0.2"]))["loss_weights"][-1][-1] == (
        pytest.approx(0.2))
    with open(gpt4, "a") as f:
        f.write(json.dumps({"conversations": [{"from": "human", "value": "new"}, {"from": "gpt", "value": "x"}]}))
    changed = load_recipe(recipe_path, ["data.sources.1.reward=0.2"])
    assert not is_prepared(changed)
    with pytest.raises(UserError, match="made from other inputs"):
        load_prepared(changed)
    with pytest.raises(UserError, match=r"no prepared dataset in .*nowhere.*run `crlft prepare"):
        load_prepared(load_recipe(recipe_path, [f"data.output_dir={tmp_path / 'nowhere'}"]))
    # Only crlft's own output is ever replaced; no temporary directory is left behind.
    assert sorted(os.listdir(tmp_path)) == ["gpt35.jsonl", "gpt4.jsonl", "prepared", "recipe.yaml"]


def test_num_proc_2_gives_the_same_rows(tmp_path, tokenizer_dir):
    records = [{"messages": [{"role": "user", "content": f"question {i} " * (i % 7 + 1)},
                             {"role": "assistant", "content": f"answer {i} " * (i % 5 + 1)},
                             {"role": "user", "content": "and?"},
                             {"role": "assistant", "content": "done"}]} for i in range(40)]
    data = write_jsonl(tmp_path / "m.jsonl", records)
    recipe_path = write_recipe(tmp_path, tokenizer_dir, [
        {"name": "m", "path": data, "format": "messages", "condition": "GPT4 Correct"}],
        extra="  per_sequence_loss: true\n")
    one_recipe = load_recipe(recipe_path)
    prepare(one_recipe, log=lambda s: None)
    one_rows = load_prepared(one_recipe)[:]
    two_recipe = load_recipe(recipe_path, ["data.num_proc=2"])
    prepare(two_recipe, force=True, log=lambda s: None)
    two_rows = load_prepared(two_recipe)[:]
    assert two_rows == one_rows
    assert one_rows["index"] == list(range(40))
    # Per-sequence loss: each assistant message's weights sum to its weight (1.0) → 2 per conversation.
    assert all(abs(sum(w) - 2.0) < 1e-5 for w in one_rows["loss_weights"])


# --------------------------------------------------------------------------------------------------- bad input


def _run_cli(args, capsys):
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.err


def test_bad_inputs_give_located_errors_and_exit_2(tmp_path, tokenizer_dir, capsys):
    good = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    malformed = tmp_path / "malformed.jsonl"
    malformed.write_text(json.dumps(good) + "\n" + json.dumps(good) + "\n" + '{"conversations": [{"from": }]}\n')
    bad_role = write_jsonl(tmp_path / "role.jsonl", [good, {"conversations": [{"from": "robot", "value": "x"}]}])
    bad_weight = write_jsonl(tmp_path / "weight.jsonl", [
        {"items": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": "lots"}]}])

    def recipe(path, fmt="sharegpt", **source):
        recipe.count += 1
        return write_recipe(tmp_path, tokenizer_dir, [dict({"name": "s", "path": str(path), "format": fmt},
                                                           **source)], name=f"recipe{recipe.count}.yaml")

    recipe.count = 0

    cases = [
        (recipe(malformed), [], ["malformed.jsonl:3: invalid JSON"]),
        (recipe(bad_role), [], ["role.jsonl:2 (record 1)", "unknown role 'robot'"]),
        (recipe(bad_weight, "openchat"), [], ["weight.jsonl:1 (record 0)", "weight must be a non-negative number",
                                              "'lots'"]),
        (recipe(bad_role), ["data.sources.0.reward=-1"], ["recipe4.yaml (data.sources.0.reward)",
                                                          "non-negative"]),
        (recipe(bad_role), ["data.sources.0.reward=high"], ["data.sources.0.reward", "expected a number",
                                                            "'high'"]),
        (recipe(tmp_path / "missing.jsonl"), [], ["file not found", "missing.jsonl",
                                                                 "recipe6.yaml:8 (data.sources.0.path)"]),
        (recipe(bad_role), ["data.sources.0.rewrd=1"], ["unknown key 'rewrd'", "did you mean 'reward'"]),
    ]
    for recipe_path, overrides, needles in cases:
        code, err = _run_cli(["prepare", recipe_path, *overrides], capsys)
        assert code == 2, (needles, err)
        assert err.startswith("crlft prepare: error:"), err
        for needle in needles:
            assert needle in err, (needle, err)
        assert "Traceback" not in err


def test_no_traceback_through_a_real_process(tmp_path, tokenizer_dir):
    bad_role = write_jsonl(tmp_path / "role.jsonl", [{"conversations": [{"from": "robot", "value": "x"}]}])
    recipe_path = write_recipe(tmp_path, tokenizer_dir, [{"name": "s", "path": bad_role, "format": "sharegpt"}])
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("CRLFT_DEBUG", None)
    result = subprocess.run([sys.executable, "-m", "crlft", "prepare", recipe_path], capture_output=True, text=True,
                            env=env, cwd=str(tmp_path), timeout=120)
    assert result.returncode == 2
    assert "role.jsonl:1 (record 0)" in result.stderr and "unknown role 'robot'" in result.stderr
    assert "Traceback" not in result.stderr


def test_on_error_skip_counts_bad_records(tmp_path, tokenizer_dir, capsys):
    records = [{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
               {"conversations": [{"from": "robot", "value": "x"}]},
               {"conversations": [{"from": "gpt", "value": None}]}]
    data = write_jsonl(tmp_path / "s.jsonl", records)
    recipe_path = write_recipe(tmp_path, tokenizer_dir, [
        {"name": "s", "path": data, "format": "sharegpt", "on_error": "skip"}])
    assert main(["prepare", recipe_path]) == 0
    out = capsys.readouterr().out
    assert "error 2" in out and "s.jsonl:2 (record 1)" in out and "s.jsonl:3 (record 2)" in out
    report = json.load(open(tmp_path / "prepared" / REPORT_FILE))
    assert report["total"]["dropped"] == {"error": 2} and report["total"]["kept"] == 1


def test_refuses_to_replace_a_foreign_directory(tmp_path, tokenizer_dir, capsys):
    data = write_jsonl(tmp_path / "s.jsonl", [
        {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}])
    recipe_path = write_recipe(tmp_path, tokenizer_dir, [{"name": "s", "path": data}])
    (tmp_path / "prepared").mkdir()
    (tmp_path / "prepared" / "precious.txt").write_text("keep me")
    code, err = _run_cli(["prepare", recipe_path], capsys)
    assert code == 2 and "is not a crlft prepared dataset" in err
    assert (tmp_path / "prepared" / "precious.txt").read_text() == "keep me"


def test_inspect_shows_supervised_tokens_and_weights(tmp_path, tokenizer_dir, capsys):
    data = write_jsonl(tmp_path / "oc.jsonl", OPENCHAT_RECORDS)
    recipe_path = write_recipe(tmp_path, tokenizer_dir, [
        {"name": "oc", "path": data, "format": "openchat", "condition": "Fallback"}])
    assert main(["inspect", recipe_path, "--n", "3"]) == 0
    out = capsys.readouterr().out
    assert out.count("=== source 'oc'") == 3
    assert "condition 'GPT4 Correct'" in out and "condition 'GPT3'" in out
    # (decode shows the legacy dummy-prefix space of "▁G" after a control token)
    assert "<s> GPT4 Correct User: Hello<|end_of_turn|> GPT4 Correct Assistant:[[ Hi<|end_of_turn|>]](w=1)\n" in out
    assert "[[ They end turns.<|end_of_turn|>]](w=0.1)" in out
    assert not os.path.exists(tmp_path / "prepared")  # inspect writes nothing


def test_inspect_colours_supervised_tokens_on_a_terminal(tmp_path, tokenizer_dir, tokenizer):
    from crlft.inspection import format_inspected, inspect_rows

    data = write_jsonl(tmp_path / "oc.jsonl", OPENCHAT_RECORDS[:1])
    recipe = load_recipe(write_recipe(tmp_path, tokenizer_dir, [{"name": "oc", "path": data, "format": "openchat"}]))
    (row,) = inspect_rows(recipe, 5)
    text = format_inspected(row, tokenizer, color=True)
    assert "\x1b[1;32m Hi<|end_of_turn|>\x1b[0m" in text and "w=1" in text and "[[" not in text


def test_nothing_left_to_train_on_is_an_error_after_the_report(tmp_path, tokenizer_dir, capsys):
    data = write_jsonl(tmp_path / "s.jsonl", [
        {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}])
    recipe_path = write_recipe(tmp_path, tokenizer_dir, [{"name": "s", "path": data, "reward": 0.0}])
    code = main(["prepare", recipe_path])
    captured = capsys.readouterr()
    assert code == 2 and "no conversation left to train on" in captured.err
    assert "zero_weight 1" in captured.out
    assert not os.path.exists(tmp_path / "prepared")


def test_data_generate_writes_missing_sources_first(tmp_path, tokenizer_dir, capsys):
    target = tmp_path / "made.jsonl"
    record = json.dumps({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]})
    script = tmp_path / "make.py"
    script.write_text(f"open({str(target)!r}, 'w').write({record!r} + '\\n')\n")
    recipe_path = write_recipe(tmp_path, tokenizer_dir, [{"name": "s", "path": str(target)}],
                               extra=f"  generate: {json.dumps(sys.executable + ' ' + str(script))}\n")
    assert main(["prepare", recipe_path]) == 0
    assert "running data.generate" in capsys.readouterr().out
    assert load_prepared(load_recipe(recipe_path))["index"] == [0]

    target.unlink()
    failing = write_recipe(tmp_path, tokenizer_dir, [{"name": "s", "path": str(target)}],
                           extra="  generate: exit 3\n", name="failing.yaml")
    code, err = _run_cli(["prepare", failing], capsys)
    assert code == 2 and "failing.yaml:" in err and "data.generate" in err and "exit code 3" in err
