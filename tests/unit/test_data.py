"""Readers, record → conversation per format, weight resolution, truncation, drop reasons and the report.

No tokenizer is needed here except in the row-processing tests, which use the offline OpenChat 3.5 tokenizer.
"""

import json
import math

import pyarrow as pa
import pytest

from crlft.config import SourceConfig
from crlft.conversation import Message
from crlft.errors import UserError
from crlft.formats import FORMATS, RecordError, read_source, reward_to_weight
from crlft.prepare import source_job
from crlft.report import build_report, format_report
from crlft.rows import process_batch

# --------------------------------------------------------------------------------------------------- formats


def test_openchat_record_keeps_its_weights_condition_and_system():
    conversation = FORMATS["openchat"]({
        "items": [{"role": "user", "content": "Hi", "weight": 0.0},
                  {"role": "assistant", "content": "Hello", "weight": 0.5},
                  {"role": "user", "content": "More"},
                  {"role": "assistant", "content": "Sure"}],
        "condition": "GPT4 Correct",
        "system": "Be brief.",
    })
    assert conversation.condition == "GPT4 Correct"
    assert conversation.system == "Be brief."
    assert [(m.role, m.content, m.weight) for m in conversation.messages] == [
        ("user", "Hi", 0.0), ("assistant", "Hello", 0.5), ("user", "More", None), ("assistant", "Sure", None)]


def test_sharegpt_record_maps_roles_and_system_turns():
    conversation = FORMATS["sharegpt"]({
        "id": "x1",
        "model": "gpt-4",
        "conversations": [{"from": "system", "value": "You are helpful."},
                          {"from": "human", "value": "2+2?"},
                          {"from": "gpt", "value": "4"}],
    })
    assert conversation.system == "You are helpful."
    assert conversation.condition == ""
    assert [(m.role, m.content) for m in conversation.messages] == [("user", "2+2?"), ("assistant", "4")]
    assert all(m.weight is None for m in conversation.messages)


def test_messages_record_openai_style():
    conversation = FORMATS["messages"]({"messages": [
        {"role": "system", "content": "S"}, {"role": "user", "content": "U"}, {"role": "assistant", "content": "A"}]})
    assert conversation.system == "S"
    assert [(m.role, m.content) for m in conversation.messages] == [("user", "U"), ("assistant", "A")]


def test_alpaca_record_joins_instruction_and_input():
    with_input = FORMATS["alpaca"]({"instruction": "Translate.", "input": "Hallo", "output": "Hello"})
    assert [(m.role, m.content) for m in with_input.messages] == [("user", "Translate.\n\nHallo"),
                                                                  ("assistant", "Hello")]
    without = FORMATS["alpaca"]({"instruction": "Say hi.", "input": "", "output": "Hi"})
    assert without.messages[0].content == "Say hi."


@pytest.mark.parametrize(("fmt", "record", "needle"), [
    ("sharegpt", {"conversations": [{"from": "bot", "value": "x"}]}, "unknown role 'bot'"),
    ("openchat", {"items": [{"role": "system", "content": "x"}]}, "unknown role 'system'"),
    ("messages", {"messages": [{"role": "tool", "content": "x"}]}, "unknown role 'tool'"),
    ("openchat", {"items": [{"role": "assistant", "content": "x", "weight": -1}]}, "non-negative number, got -1"),
    ("openchat", {"items": [{"role": "assistant", "content": "x", "weight": "high"}]}, "got 'high'"),
    ("sharegpt", {"conversations": [{"from": "gpt", "value": None}]}, "conversations[0].value must be a string"),
    ("sharegpt", {"items": []}, "has no 'conversations'"),
    ("alpaca", {"instruction": "x"}, "output must be a string"),
    ("messages", {"messages": ["hello"]}, "messages[0] must be an object"),
    ("messages", {"messages": [{"role": "user", "content": "a"}, {"content": "b"}]}, "messages[1]: unknown role None"),
    ("openchat", {"items": [{"role": "assistant", "content": "x", "weight": float("nan")}]}, "got nan"),
    ("openchat", {"items": [{"role": "assistant", "content": "x", "weight": True}]}, "got True"),
    ("openchat", {"items": [{"role": "user", "content": "x"}], "condition": 4}, "condition must be a string"),
    ("sharegpt", {"conversations": "hi"}, "'conversations' must be a list"),
])
def test_bad_records_raise_record_error_naming_the_problem(fmt, record, needle):
    with pytest.raises(RecordError, match=None) as info:
        FORMATS[fmt](record)
    assert needle in str(info.value)


