"""data_prep/split_sharegpt.py: split a ShareGPT dump into GPT-4 and GPT-3.5 sources by the ``model`` field."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
from helpers import REPO_ROOT as ROOT

SCRIPT = os.path.join(ROOT, "data_prep", "split_sharegpt.py")


def _load_module():
    spec = importlib.util.spec_from_file_location("split_sharegpt", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _record(i, model=None):
    record = {"id": f"r{i}", "conversations": [{"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": "a"}]}
    if model is not None:
        record["model"] = model
    return record


DUMP = [_record(0, "Model: GPT-4"), _record(1, "gpt-3.5-turbo"), _record(2), _record(3, "gpt-4-0613"),
        _record(4, "Model: GPT-3.5"), _record(5, "")]


def _read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("layout", ["json_list", "jsonl"])
def test_split_by_model_field(tmp_path, layout):
    split = _load_module()
    in_path = tmp_path / ("dump.json" if layout == "json_list" else "dump.jsonl")
    if layout == "json_list":
        in_path.write_text(json.dumps(DUMP, indent=2))
    else:
        in_path.write_text("\n".join(json.dumps(r) for r in DUMP) + "\n")
    counts = split.split_sharegpt(str(in_path), str(tmp_path / "out"))
    assert counts == {"total": 6, "gpt4": 2, "gpt35": 4, "no_model": 2}
    assert [r["id"] for r in _read_jsonl(tmp_path / "out" / "gpt4.jsonl")] == ["r0", "r3"]
    gpt35 = _read_jsonl(tmp_path / "out" / "gpt35.jsonl")
    assert [r["id"] for r in gpt35] == ["r1", "r2", "r4", "r5"]
    assert gpt35[0] == DUMP[1]  # records are written unchanged


def test_command_line_prints_counts_and_reports_bad_json(tmp_path):
    good = tmp_path / "dump.json"
    good.write_text(json.dumps(DUMP))
    result = subprocess.run([sys.executable, SCRIPT, str(good), str(tmp_path / "out")], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr
    assert "read 6 records: 2 GPT-4" in result.stdout and "2 without a model field" in result.stdout

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(DUMP[0]) + "\n{oops\n")
    result = subprocess.run([sys.executable, SCRIPT, str(bad), str(tmp_path / "out2")], capture_output=True,
                            text=True)
    assert result.returncode == 2
    assert "bad.jsonl:2: invalid JSON" in result.stderr and "Traceback" not in result.stderr
