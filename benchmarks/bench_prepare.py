"""Throughput of ``crlft prepare`` on synthetic multi-turn conversations, next to single-process baselines.

Writes ``--num-conversations`` (default 100k) synthetic multi-turn conversations in OpenChat's format (2-4 user /
assistant turn pairs of random English-like text with digits, punctuation, code-ish and non-ASCII words) to a JSON
lines file in a temporary directory, builds the OpenChat 3.5 tokenizer offline, and measures on the same file:

1. ``crlft prepare`` (read → render + tokenize in ``num_proc`` processes → report → write), stage by stage;
2. a plain single-process loop: parse each line, resolve weights, ``render`` one conversation at a time,
   truncate, trim trailing zero weights (no writing);
3. OpenChat's approach in one process (re-implemented from its description, not its code): one fast-tokenizer
   call for all message texts of the batch, role prefixes tokenized once per (role, condition), then assembly.

Tokens/s counts the tokens of the kept rows (what training sees). Other processes share the cores, so the script
prints the load average before and after and, per path, the CPU seconds it used (this process and its workers)
next to the wall time: tokens per CPU second do not depend on the load. Run it when ``uptime`` shows the machine
quiet for wall-clock figures.

Run: ``python benchmarks/bench_prepare.py`` (a few minutes on 2 cores; ``--num-conversations 20000`` for a quick
look, ``--num-proc`` to change the worker count).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import sys
import tempfile
import textwrap
import time

# Run from a checkout without installing: the repository root holds the `crlft` package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

WORDS = (
    "the of and to in is that for it as with was on be by this are or from at which an have not but they can all "
    "model data train token weight loss value function return import class def print list dict string number "
    "because however therefore example result answer question explain simple first second third step method "
    "café naïve über 東京 数据 привет — ... , . ; : ! ? ( ) [ ] {} == += -> 0 1 2 3 42 100 3.14 2023 x_1 foo() "
    "HTTP JSON API GPU CPU Python Rust C++ `code` **bold** #heading\n\n"
).split(" ")


def synthetic_records(num_conversations: int, seed: int) -> list[dict]:
    """Multi-turn conversations in OpenChat's format, two conditions, per-message weights."""
    rng = random.Random(seed)
    records = []
    for i in range(num_conversations):
        items = []
        for _ in range(rng.randint(2, 4)):
            items.append({"role": "user", "content": " ".join(rng.choices(WORDS, k=rng.randint(5, 40))),
                          "weight": 0.0})
            items.append({"role": "assistant", "content": " ".join(rng.choices(WORDS, k=rng.randint(20, 80))),
                          "weight": 1.0 if i % 2 else 0.1})
        records.append({"items": items, "condition": "GPT4 Correct" if i % 2 else "GPT3", "system": ""})
    return records


def _kept_tokens(weights: list[float], max_context: int) -> int:
    """Tokens prepare keeps of a rendered conversation: truncated to ``max_context``, trailing zero weights cut."""
    end = min(len(weights), max_context)
    while end and not weights[end - 1]:
        end -= 1
    return end


def plain_loop(path: str, tokenizer, template: str, max_context: int) -> tuple[int, int]:
    """One conversation at a time in this process: parse, convert, render, truncate, trim. → (rows, tokens)."""
    from crlft.formats import FORMATS
    from crlft.render import render

    convert = FORMATS["openchat"]
    rows = tokens = 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            conversation = convert(json.loads(line))
            for message in conversation.messages:
                if message.role == "user":
                    message.weight = 0.0
            _, weights = render(conversation, template, tokenizer)
            end = _kept_tokens(weights, max_context)
            rows, tokens = rows + bool(end), tokens + end
    return rows, tokens


def openchat_style(path: str, tokenizer, max_context: int, batch_size: int = 10000) -> tuple[int, int]:
    """OpenChat's batched tokenization in one process (fast tokenizer). → (rows, tokens)."""
    backend = tokenizer.backend_tokenizer
    eot_id = tokenizer.convert_tokens_to_ids("<|end_of_turn|>")
    bos = [tokenizer.bos_token_id]
    rows = tokens = 0
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    for start in range(0, len(lines), batch_size):
        conversations = [json.loads(line) for line in lines[start:start + batch_size]]
        prefix_keys = sorted({(m["role"], c["condition"]) for c in conversations for m in c["items"]})
        prefix_texts = [f"{condition} {role.capitalize()}:".strip() for role, condition in prefix_keys]
        backend.encode_special_tokens = False
        prefixes = dict(zip(prefix_keys, (e.ids for e in backend.encode_batch_fast(
            prefix_texts, add_special_tokens=False))))
        backend.encode_special_tokens = True
        texts = [m["content"] for c in conversations for m in c["items"]]
        text_ids = [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]
        backend.encode_special_tokens = False
        k = 0
        for conversation in conversations:
            ids, weights = list(bos), [0.0]
            for message in conversation["items"]:
                prefix = prefixes[(message["role"], conversation["condition"])]
                ids.extend(prefix)
                weights.extend([0.0] * len(prefix))
                body = text_ids[k]
                k += 1
                ids.extend(body)
                ids.append(eot_id)
                weights.extend([message["weight"]] * (len(body) + 1))
            end = _kept_tokens(weights, max_context)
            rows, tokens = rows + bool(end), tokens + end
    return rows, tokens


