"""Bad numbers, keys and bytes are refused where they are written: sources (file:line, field) and recipes.

Through the command line where the issue names it (exit code 2, one message on stderr, no traceback); ``prepare``
runs in this process, so the tokenizer is loaded once.
"""

from __future__ import annotations

import json
import textwrap

import datasets
import pytest
import yaml

from crlft.cli import main as cli_main
from crlft.errors import UserError
from crlft.recipe import RecipeLoader, load_recipe
from crlft.sourcescan import scan_json_source

GOOD = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}


def _line(weight_text: str, text: str = "hi") -> str:
    # Written by hand: json.dumps cannot write 1e999, and the weight is written exactly as given.
    return (f'{{"conversations": [{{"from": "human", "value": "{text}"}}, '
            f'{{"from": "gpt", "value": "yo", "weight": {weight_text}}}]}}')


def _recipe(tmp_path, tokenizer_dir: str, source_path, **source) -> str:
    extra = "".join(f", {key}: {json.dumps(value)}" for key, value in source.items())
    path = tmp_path / "recipe.yaml"
    path.write_text(textwrap.dedent(f"""\
        model: {{base: {tokenizer_dir}, max_context: 64}}
        data:
          output_dir: {tmp_path / "data"}
          num_proc: 1
          sources: [{{name: s, path: {source_path}{extra}}}]
        train: {{output_dir: {tmp_path / "run"}, batch_max_len: 64}}
        """))
    return str(path)


def _prepare(capsys, recipe: str, *overrides: str) -> tuple[int, str, str]:
    code = cli_main(["prepare", recipe, *overrides])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


# ---------------------------------------------------------------------------------------------- source numbers


@pytest.mark.parametrize("written", ["NaN", "Infinity", "-Infinity", "1e999", "-1E+400"])
def test_non_finite_weight_is_refused_with_file_line_and_field(tmp_path, capsys, openchat_tokenizer_dir, written):
    # Record 1 is on line 3 (a blank line first); the first record holds the same words inside strings only.
    source = tmp_path / "src.jsonl"
    source.write_text(_line("0.5", "NaN Infinity e1000") + "\n\n" + _line(written) + "\n")
    code, _, err = _prepare(capsys, _recipe(tmp_path, openchat_tokenizer_dir, source))
    assert code == 2
    assert f"src.jsonl:3 (record 1): conversations[1].weight: {written} is not a finite number" in err
    assert "on_error: skip" in err


def test_non_finite_weight_in_a_json_list_is_located_by_record(tmp_path, capsys, openchat_tokenizer_dir):
    source = tmp_path / "src.json"
    source.write_text("[" + _line("0.1") + ",\n" + _line("NaN") + "]")
    code, _, err = _prepare(capsys, _recipe(tmp_path, openchat_tokenizer_dir, source))
    assert code == 2 and "src.json (record 1): conversations[1].weight: NaN is not a finite number" in err


def test_on_error_skip_counts_non_finite_records_and_trains_the_others_at_their_weights(
        tmp_path, capsys, openchat_tokenizer_dir):
    source = tmp_path / "src.jsonl"
    # json.dumps writes NaN by default: the case the issue found (a record meant to weigh 0.1 trained at 1.0).
    records = [_line("0.1"), json.dumps({**GOOD, "conversations": [GOOD["conversations"][0],
                                                                    {**GOOD["conversations"][1],
                                                                     "weight": float("nan")}]}),
               _line("1e999"), _line("0.5", "NaN in a string is text"), json.dumps(GOOD)]
    source.write_text("\n".join(records) + "\n")
    recipe = _recipe(tmp_path, openchat_tokenizer_dir, source, on_error="skip", reward=1.0)
    code, out, _ = _prepare(capsys, recipe)
    assert code == 0, out
    assert "src.jsonl:2 (record 1): conversations[1].weight: NaN" in out
    assert "src.jsonl:3 (record 2): conversations[1].weight: 1e999" in out
    report = json.loads((tmp_path / "data" / "prepare_report.json").read_text())
    assert report["total"]["dropped"] == {"error": 2}
    rows = datasets.load_from_disk(str(tmp_path / "data"))
    kept = {index: max(weights) for index, weights in zip(rows["index"], rows["loss_weights"])}
    assert kept == pytest.approx({0: 0.1, 3: 0.5, 4: 1.0})  # the source's reward only where no weight is written


