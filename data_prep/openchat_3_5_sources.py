"""Convert the public datasets of OpenChat 3.5 into the source files ``recipes/openchat_3.5.yaml`` reads.

The OpenChat 3.5 model card lists its data as "OpenChat ShareGPT, Open-Orca with FLAN answers, Capybara, GOAT,
Glaive, MetaMathQA, MathInstruct, OpenAssistant". This script reads each (from the Hugging Face hub when a network
exists, or from local copies given with ``--local NAME=PATH``), turns every record into one of the layouts
``crlft prepare`` reads (``sharegpt``, ``messages``, ``alpaca``), splits the sources that mix expert and sub-optimal
answers by the model that wrote them (C-RLFT's two classes), and writes one JSON-lines file per recipe source::

    OUT/sharegpt_gpt4.jsonl    sharegpt   ShareGPT conversations answered by GPT-4            (expert)
    OUT/sharegpt_gpt35.jsonl   sharegpt   ShareGPT conversations answered by GPT-3.5 / others (sub-optimal)
    OUT/openorca_flan.jsonl    messages   Open-Orca questions with their FLAN answers        (imone/OpenOrca_FLAN)
    OUT/capybara.jsonl         messages   Capybara multi-turn conversations (GPT-4)
    OUT/goat.jsonl             alpaca     GOAT arithmetic (generated programmatically: exact)
    OUT/glaive_code.jsonl      alpaca     Glaive code assistant
    OUT/metamathqa.jsonl       alpaca     MetaMathQA
    OUT/mathinstruct.jsonl     alpaca     MathInstruct
    OUT/oasst_top1.jsonl       messages   OpenAssistant top-1 conversations (human written)

Usage::

    python data_prep/openchat_3_5_sources.py data/openchat_3.5/sources            # everything, from the hub
    python data_prep/openchat_3_5_sources.py OUT --only goat glaive_code --max-records 1000
    python data_prep/openchat_3_5_sources.py OUT --local sharegpt=sharegpt_clean.json --only sharegpt
    python data_prep/openchat_3_5_sources.py OUT --openorca-completions   # + Open-Orca's GPT-4 / GPT-3.5 files

``--openorca-completions`` (off by default) also converts Open-Orca/OpenOrca's 1M GPT-4 and 3.2M GPT-3.5
completion files into ``OUT/openorca_gpt4.jsonl`` (expert) and ``OUT/openorca_gpt35.jsonl`` (sub-optimal), what
this script converted before it followed the model card; the recipe does not read them.

Nothing is dropped silently: every record that cannot be converted is counted with its reason, and the counts
are printed and written to ``OUT/conversion_report.json``.

The converters (``convert_*``) are pure functions of one record, tested offline on records shaped like each
dataset's schema (``tests/test_openchat_3_5_sources.py``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

# ------------------------------------------------------------------------------------------------ the datasets
# Hub names as the OpenChat 3.5 / 3.5-1210 model cards link them.
SHAREGPT_HUB = "openchat/openchat_sharegpt4_dataset"
SHAREGPT_FILE = "sharegpt_clean.json"  # ShareGPT in its original layout with `model` labels ("Model: GPT-4", ...)
OPENORCA_HUB = "Open-Orca/OpenOrca"
OPENORCA_FILES = {  # Open-Orca keeps its GPT-4 and GPT-3.5 completions in separate files
    "gpt-4": "1M-GPT4-Augmented.parquet",
    "gpt-3.5-turbo": "3_5M-GPT3_5-Augmented.parquet",
}
OPENORCA_FLAN_HUB = "imone/OpenOrca_FLAN"  # "Open-Orca with FLAN answers"; its card documents no columns
CAPYBARA_HUBS = ("LDJnr/Pure-Dove", "LDJnr/Verified-Camel", "LDJnr/LessWrong-Amplify-Instruct")  # Capybara 1 2 3
GOAT_HUB = "tiedong/goat"
GLAIVE_HUB = "glaiveai/glaive-code-assistant"
METAMATH_HUB = "meta-math/MetaMathQA"
MATHINSTRUCT_HUB = "TIGER-Lab/MathInstruct"
OASST_HUB = "OpenAssistant/oasst_top1_2023-08-25"


OPENORCA_FLAN_COLUMNS = ("id", "system_prompt", "question", "response")  # Open-Orca's layout, the one accepted


class SkipRecord(ValueError):
    """A record that cannot be converted; the message is the reason (counted, never silent)."""


class LayoutError(ValueError):
    """A dataset whose columns are not the layout its converter reads: the conversion stops (exit status 2)."""


Converted = list[tuple[str, dict[str, Any]]]  # (output file stem, record in a crlft source layout)


def _text(record: dict[str, Any], key: str) -> str:
    value = record.get(key)
    if not isinstance(value, str) or not value.strip():
        raise SkipRecord(f"missing or empty {key!r}")
    return value


def _load_split_sharegpt():
    """``data_prep/split_sharegpt.py`` (the team's GPT-4 / GPT-3.5 split), imported by path: data_prep is no package."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "split_sharegpt.py")
    if not os.path.isfile(path):
        return None
    spec = importlib.util.spec_from_file_location("split_sharegpt", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_split_sharegpt = _load_split_sharegpt()


def is_gpt4(model: object) -> bool:
    """Whether a ``model`` label names GPT-4 ("Model: GPT-4", "gpt-4-0613", "gpt4", any case)."""
    if _split_sharegpt is not None and _split_sharegpt.is_gpt4(model):
        return True
    return isinstance(model, str) and re.sub(r"[\s_-]", "", model.lower()).find("gpt4") >= 0


# ------------------------------------------------------------------------------------------------ converters
def convert_sharegpt(record: dict[str, Any]) -> Converted:
    """OpenChat's ShareGPT: ``{id, model, conversations[{from, value}]}`` → ``sharegpt_gpt4`` or ``sharegpt_gpt35``.

    A record goes to ``sharegpt_gpt4`` when its ``model`` names GPT-4 (as ``data_prep/split_sharegpt.py`` decides),
    otherwise to ``sharegpt_gpt35`` (GPT-3.5 and unlabelled records: OpenChat treated every non-GPT-4 answer as
    sub-optimal).
    """
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise SkipRecord("missing or empty 'conversations'")
    if not any(isinstance(t, dict) and t.get("from") in ("gpt", "assistant") for t in turns):
        raise SkipRecord("no assistant turn")
    out = {"id": record.get("id"), "model": record.get("model"), "conversations": turns}
    return [("sharegpt_gpt4" if is_gpt4(record.get("model")) else "sharegpt_gpt35", out)]


def convert_openorca(record: dict[str, Any], default_model: str | None = None) -> Converted:
    """Open-Orca: ``{id, system_prompt, question, response}`` (+ ``model`` where the file has one) → messages.

    Args:
        record: one Open-Orca row.
        default_model: the model that wrote the file's completions when rows carry no ``model`` column
            (Open-Orca keeps GPT-4 and GPT-3.5 completions in separate files).
    """
    model = record.get("model") or default_model
    if not model:
        raise SkipRecord("no 'model' column and no model given for the file: cannot tell GPT-4 from GPT-3.5")
    messages = _orca_messages(record)
    target = "openorca_gpt4" if is_gpt4(model) else "openorca_gpt35"
    return [(target, {"id": record.get("id"), "model": model, "messages": messages})]


def _orca_messages(record: dict[str, Any]) -> list[dict[str, str]]:
    """Open-Orca's ``system_prompt`` (when not empty), ``question`` and ``response`` as messages."""
    messages = []
    system = record.get("system_prompt")
    if isinstance(system, str) and system.strip():
        messages.append({"role": "system", "content": system})
    messages.append({"role": "user", "content": _text(record, "question")})
    messages.append({"role": "assistant", "content": _text(record, "response")})
    return messages


def convert_openorca_flan(record: dict[str, Any]) -> Converted:
    """imone/OpenOrca_FLAN ("Open-Orca with FLAN answers"): ``{id, system_prompt, question, response}`` → messages.

    Its card documents no columns, so the converter accepts exactly Open-Orca's layout and raises ``LayoutError``
    (listing the columns found) on any other: an extra column could hold the answer we should be reading (e.g. the
    GPT-4 completion beside the FLAN target), so nothing is guessed. Open-Orca's system prompts are kept as the
    dataset gives them.

    Class (the recipe's ``openorca_flan`` source: condition "GPT4 Correct", reward 1.0); NOT PUBLISHED, our
    reasoning: the answers are the FLAN collection's own targets, the human-written reference answers of its
    tasks, not GPT-4's or GPT-3.5's completions. C-RLFT classes a source by the quality of its answers, and these
    are correct by construction, so they are expert data, not the GPT-3.5 class (reward 0.1, the paper's value for
    a weaker model's answers, would down-weight correct answers tenfold). The condition is "GPT4 Correct" because
    OpenChat 3.5 serves only that condition and "Code", and its card evaluates AGIEval, BBH and the zero-shot
    Orca-style tasks in that template, crediting training on such task data for its few-shot answers: the data
    only teaches that under the condition the model is prompted with. The cost: FLAN targets are terse, so they
    pull "GPT4 Correct" answers towards short ones; a separate condition would avoid that but is never served.
    """
    columns = set(record)
    if columns != set(OPENORCA_FLAN_COLUMNS):
        raise LayoutError(
            f"{OPENORCA_FLAN_HUB}: expected Open-Orca's columns {', '.join(OPENORCA_FLAN_COLUMNS)}; found "
            f"{', '.join(sorted(map(str, columns))) or 'none'}. Its card documents no columns: look at what the "
            "download holds and adapt convert_openorca_flan (no openorca_flan.jsonl written)."
        )
    messages = _orca_messages(record)
    return [("openorca_flan", {"id": record.get("id"), "messages": messages})]


def convert_capybara(record: dict[str, Any]) -> Converted:
    """Capybara (LDJnr): ``{source?, conversation[{input, output}]}`` → messages (one user/assistant pair a turn)."""
    turns = record.get("conversation")
    if not isinstance(turns, list) or not turns:
        raise SkipRecord("missing or empty 'conversation'")
    messages = []
    for turn in turns:
        if not isinstance(turn, dict):
            raise SkipRecord("a turn is not an object")
        messages.append({"role": "user", "content": _text(turn, "input")})
        messages.append({"role": "assistant", "content": _text(turn, "output")})
    return [("capybara", {"source": record.get("source"), "messages": messages})]


def convert_goat(record: dict[str, Any]) -> Converted:
    """GOAT: ``{instruction, input, output, answer}`` → alpaca (``output`` holds the worked answer)."""
    out = {"instruction": _text(record, "instruction"), "output": _text(record, "output")}
    extra = record.get("input")
    if isinstance(extra, str) and extra.strip():
        out["input"] = extra
    return [("goat", out)]


def convert_glaive(record: dict[str, Any]) -> Converted:
    """Glaive code assistant: ``{id, question, answer}`` → alpaca."""
    return [("glaive_code", {"instruction": _text(record, "question"), "output": _text(record, "answer")})]


def convert_metamath(record: dict[str, Any]) -> Converted:
    """MetaMathQA: ``{query, response, type, original_question}`` → alpaca."""
    return [("metamathqa", {"instruction": _text(record, "query"), "output": _text(record, "response"),
                            "type": record.get("type")})]


def convert_mathinstruct(record: dict[str, Any]) -> Converted:
    """MathInstruct: ``{source, instruction, output}`` → alpaca."""
    return [("mathinstruct", {"instruction": _text(record, "instruction"), "output": _text(record, "output"),
                              "source": record.get("source")})]


_CHATML_TURN = re.compile(r"<\|im_start\|>(\w+)\n(.*?)<\|im_end\|>", re.DOTALL)


def convert_oasst(record: dict[str, Any]) -> Converted:
    """OpenAssistant top-1 threads: ``{text}`` in ChatML (``<|im_start|>user\\n...<|im_end|>``) → messages."""
    text = _text(record, "text")
    messages = []
    for role, content in _CHATML_TURN.findall(text):
        if role not in ("system", "user", "assistant"):
            raise SkipRecord(f"unknown role {role!r}")
        messages.append({"role": role, "content": content.strip()})
    if not any(m["role"] == "assistant" for m in messages):
        raise SkipRecord("no assistant turn found in the ChatML text")
    leftover = _CHATML_TURN.sub("", text).strip()
    if leftover:
        raise SkipRecord(f"text outside ChatML turns: {leftover[:40]!r}")
    return [("oasst_top1", {"messages": messages})]


# ------------------------------------------------------------------------------------------------ the dataset list
@dataclass(frozen=True)
class Dataset:
    """One public dataset: where it is on the hub and how its records are converted.

    Attributes:
        name: the name used by ``--only`` and ``--local``.
        hub: ``(hub id, data file or None, model label or None)`` parts to load; the model label is passed to the
            converter for files whose rows do not say which model wrote them.
        convert: the record converter.
        outputs: the output file stems it writes.
        default: converted when ``--only`` is not given (``openorca`` needs ``--openorca-completions``).
    """

    name: str
    hub: tuple[tuple[str, str | None, str | None], ...]
    convert: Callable[..., Converted]
    outputs: tuple[str, ...]
    notes: str = ""
    default: bool = True


DATASETS: dict[str, Dataset] = {
    d.name: d
    for d in (
        Dataset("sharegpt", ((SHAREGPT_HUB, SHAREGPT_FILE, None),), convert_sharegpt,
                ("sharegpt_gpt4", "sharegpt_gpt35"), "split by the `model` label"),
        # The model card's "Open-Orca with FLAN answers" (see convert_openorca_flan for its class).
        Dataset("openorca_flan", ((OPENORCA_FLAN_HUB, None, None),), convert_openorca_flan, ("openorca_flan",)),
        # Open-Orca's 1M GPT-4 + 3.2M GPT-3.5 completions: not what the card lists (and ~60x the ShareGPT
        # conversations); off by default, kept for comparison behind --openorca-completions.
        Dataset("openorca", tuple((OPENORCA_HUB, f, m) for m, f in OPENORCA_FILES.items()), convert_openorca,
                ("openorca_gpt4", "openorca_gpt35"), "split by the file (GPT-4 / GPT-3.5 completions)",
                default=False),
        Dataset("capybara", tuple((h, None, None) for h in CAPYBARA_HUBS), convert_capybara, ("capybara",)),
        Dataset("goat", ((GOAT_HUB, None, None),), convert_goat, ("goat",)),
        Dataset("glaive_code", ((GLAIVE_HUB, None, None),), convert_glaive, ("glaive_code",)),
        Dataset("metamathqa", ((METAMATH_HUB, None, None),), convert_metamath, ("metamathqa",)),
        Dataset("mathinstruct", ((MATHINSTRUCT_HUB, None, None),), convert_mathinstruct, ("mathinstruct",)),
        Dataset("oasst_top1", ((OASST_HUB, None, None),), convert_oasst, ("oasst_top1",)),
    )
}


# ------------------------------------------------------------------------------------------------ reading
def read_local(path: str) -> Iterator[dict[str, Any]]:
    """Records of a local ``.json`` (list), ``.jsonl`` or ``.parquet`` file, read with ``datasets``."""
    import datasets

    if path.endswith(".parquet"):
        yield from datasets.load_dataset("parquet", data_files=path, split="train")
        return
    with open(path, encoding="utf-8") as f:
        head = f.read(1024).lstrip()
    if head.startswith("["):  # a JSON list (e.g. sharegpt_clean.json), which the json builder reads too slowly
        with open(path, encoding="utf-8") as f:
            yield from json.load(f)
        return
    yield from datasets.load_dataset("json", data_files=path, split="train")


def read_hub(hub_id: str, data_file: str | None) -> Iterator[dict[str, Any]]:
    """Records of a hub dataset (needs a network): one data file of it, or its ``train`` split."""
    import datasets

    if data_file is not None and data_file.endswith(".json"):
        from huggingface_hub import hf_hub_download

        yield from read_local(hf_hub_download(hub_id, data_file, repo_type="dataset"))
        return
    if data_file is not None:
        yield from datasets.load_dataset(hub_id, data_files=data_file, split="train")
        return
    yield from datasets.load_dataset(hub_id, split="train")


# ------------------------------------------------------------------------------------------------ writing
@dataclass
class Counts:
    """What happened to one dataset's records."""

    read: int = 0
    written: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for the report."""
        return {"read": self.read, "written": dict(self.written), "skipped": dict(self.skipped)}


def convert_records(
    dataset: Dataset,
    parts: Iterable[tuple[Iterable[dict[str, Any]], str | None]],
    out_dir: str,
    max_records: int | None = None,
) -> Counts:
    """Convert records and write them to ``OUT/<stem>.jsonl`` (every stem of ``dataset.outputs`` is written).

    Args:
        dataset: which dataset (its converter and output stems).
        parts: ``(records, model label or None)`` per input file.
        out_dir: the output directory.
        max_records: read at most this many records per input part (for a quick look).

    Returns:
        The counts (read, written per output, skipped per reason).

    Raises:
        LayoutError: a record is not in the layout the converter reads; the dataset's output files are removed.
    """
    os.makedirs(out_dir, exist_ok=True)
    counts = Counts()
    paths = {stem: os.path.join(out_dir, f"{stem}.jsonl") for stem in dataset.outputs}
    files = {stem: open(path, "w", encoding="utf-8") for stem, path in paths.items()}
    try:
        for records, model in parts:
            for i, record in enumerate(records):
                if max_records is not None and i >= max_records:
                    break
                counts.read += 1
                try:
                    converted = dataset.convert(record, model) if model is not None else dataset.convert(record)
                except SkipRecord as reason:
                    counts.skipped[str(reason)] += 1
                    continue
                for stem, out in converted:
                    files[stem].write(json.dumps(out, ensure_ascii=False) + "\n")
                    counts.written[stem] += 1
    except LayoutError:
        for f in files.values():
            f.close()
        for path in paths.values():
            os.remove(path)
        raise
    finally:
        for f in files.values():
            f.close()
    return counts


def default_datasets() -> list[str]:
    """The datasets converted when ``--only`` is not given: the model card's (the recipe reads their outputs)."""
    return [name for name, d in DATASETS.items() if d.default]


def main(argv: list[str] | None = None) -> int:
    """Command line entry; prints the counts and writes ``conversion_report.json``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", help="where the source files are written (the recipe expects data/openchat_3.5/"
                        "sources)")
    parser.add_argument("--only", nargs="+", choices=sorted(DATASETS), help="convert only these datasets")
    parser.add_argument("--local", nargs="+", default=[], metavar="NAME=PATH",
                        help="read a dataset from a local file instead of the hub (for openorca: "
                        "openorca:gpt-4=PATH to name the model of a file without a `model` column)")
    parser.add_argument("--max-records", type=int, default=None, help="read at most N records per input file")
    parser.add_argument("--openorca-completions", action="store_true",
                        help="also convert Open-Orca/OpenOrca's GPT-4 and GPT-3.5 completion files (openorca_gpt4, "
                        "openorca_gpt35; not the card's data, the recipe does not read them)")
    args = parser.parse_args(argv)
    selected = list(args.only or default_datasets())
    if args.openorca_completions and "openorca" not in selected:
        selected.append("openorca")

    local: dict[str, list[tuple[str, str | None]]] = {}
    for item in args.local:
        key, sep, path = item.partition("=")
        name, _, model = key.partition(":")
        if not sep or name not in DATASETS:
            parser.error(f"--local {item!r}: expected NAME=PATH or NAME:MODEL=PATH with NAME one of "
                         f"{', '.join(sorted(DATASETS))}")
        if name not in selected:
            parser.error(f"--local {item!r}: {name} is not converted in this run (add it to --only"
                         + (", or pass --openorca-completions)" if name == "openorca" else ")"))
        local.setdefault(name, []).append((path, model or None))

    report = {}
    for name in selected:
        dataset = DATASETS[name]
        if name in local:
            parts = [(read_local(path), model) for path, model in local[name]]
        else:
            parts = [(read_hub(hub_id, data_file), model) for hub_id, data_file, model in dataset.hub]
        try:
            counts = convert_records(dataset, parts, args.out_dir, args.max_records)
        except (OSError, ValueError) as error:
            print(f"{name}: error: {error}", file=sys.stderr)
            return 2
        report[name] = counts.to_dict()
        written = ", ".join(f"{stem} {n:,}" for stem, n in sorted(counts.written.items())) or "nothing"
        skipped = sum(counts.skipped.values())
        print(f"{name}: read {counts.read:,}, wrote {written}, skipped {skipped:,}"
              + (f" ({dict(counts.skipped)})" if skipped else ""))
    with open(os.path.join(args.out_dir, "conversion_report.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