def cpu_seconds() -> float:
    """User + system CPU time of this process and its finished child processes."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-conversations", type=int, default=100_000)
    parser.add_argument("--num-proc", type=int, nargs="+", default=None,
                        help="worker counts to time prepare with (default: the CPU count, then 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-context", type=int, default=8192)
    parser.add_argument("--skip-baselines", action="store_true")
    args = parser.parse_args()

    import datasets

    from crlft.prepare import _TOKENIZER_CACHE, _default_num_proc, prepare
    from crlft.recipe import load_recipe
    from crlft.templates import TEMPLATES
    from crlft.tokenizer import build_tokenizer, load_tokenizer

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    num_procs = args.num_proc or list(dict.fromkeys([_default_num_proc(), 1]))
    print(f"load average before: {os.getloadavg()}  cpus: {os.cpu_count()}")
    with tempfile.TemporaryDirectory(prefix="bench-prepare-") as work:
        tokenizer_dir = os.path.join(work, "tokenizer")
        build_tokenizer("openchat_3.5", tokenizer_dir)
        tokenizer = load_tokenizer(tokenizer_dir, TEMPLATES["openchat_3.5"])

        t0 = time.perf_counter()
        data_path = os.path.join(work, "conversations.jsonl")
        with open(data_path, "w", encoding="utf-8") as f:
            for record in synthetic_records(args.num_conversations, args.seed):
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        size_mib = os.path.getsize(data_path) / 2**20
        print(f"wrote {args.num_conversations} conversations ({size_mib:.0f} MiB) in {time.perf_counter() - t0:.1f}s")

        recipe_path = os.path.join(work, "recipe.yaml")
        with open(recipe_path, "w") as f:
            f.write(textwrap.dedent(f"""\
                model: {{base: {tokenizer_dir}, max_context: {args.max_context}}}
                data:
                  output_dir: {os.path.join(work, "prepared")}
                  sources:
                    - {{name: synthetic, path: {data_path}, format: openchat, reward: 1.0}}
                train: {{output_dir: {os.path.join(work, "run")}, batch_max_len: {args.max_context}}}
                """))
        results = []
        for num_proc in num_procs:
            recipe = load_recipe(recipe_path, [f"data.num_proc={num_proc}"])
            _TOKENIZER_CACHE.clear()  # each run loads its tokenizer, as `crlft prepare` does
            stats: dict = {}
            t0, c0 = time.perf_counter(), cpu_seconds()
            prepare(recipe, force=True, log=lambda line: None, stats=stats)
            prepare_s, prepare_cpu_s = time.perf_counter() - t0, cpu_seconds() - c0
            total = stats["report"]["total"]
            timings = stats["timings"]
            results.append((f"crlft prepare, num_proc={num_proc}: whole path (read → tokenize → write)", prepare_s,
                            prepare_cpu_s, total["kept"], total["tokens"]))
            results.append((f"crlft prepare, num_proc={num_proc}: render + tokenize stage",
                            timings["tokenize synthetic"], None, total["kept"], total["tokens"]))
            print(f"crlft prepare, num_proc={num_proc}, stages: "
                  + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items())
                  + f", tokenizer + metadata + report {prepare_s - sum(timings.values()):.1f}s"
                  + f"  (load average now {os.getloadavg()[0]:.1f})")

        if not args.skip_baselines:
            t0, c0 = time.perf_counter(), cpu_seconds()
            rows, tokens = plain_loop(data_path, tokenizer, "openchat_3.5", args.max_context)
            results.append(("plain loop, 1 process (render per conversation)", time.perf_counter() - t0,
                            cpu_seconds() - c0, rows, tokens))
            t0, c0 = time.perf_counter(), cpu_seconds()
            rows, tokens = openchat_style(data_path, tokenizer, args.max_context)
            results.append(("OpenChat-style batched, 1 process", time.perf_counter() - t0, cpu_seconds() - c0, rows,
                            tokens))

        print(f"\n{'path':<72}{'wall s':>8}{'CPU s':>8}{'rows':>9}{'tokens':>11}{'M tok/s':>9}{'M tok/CPU s':>13}")
        for name, seconds, cpu_s, rows, tokens in results:
            per_cpu = f"{tokens / cpu_s / 1e6:>13.3f}" if cpu_s else f"{'':>13}"
            cpu_text = f"{cpu_s:>8.1f}" if cpu_s else f"{'':>8}"
            print(f"{name:<72}{seconds:>8.1f}{cpu_text}{rows:>9}{tokens:>11}{tokens / seconds / 1e6:>9.3f}{per_cpu}")
        print(f"\nload average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