def test_integer_weights_become_floats():
    conversation = FORMATS["messages"]({"messages": [{"role": "user", "content": "q", "weight": 0},
                                                     {"role": "assistant", "content": "a", "weight": 2}]})
    assert [(m.weight, type(m.weight)) for m in conversation.messages] == [(0.0, float), (2.0, float)]


def test_reward_to_weight():
    assert reward_to_weight(0.1, "linear") == pytest.approx(0.1)
    assert reward_to_weight(1.0, "exp", beta=0.5) == pytest.approx(math.exp(2.0))
    assert reward_to_weight(0.0, "exp", beta=1.0) == pytest.approx(1.0)


# --------------------------------------------------------------------------------------------------- reading


def _write_jsonl(path, records, blank_lines=False):
    with open(path, "w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
            if blank_lines:
                f.write("\n")
    return str(path)


SHAREGPT = [{"conversations": [{"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": f"a{i}"}]}
            for i in range(4)]


def test_read_source_jsonl_json_list_and_parquet(tmp_path):
    jsonl = _write_jsonl(tmp_path / "a.jsonl", SHAREGPT)
    as_list = tmp_path / "a.json"
    as_list.write_text(json.dumps(SHAREGPT, indent=2))
    parquet = tmp_path / "a.parquet"
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(SHAREGPT), parquet)
    for path in (jsonl, str(as_list), str(parquet)):
        records = read_source(SourceConfig(name="s", path=path), cache_dir=str(tmp_path / "cache"))
        assert records[:]["conversations"] == [r["conversations"] for r in SHAREGPT], path


def test_malformed_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(SHAREGPT[0]) + "\n\n" + json.dumps(SHAREGPT[1]) + "\n" + '{"conversations": [}\n')
    with pytest.raises(UserError, match=r"bad\.jsonl:4: invalid JSON"):
        read_source(SourceConfig(name="s", path=str(path)), cache_dir=str(tmp_path / "cache"))


def test_malformed_json_list_names_file_and_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(SHAREGPT, indent=1)[:-20])
    with pytest.raises(UserError, match=r"bad\.json:\d+: invalid JSON"):
        read_source(SourceConfig(name="s", path=str(path)), cache_dir=str(tmp_path / "cache"))


def test_missing_file_and_unsupported_type(tmp_path):
    with pytest.raises(UserError, match=r"source 's': file not found: .*nope\.jsonl \(recipe.yaml:7"):
        read_source(SourceConfig(name="s", path=str(tmp_path / "nope.jsonl")), where="recipe.yaml:7 (path)")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(UserError, match="unsupported file type"):
        read_source(SourceConfig(name="s", path=str(tmp_path / "x.csv")))


# --------------------------------------------------------------------------------------------------- rows


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from crlft.templates import TEMPLATES
    from crlft.tokenizer import build_tokenizer, load_tokenizer

    directory = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer("openchat_3.5", str(directory))
    return load_tokenizer(str(directory), TEMPLATES["openchat_3.5"])


def _job(recipe_overrides=None, **source):
    from crlft.recipe import recipe_from_dict

    raw = {"model": {"base": "unused", "max_context": 64}, "train": {"output_dir": "o", "batch_max_len": 64},
           "data": {"output_dir": "d", "sources": [dict({"name": "s", "path": "s.jsonl"}, **source)]}}
    for key, value in (recipe_overrides or {}).items():
        section, name = key.split(".")
        raw[section][name] = value
    recipe = recipe_from_dict(raw)
    return source_job(recipe, recipe.data.sources[0])


