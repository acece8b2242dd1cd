"""data_prep/openchat_3_5_sources.py, offline: tiny records shaped like each public dataset's schema become the
source files recipes/openchat_3.5.yaml reads, split into the right classes, with every skipped record counted."""

import importlib.util
import json
import os
import sys

import datasets
import pytest
from helpers import REPO_ROOT as ROOT

from crlft.recipe import load_recipe

RECIPE = os.path.join(ROOT, "recipes", "openchat_3.5.yaml")


def _load():
    spec = importlib.util.spec_from_file_location(
        "openchat_3_5_sources", os.path.join(ROOT, "data_prep", "openchat_3_5_sources.py")
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


oc = _load()

# ------------------------------------------------------------------------------ records shaped like the datasets
SHAREGPT = [  # openchat/openchat_sharegpt4_dataset sharegpt_clean.json: {id, model, conversations[{from, value}]}
    {"id": "a1", "model": "Model: GPT-4",
     "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]},
    {"id": "a2", "model": "Model: GPT-3.5",
     "conversations": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"},
                       {"from": "human", "value": "and 3+3?"}, {"from": "gpt", "value": "6"}]},
    {"id": "a3", "conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": "y"}]},  # no label
    {"id": "a4", "model": "Model: GPT-4", "conversations": []},  # empty: skipped, counted
    {"id": "a5", "model": "Model: GPT-4", "conversations": [{"from": "human", "value": "only a question"}]},
]
OPENORCA = [  # Open-Orca/OpenOrca: {id, system_prompt, question, response}; the file says which model answered
    {"id": "niv.1", "system_prompt": "You are an AI assistant.", "question": "Translate 'chat'.", "response": "cat"},
    {"id": "flan.2", "system_prompt": "", "question": "Is the sky blue?", "response": "Yes."},
    {"id": "t0.3", "system_prompt": "", "question": "", "response": "no question"},  # skipped
]
OPENORCA_FLAN = [  # imone/OpenOrca_FLAN, in Open-Orca's layout {id, system_prompt, question, response}
    {"id": "flan.10", "system_prompt": "You are an AI assistant. You will be given a task.",
     "question": "Premise: A dog runs. Hypothesis: An animal moves. Entailment? OPTIONS: - yes - no",
     "response": "yes"},
    {"id": "cot.11", "system_prompt": "", "question": "What is 7 + 5?", "response": "12"},
    {"id": "niv.12", "system_prompt": "", "question": "Summarize: ...", "response": ""},  # skipped
]
CAPYBARA = [  # LDJnr/Pure-Dove etc.: {source, conversation[{input, output}]}
    {"source": "Pure-Dove", "conversation": [{"input": "Name a color.", "output": "Blue."},
                                             {"input": "Another?", "output": "Red."}]},
    {"source": "Verified-Camel", "conversation": [{"input": "What is H2O?", "output": "Water."}]},
]
GOAT = [  # tiedong/goat: {instruction, input, output, answer}
    {"instruction": "What is 8914 divided by 386?", "input": "", "output": "8914 / 386 = 23 R 36",
     "answer": "23 R 36"},
]
GLAIVE = [{"id": "g1", "question": "Reverse a list in Python?", "answer": "Use `xs[::-1]`."}]
METAMATH = [{"query": "Tom has 3 apples and buys 2. How many?", "response": "3 + 2 = 5. The answer is: 5",
             "type": "GSM_Rephrased", "original_question": "..."}]
MATHINSTRUCT = [{"source": "data/CoT/gsm_rft.json", "instruction": "What is 12 * 3?", "output": "12 * 3 = 36."}]
OASST = [  # OpenAssistant/oasst_top1_2023-08-25: {text} in ChatML
    {"text": "<|im_start|>user\nWhat is a llama?<|im_end|>\n<|im_start|>assistant\nA South American camelid."
             "<|im_end|>\n<|im_start|>user\nDo they spit?<|im_end|>\n<|im_start|>assistant\nSometimes.<|im_end|>\n"},
    {"text": "<|im_start|>user\nNo answer here<|im_end|>\n"},  # skipped: no assistant turn
]


def write_jsonl(path, records):
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return str(path)


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