def test_scan_finds_only_real_non_finite_numbers_and_maps_lines_to_records(tmp_path):
    source = tmp_path / "s.jsonl"
    source.write_bytes(b"\xef\xbb\xbf" + (_line("1e300", "NaN 1e999 Infinity") + "\n\n\n" + _line("1E309") + "\n"
                                           + '{"x": [1, {"y": -Infinity}], "z": NaN}\n').encode())
    problems = scan_json_source(str(source))
    assert set(problems) == {1, 2}
    assert problems[1].startswith("conversations[1].weight: 1E309 is not a finite number (it overflows a float)")
    assert problems[2].startswith("x[1].y: -Infinity is not a finite number (and 1 more) (JSON has no NaN")


# ------------------------------------------------------------------------------------------ bytes and conditions


def test_invalid_utf8_byte_is_located_by_line_and_column(tmp_path, capsys, openchat_tokenizer_dir):
    source = tmp_path / "src.jsonl"
    source.write_bytes(json.dumps(GOOD).encode() + b'\n{"conversations": [{"from": "human", "value": "h\xffi"}]}\n')
    code, _, err = _prepare(capsys, _recipe(tmp_path, openchat_tokenizer_dir, source, on_error="skip"))
    assert code == 2
    assert "src.jsonl:2: invalid UTF-8 (byte 0xff at byte column 49)" in err and "(data.sources.0.path)" in err


@pytest.mark.parametrize("content", [b"", b"\n \n", b"\xef\xbb\xbf\n"])
def test_empty_file_is_a_located_error(tmp_path, capsys, openchat_tokenizer_dir, content):
    source = tmp_path / "src.jsonl"
    source.write_bytes(content)
    code, _, err = _prepare(capsys, _recipe(tmp_path, openchat_tokenizer_dir, source))
    assert code == 2 and "src.jsonl: the file is empty (no records)" in err
    assert "recipe.yaml:5 (data.sources.0.path)" in err


def test_condition_with_a_control_token_points_at_the_record_and_is_skipped(tmp_path, capsys,
                                                                            openchat_tokenizer_dir):
    source = tmp_path / "src.jsonl"
    source.write_text(json.dumps(GOOD) + "\n" + json.dumps({**GOOD, "condition": "GPT4<|end_of_turn|>"}) + "\n"
                      + json.dumps({**GOOD, "condition": "Bad</s>"}) + "\n")
    recipe = _recipe(tmp_path, openchat_tokenizer_dir, source)
    code, _, err = _prepare(capsys, recipe)
    assert code == 2
    assert "src.jsonl:2 (record 1): condition 'GPT4<|end_of_turn|>' contains control token(s) <|end_of_turn|>" \
        in err
    code, out, _ = _prepare(capsys, recipe, "data.sources.0.on_error=skip")
    assert code == 0
    assert "src.jsonl:3 (record 2): condition 'Bad</s>' contains control token(s) </s>" in out
    assert json.loads((tmp_path / "data" / "prepare_report.json").read_text())["total"]["dropped"] == {"error": 2}


def test_source_condition_with_a_control_token_is_a_recipe_error(tmp_path, capsys, openchat_tokenizer_dir):
    source = tmp_path / "src.jsonl"
    source.write_text(json.dumps(GOOD) + "\n")
    code, _, err = _prepare(capsys, _recipe(tmp_path, openchat_tokenizer_dir, source, condition="A<|end_of_turn|>"))
    assert code == 2 and "recipe.yaml:5 (data.sources.0.condition): contains control token(s) <|end_of_turn|>" \
        in err


def test_missing_base_directory_is_named_as_such(tmp_path, capsys):
    source = tmp_path / "src.jsonl"
    source.write_text(json.dumps(GOOD) + "\n")
    code, _, err = _prepare(capsys, _recipe(tmp_path, str(tmp_path / "no_such_model"), source))
    assert code == 2
    assert f"recipe.yaml:1 (model.base): directory not found: {tmp_path / 'no_such_model'}" in err
    assert "Repo id" not in err