def _rows(records, job, tokenizer):
    keys = sorted({k for r in records for k in r})
    batch = {k: [r.get(k) for r in records] for k in keys}
    out = process_batch(batch, list(range(len(records))), job, tokenizer)
    return [{k: out[k][i] for k in out} for i in range(len(records))]


def test_weights_resolve_record_first_then_source_reward(tokenizer):
    from crlft.conversation import Conversation
    from crlft.render import render

    job = _job({"data.reward_to_weight": "exp", "data.beta": 2.0}, format="openchat", reward=1.0,
               condition="GPT3")
    record = {"items": [{"role": "user", "content": "a", "weight": 0.0},
                        {"role": "assistant", "content": "b", "weight": 0.25},
                        {"role": "user", "content": "c", "weight": 0.0},
                        {"role": "assistant", "content": "d"}],
              "condition": "GPT4 Correct"}
    (row,) = _rows([record], job, tokenizer)
    assert row["condition"] == "GPT4 Correct"  # the record's own condition wins
    expected = Conversation([Message("user", "a", 0.0), Message("assistant", "b", 0.25),
                             Message("user", "c", 0.0), Message("assistant", "d", math.exp(0.5))],
                            condition="GPT4 Correct")
    ids, weights = render(expected, "openchat_3.5", tokenizer)
    assert row["input_ids"] == ids and row["loss_weights"] == weights
    assert row["loss_weights"][0] == 0.0
    assert {round(w, 6) for w in row["loss_weights"]} == {0.0, 0.25, round(math.exp(0.5), 6)}


def test_source_condition_fills_a_record_without_one(tokenizer):
    job = _job(format="sharegpt", condition="GPT3", reward=0.1)
    (row,) = _rows([SHAREGPT[0]], job, tokenizer)
    assert row["condition"] == "GPT3"
    assert set(row["loss_weights"]) == {0.0, 0.1}
    # Legacy SentencePiece: a word after a control token gets the dummy prefix, so decode shows a space there.
    assert tokenizer.decode(row["input_ids"]) == "<s> GPT3 User: q0<|end_of_turn|> GPT3 Assistant: a0<|end_of_turn|>"


def test_drop_reasons_trailing_user_turns_and_counts(tokenizer):
    job = _job(format="openchat", reward=1.0)
    records = [
        {"items": []},  # empty
        {"items": [{"role": "user", "content": "only a question"}]},  # no assistant turn (after trailing drop)
        {"items": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 0}]},
        {"items": [{"role": "user", "content": "q", "weight": 1.0}, {"role": "assistant", "content": "a"},
                   {"role": "assistant", "content": "b"}, {"role": "user", "content": "bye"},
                   {"role": "user", "content": "bye again"}]},
    ]
    rows = _rows(records, job, tokenizer)
    assert [r["_drop"] for r in rows] == ["empty", "no_assistant_turn", "zero_weight", ""]
    assert [r["_trailing_user"] for r in rows] == [0, 1, 0, 2]
    assert rows[3]["_consecutive"] == 1
    assert rows[3]["_user_weight_ignored"] == 1
    assert all(not r["input_ids"] for r in rows[:3])
    text = tokenizer.decode(rows[3]["input_ids"])
    assert "bye" not in text and text.endswith("Assistant: b<|end_of_turn|>")
    assert rows[3]["loss_weights"][-1] == 1.0


def test_truncation_then_trailing_zero_trim_and_truncated_away(tokenizer):
    job = _job(format="sharegpt", reward=1.0)  # model.max_context = 64
    long_answer = " ".join(["word"] * 100)
    records = [
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": long_answer}]},
        {"conversations": [{"from": "human", "value": long_answer}, {"from": "gpt", "value": "ok"}]},
        {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"},
                           {"from": "human", "value": long_answer}, {"from": "gpt", "value": "c"}]},
    ]
    rows = _rows(records, job, tokenizer)
    assert rows[0]["_drop"] == "" and rows[0]["_truncated"] and rows[0]["length"] == 64
    assert rows[0]["loss_weights"][-1] == 1.0
    assert rows[1]["_drop"] == "truncated_away"
    # Cut inside the third turn: its user tokens are trimmed, so the row ends with the first answer's eot.
    assert rows[2]["_drop"] == "" and rows[2]["_truncated"]
    assert tokenizer.decode(rows[2]["input_ids"]).endswith("Assistant: b<|end_of_turn|>")
    assert rows[2]["length"] < 64 and rows[2]["_supervised"] == 2