# ------------------------------------------------------------------------------ the converters
def test_sharegpt_split_by_model_label():
    targets = []
    for record in SHAREGPT[:3]:
        ((target, out),) = oc.convert_sharegpt(record)
        targets.append(target)
        assert out["conversations"] == record["conversations"]
    assert targets == ["sharegpt_gpt4", "sharegpt_gpt35", "sharegpt_gpt35"]
    for bad in SHAREGPT[3:]:
        with pytest.raises(oc.SkipRecord):
            oc.convert_sharegpt(bad)
    assert oc.is_gpt4("gpt-4-0613") and oc.is_gpt4("gpt4") and not oc.is_gpt4("gpt-3.5-turbo") and not oc.is_gpt4(None)


def test_openorca_by_file_model_or_model_column():
    ((target, out),) = oc.convert_openorca(OPENORCA[0], "gpt-4")
    assert target == "openorca_gpt4"
    assert out["messages"] == [
        {"role": "system", "content": "You are an AI assistant."},
        {"role": "user", "content": "Translate 'chat'."},
        {"role": "assistant", "content": "cat"},
    ]
    ((target, out),) = oc.convert_openorca(OPENORCA[1], "gpt-3.5-turbo")
    assert target == "openorca_gpt35" and [m["role"] for m in out["messages"]] == ["user", "assistant"]
    ((target, _),) = oc.convert_openorca({**OPENORCA[1], "model": "gpt4"})  # OpenChat's own orca label
    assert target == "openorca_gpt4"
    with pytest.raises(oc.SkipRecord, match="question"):
        oc.convert_openorca(OPENORCA[2], "gpt-4")
    with pytest.raises(oc.SkipRecord, match="model"):
        oc.convert_openorca(OPENORCA[0])


def test_openorca_flan_in_openorca_layout():
    ((target, out),) = oc.convert_openorca_flan(OPENORCA_FLAN[0])
    assert target == "openorca_flan"
    assert out == {"id": "flan.10", "messages": [
        {"role": "system", "content": "You are an AI assistant. You will be given a task."},
        {"role": "user", "content": OPENORCA_FLAN[0]["question"]},
        {"role": "assistant", "content": "yes"},
    ]}
    ((_, out),) = oc.convert_openorca_flan(OPENORCA_FLAN[1])
    assert [m["role"] for m in out["messages"]] == ["user", "assistant"]  # empty system prompt: none
    with pytest.raises(oc.SkipRecord, match="response"):
        oc.convert_openorca_flan(OPENORCA_FLAN[2])


@pytest.mark.parametrize("record", [
    {"id": "1", "system_prompt": "", "question": "q", "response": "r", "flan_answer": "a"},  # an extra column
    {"id": "1", "inputs": "q", "targets": "a"},  # FLAN's own layout
    {"system_prompt": "", "question": "q", "response": "r"},  # no id
], ids=["extra", "flan", "no-id"])
def test_openorca_flan_other_layout_is_a_layout_error(record):
    with pytest.raises(oc.LayoutError) as info:
        oc.convert_openorca_flan(record)
    message = str(info.value)
    assert "id, system_prompt, question, response" in message  # what is expected
    assert "found " + ", ".join(sorted(record)) + "." in message  # and every column found


def test_openorca_flan_other_layout_stops_the_command(tmp_path, capsys):
    """A file in another layout: exit status 2, one line naming the columns, no traceback, no output file."""
    src = write_jsonl(tmp_path / "flan.jsonl", [{"inputs": "Is fire hot?", "targets": "yes", "task": "boolq"}])
    out = tmp_path / "out"
    assert oc.main([str(out), "--only", "openorca_flan", "--local", f"openorca_flan={src}"]) == 2
    err = capsys.readouterr().err  # datasets' progress lines (\r-separated), then the error
    assert "Traceback" not in err
    assert err.endswith("\n") and err.rstrip("\n").split("\n")[-1].split("\r")[-1].startswith(
        "openorca_flan: error: imone/OpenOrca_FLAN: expected Open-Orca's columns id, system_prompt, question, "
        "response; found inputs, targets, task.")
    assert not (out / "openorca_flan.jsonl").exists()