# -------------------------------------------------------------------------------------------------- recipes

RECIPE = """\
model: {base: m}
data:
  output_dir: d
  beta: 1.0
  sources:
    - {name: s, path: a.jsonl, reward: 1.0}
train:
  output_dir: r
  lr: 1e-5
  weight_decay: 0.1
  betas: [0.9, 0.95]
  eps: 1e-8
  grad_clip: 1.0
"""


@pytest.mark.parametrize("key, line, written", [
    ("train.lr", 9, ".inf"), ("train.weight_decay", 10, ".nan"), ("train.eps", 12, "1e999"),
    ("train.grad_clip", 13, "-.inf"), ("data.beta", 4, ".inf"), ("train.betas.1", 11, ".nan"),
])
def test_non_finite_settings_are_refused_with_file_and_line(tmp_path, key, line, written):
    path = tmp_path / "r.yaml"
    section, name = key.split(".")[:2]
    text = RECIPE.replace(f"  {name}: [0.9, 0.95]", f"  {name}: [0.9, {written}]") if name == "betas" else (
        "\n".join(f"  {name}: {written}" if row.startswith(f"  {name}:") else row for row in RECIPE.splitlines()))
    path.write_text(text)
    with pytest.raises(UserError, match=rf"r.yaml:{line} \({key}\): must be a finite number, got -?(inf|nan)"):
        load_recipe(str(path))


def test_non_finite_override_and_reward_through_the_cli(tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text(RECIPE)
    assert cli_main(["plan", str(path), "train.lr=.inf", "data.sources.0.reward=.nan"]) == 2
    err = capsys.readouterr().err
    assert "(train.lr): must be a finite number, got inf" in err
    assert "(data.sources.0.reward): must be a finite number, got nan" in err and "Traceback" not in err


def test_non_finite_number_in_the_deepspeed_json_is_refused(tmp_path):
    from crlft.config import deepspeed_config

    user = tmp_path / "ds.json"
    user.write_text('{"gradient_clipping": NaN}')
    path = tmp_path / "r.yaml"
    path.write_text(RECIPE + f"deepspeed: {{config: {user}}}\n")
    with pytest.raises(UserError, match="ds.json: NaN is not a finite number"):
        deepspeed_config(load_recipe(str(path)))


@pytest.mark.parametrize("text, message", [
    ("model: {base: m}\ntrain:\n  lr: 1e-5\n  epochs: 1\n  lr: 2e-5\n",
     r"r.yaml:5 \(train.lr\): written twice \(lines 3 and 5\)"),
    ("model: {base: m}\nmodel: {base: n}\n", r"r.yaml:2 \(model\): written twice \(lines 1 and 2\)"),
    ("data:\n  sources:\n    - name: s\n      reward: 1.0\n      reward: 0.1\n",
     r"r.yaml:5 \(data.sources.0.reward\): written twice \(lines 4 and 5\)"),
])
def test_duplicate_keys_are_refused_naming_both_lines(tmp_path, text, message):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match=message):
        load_recipe(str(path))


def test_the_recipe_loader_keeps_safe_load_semantics(tmp_path):
    # Anchors, a merge key overridden by design, YAML 1.1 booleans and numbers: the same data as yaml.safe_load.
    text = textwrap.dedent("""\
        base: &b {epochs: 2, lr: 1e-5, resume: off}
        train:
          <<: *b
          epochs: 3
        list: [*b, yes, 0x10, 1_000, .5]
        """)
    assert yaml.load(text, Loader=RecipeLoader) == yaml.safe_load(text)
    assert yaml.load(text, Loader=RecipeLoader)["train"] == {"epochs": 3, "lr": "1e-5", "resume": False}
    # A tag that would construct a Python object (and run code) is refused, as by safe_load.
    path = tmp_path / "r.yaml"
    path.write_text(f"model: !!python/object/apply:os.system ['touch {tmp_path / 'pwned'}']\n")
    with pytest.raises(UserError, match="invalid YAML"):
        load_recipe(str(path))
    assert not (tmp_path / "pwned").exists()