def test_bad_record_raises_with_location_or_is_skipped_and_counted(tokenizer, tmp_path):
    path = _write_jsonl(tmp_path / "s.jsonl", [SHAREGPT[0], {"conversations": [{"from": "bot", "value": "x"}]}],
                        blank_lines=True)
    job = _job(format="sharegpt", path=path)
    records = [SHAREGPT[0], {"conversations": [{"from": "bot", "value": "x"}]}]
    with pytest.raises(UserError, match=r"s\.jsonl:3 \(record 1\): conversations\[0\]: unknown role 'bot'"):
        _rows(records, job, tokenizer)
    rows = _rows(records, _job(format="sharegpt", path=path, on_error="skip"), tokenizer)
    assert [r["_drop"] for r in rows] == ["", "error"]
    assert rows[1]["_error"].startswith("conversations[0]: unknown role 'bot'")


# --------------------------------------------------------------------------------------------------- report


def test_report_groups_by_source_and_condition():
    table = pa.Table.from_pylist([
        {"source": "a", "condition": "GPT4", "length": 10, "_drop": "", "_truncated": True, "_trailing_user": 1,
         "_consecutive": 0, "_user_weight_ignored": 0, "_error": "", "_supervised": 4, "_weight_sum": 4.0},
        {"source": "a", "condition": "GPT4", "length": 0, "_drop": "empty", "_truncated": False,
         "_trailing_user": 0, "_consecutive": 0, "_user_weight_ignored": 0, "_error": "", "_supervised": 0,
         "_weight_sum": 0.0},
        {"source": "a", "condition": "Code", "length": 6, "_drop": "", "_truncated": False, "_trailing_user": 0,
         "_consecutive": 2, "_user_weight_ignored": 0, "_error": "", "_supervised": 2, "_weight_sum": 1.0},
        {"source": "b", "condition": "GPT3", "length": 0, "_drop": "error", "_truncated": False,
         "_trailing_user": 0, "_consecutive": 0, "_user_weight_ignored": 0, "_error": "f.jsonl:2: bad",
         "_supervised": 0, "_weight_sum": 0.0},
    ])
    report = build_report([table.slice(0, 3), table.slice(3)], {"a": 2, "b": 1}, ["f.jsonl:2 (record 0): bad"])
    groups = {(g["source"], g["condition"]): g for g in report["groups"]}
    assert [(g["source"], g["condition"]) for g in report["groups"]] == [("a", "Code"), ("a", "GPT4"),
                                                                          ("b", "GPT3")]
    gpt4 = groups[("a", "GPT4")]
    assert (gpt4["read"], gpt4["kept"], gpt4["truncated"], gpt4["tokens"], gpt4["supervised_tokens"]) == (
        2, 1, 1, 10, 4)
    assert gpt4["dropped"] == {"empty": 1} and gpt4["rows"] == 2 and gpt4["mean_weight"] == 1.0
    assert groups[("a", "Code")]["mean_weight"] == 0.5
    assert groups[("b", "GPT3")]["dropped"] == {"error": 1}
    total = report["total"]
    assert (total["read"], total["kept"], total["rows"], total["tokens_per_epoch"]) == (4, 2, 4, 32)
    assert total["dropped"] == {"error": 1, "empty": 1}
    assert report["errors"] == ["f.jsonl:2 (record 0): bad"]
    text = format_report(report)
    assert "empty 1" in text and "f.jsonl:2 (record 0): bad" in text and "total" in text