def test_openorca_flan_other_layout_from_the_command_line(tmp_path):
    """The same through the real entry point (a subprocess): non-zero exit, the message, no traceback."""
    import subprocess

    src = write_jsonl(tmp_path / "flan.jsonl", [{"id": "x", "question": "q", "answer": "a"}])
    done = subprocess.run(
        [sys.executable, os.path.join(ROOT, "data_prep", "openchat_3_5_sources.py"), str(tmp_path / "out"),
         "--only", "openorca_flan", "--local", f"openorca_flan={src}"],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 2
    assert "found answer, id, question." in done.stderr and "Traceback" not in done.stderr


def test_open_orca_completions_are_off_by_default(tmp_path, capsys):
    assert [n for n in oc.default_datasets() if n.startswith("openorca")] == ["openorca_flan"]
    flan = write_jsonl(tmp_path / "flan.jsonl", OPENORCA_FLAN)
    orca = write_jsonl(tmp_path / "orca.jsonl", OPENORCA[:1])
    with pytest.raises(SystemExit):  # the old source is not converted unless asked for
        oc.main([str(tmp_path / "out"), "--only", "openorca_flan", "--local", f"openorca:gpt-4={orca}"])
    assert "--openorca-completions" in capsys.readouterr().err
    out = tmp_path / "out"
    assert oc.main([str(out), "--only", "openorca_flan", "--openorca-completions", "--local",
                    f"openorca_flan={flan}", f"openorca:gpt-4={orca}"]) == 0
    report = json.loads((out / "conversion_report.json").read_text())
    assert report["openorca_flan"] == {"read": 3, "written": {"openorca_flan": 2},
                                       "skipped": {"missing or empty 'response'": 1}}
    assert report["openorca"]["written"] == {"openorca_gpt4": 1}
    assert [r["id"] for r in read_jsonl(out / "openorca_flan.jsonl")] == ["flan.10", "cot.11"]


def test_single_dataset_converters():
    ((t, out),) = oc.convert_capybara(CAPYBARA[0])
    assert t == "capybara" and [m["content"] for m in out["messages"]] == ["Name a color.", "Blue.", "Another?", "Red."]
    ((t, out),) = oc.convert_goat(GOAT[0])
    assert t == "goat" and out == {"instruction": "What is 8914 divided by 386?", "output": "8914 / 386 = 23 R 36"}
    ((t, out),) = oc.convert_glaive(GLAIVE[0])
    assert t == "glaive_code" and out["instruction"].startswith("Reverse") and out["output"] == "Use `xs[::-1]`."
    ((t, out),) = oc.convert_metamath(METAMATH[0])
    assert t == "metamathqa" and out["output"].endswith("The answer is: 5")
    ((t, out),) = oc.convert_mathinstruct(MATHINSTRUCT[0])
    assert t == "mathinstruct" and out["instruction"] == "What is 12 * 3?"
    ((t, out),) = oc.convert_oasst(OASST[0])
    assert t == "oasst_top1"
    assert out["messages"] == [
        {"role": "user", "content": "What is a llama?"},
        {"role": "assistant", "content": "A South American camelid."},
        {"role": "user", "content": "Do they spit?"},
        {"role": "assistant", "content": "Sometimes."},
    ]
    with pytest.raises(oc.SkipRecord, match="no assistant turn"):
        oc.convert_oasst(OASST[1])
    with pytest.raises(oc.SkipRecord, match="outside ChatML"):
        oc.convert_oasst({"text": "stray <|im_start|>user\nq<|im_end|><|im_start|>assistant\na<|im_end|>"})


# ------------------------------------------------------------------------------ the command, into the recipe
@pytest.fixture
def converted(tmp_path, capsys):
    """Runs the command on local files (JSON lines, a JSON list and parquet), as it would on the downloads."""
    import datasets

    src = tmp_path / "src"
    src.mkdir()
    sharegpt = src / "sharegpt_clean.json"
    sharegpt.write_text(json.dumps(SHAREGPT))  # a JSON list, like the hub file
    orca_gpt4 = src / "gpt4.parquet"
    datasets.Dataset.from_list(OPENORCA[:1]).to_parquet(str(orca_gpt4))
    orca_gpt35 = write_jsonl(src / "gpt35.jsonl", OPENORCA[1:])
    orca_flan = src / "openorca_flan.parquet"
    datasets.Dataset.from_list(OPENORCA_FLAN).to_parquet(str(orca_flan))
    local = [
        f"sharegpt={sharegpt}",
        f"openorca_flan={orca_flan}",
        f"openorca:gpt-4={orca_gpt4}",
        f"openorca:gpt-3.5-turbo={orca_gpt35}",
        f"capybara={write_jsonl(src / 'pure_dove.jsonl', CAPYBARA[:1])}",
        f"capybara={write_jsonl(src / 'camel.jsonl', CAPYBARA[1:])}",
        f"goat={write_jsonl(src / 'goat.jsonl', GOAT)}",
        f"glaive_code={write_jsonl(src / 'glaive.jsonl', GLAIVE)}",
        f"metamathqa={write_jsonl(src / 'metamath.jsonl', METAMATH)}",
        f"mathinstruct={write_jsonl(src / 'mathinstruct.jsonl', MATHINSTRUCT)}",
        f"oasst_top1={write_jsonl(src / 'oasst.jsonl', OASST)}",
    ]
    out = tmp_path / "data" / "openchat_3.5" / "sources"
    assert oc.main([str(out), "--openorca-completions", "--local", *local]) == 0
    return tmp_path, out, capsys.readouterr().out


def test_command_writes_every_source_and_counts_skips(converted):
    _, out, printed = converted
    report = json.loads((out / "conversion_report.json").read_text())
    assert report["sharegpt"] == {
        "read": 5, "written": {"sharegpt_gpt4": 1, "sharegpt_gpt35": 2},
        "skipped": {"missing or empty 'conversations'": 1, "no assistant turn": 1},
    }
    assert report["openorca"]["written"] == {"openorca_gpt4": 1, "openorca_gpt35": 1}
    assert report["openorca"]["skipped"] == {"missing or empty 'question'": 1}
    assert report["openorca_flan"] == {"read": 3, "written": {"openorca_flan": 2},
                                       "skipped": {"missing or empty 'response'": 1}}
    assert report["capybara"]["written"] == {"capybara": 2}
    assert report["oasst_top1"] == {"read": 2, "written": {"oasst_top1": 1}, "skipped": {
        "no assistant turn found in the ChatML text": 1}}
    for name, entry in report.items():
        assert entry["read"] == sum(entry["written"].values()) + sum(entry["skipped"].values()), name
    assert [r["id"] for r in read_jsonl(out / "sharegpt_gpt35.jsonl")] == ["a2", "a3"]
    assert "sharegpt: read 5" in printed and "skipped 2" in printed


def test_outputs_are_read_by_the_recipe_formats(converted, monkeypatch):
    """Each file the recipe names exists and every record parses with the reader of the recipe's format."""
    from crlft.formats import FORMATS

    root, _, _ = converted
    monkeypatch.chdir(root)  # the recipe's paths are relative to the working directory
    recipe = load_recipe(RECIPE)
    for source in recipe.data.sources:
        records = read_jsonl(source.path)
        assert records, source.name
        for record in records:
            conversation = FORMATS[source.format](record)
            roles = [m.role for m in conversation.messages]
            assert roles[0] == "user" and roles[-1] == "assistant" and "assistant" in roles, source.name
    system = FORMATS["messages"](read_jsonl("data/openchat_3.5/sources/openorca_flan.jsonl")[0]).system
    assert system == "You are an AI assistant. You will be given a task."


def test_bad_local_argument_is_rejected(tmp_path, capsys):
    with pytest.raises(SystemExit):
        oc.main([str(tmp_path), "--local", "nosuchdataset=x.jsonl"])
    assert "NAME=PATH" in capsys.readouterr().err


def test_prepare_reads_the_converted_sources(converted, monkeypatch, tmp_path_factory):
    """`crlft prepare` on the recipe (base tokenizer built offline) keeps every converted conversation, each
    under its source's condition and weight."""
    from crlft.prepare import load_prepared, prepare
    from crlft.tokenizer import build_tokenizer

    root, _, _ = converted
    tokenizer_dir = tmp_path_factory.mktemp("tok")
    build_tokenizer("openchat_3.5", str(tokenizer_dir))
    monkeypatch.chdir(root)
    recipe = load_recipe(RECIPE, [f"model.base={tokenizer_dir}", "data.num_proc=1"])
    prepare(recipe, log=lambda line: None)
    from crlft.split import eval_split_path

    kept = {}
    # The recipe holds out 0.5% of each source (at least one of two): training rows and the eval split together.
    for ds in (load_prepared(recipe), datasets.load_from_disk(eval_split_path(recipe.data.output_dir))):
        for source, condition, weights in zip(ds["source"], ds["condition"], ds["loss_weights"]):
            kept[source] = kept.get(source, 0) + 1
            expected = next(s for s in recipe.data.sources if s.name == source)
            assert condition == expected.condition
            assert sorted({w for w in weights if w}) == pytest.approx([expected.reward])  # stored as float32
    written = {s.name: len(read_jsonl(s.path)) for s in recipe.data.sources}
    assert kept == written
