"""The two Python steps of ``benchmarks/gpu_check.sh``: what the machine holds, and the one summary file.

    python benchmarks/gpu_check_report.py probe OUT/env.json     # versions, GPU, attention backends; exit 1 if a
                                                                 # package crlft trains with does not import
    python benchmarks/gpu_check_report.py write OUT --mode gpu   # OUT/summary.md from what the phases left in OUT

``write`` reads ``OUT/phases.tsv`` (one line per phase: name, exit status, seconds, limit), ``OUT/env.json``,
``OUT/install.log``, ``OUT/gpu_tests.xml`` (pytest's JUnit report) and ``OUT/bench_gpu.json``, whichever exist,
and prints the summary too.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import inspect
import json
import os
import platform
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)  # bench_gpu, for its FlashAttention-3/-4 check
sys.path.insert(0, os.path.dirname(HERE))  # crlft, from a checkout

# What crlft's GPU path imports, and the packages the check reports (the image's or the carried wheels').
REQUIRED_MODULES = ("torch", "transformers", "deepspeed", "datasets", "mistral_common", "crlft.trainer")
REPORTED_DISTRIBUTIONS = ("torch", "transformers", "deepspeed", "datasets", "mistral-common", "pydantic",
                          "accelerate", "peft", "flash-attn", "triton", "pyarrow", "huggingface-hub", "pytest")


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def probe() -> dict:
    """What this machine holds for crlft's GPU path."""
    info: dict = {"python": sys.version.split()[0], "executable": sys.executable, "platform": platform.platform(),
                  "versions": {d: _version(d) for d in REPORTED_DISTRIBUTIONS}, "imports": {}}
    for module in REQUIRED_MODULES:
        try:
            imported = importlib.import_module(module)
            info["imports"][module] = {"ok": True, "file": getattr(imported, "__file__", None)}
        except Exception as error:  # noqa: BLE001 - reported, not raised: the summary says which failed
            info["imports"][module] = {"ok": False, "error": f"{type(error).__name__}: {error}"[:500]}
    try:
        import torch
    except ImportError:
        return info
    info["torch_cuda"] = torch.version.cuda
    info["cuda_available"] = torch.cuda.is_available()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        info["gpu"] = {"name": properties.name, "capability": list(torch.cuda.get_device_capability(device)),
                       "memory_gib": round(properties.total_memory / 2**30, 1)}
        try:
            info["gpu"]["nvidia_smi"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError) as error:
            info["gpu"]["nvidia_smi"] = f"not run: {error}"
    attention: dict = {}
    try:
        from torch.nn.attention.varlen import varlen_attn

        attention["varlen_attn_parameters"] = list(inspect.signature(varlen_attn).parameters)
    except ImportError as error:
        attention["varlen_attn_parameters"] = f"no torch.nn.attention.varlen: {error}"
    try:
        import torch.nn.attention as torch_attention

        attention["torch_flash_impls"] = torch_attention.list_flash_attention_impls()
    except AttributeError:
        attention["torch_flash_impls"] = []
    try:
        import bench_gpu

        attention["torch_flash_impl_unavailable"] = {
            impl: bench_gpu.torch_flash_impl_unavailable(impl, device) for impl in bench_gpu.TORCH_FLASH_IMPLS}
        from crlft.attention import available_attn_implementations

        attention["crlft_available_bf16"] = available_attn_implementations(device, torch.bfloat16)
    except Exception as error:  # noqa: BLE001
        attention["error"] = f"{type(error).__name__}: {error}"[:500]
    info["attention"] = attention
    return info


# ----------------------------------------------------------------------------------------------------------------
# The summary
# ----------------------------------------------------------------------------------------------------------------


def _read(path: str) -> str | None:
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def read_phases(out_dir: str) -> list[dict]:
    """``phases.tsv``: name, exit status (or ``skipped``), seconds, limit, note."""
    text = _read(os.path.join(out_dir, "phases.tsv")) or ""
    phases = []
    for line in text.splitlines():
        fields = line.split("\t")
        if len(fields) >= 4:
            phases.append({"name": fields[0], "status": fields[1], "seconds": fields[2], "limit": fields[3],
                           "note": fields[4] if len(fields) > 4 else ""})
    return phases


def phase_outcome(phase: dict) -> str:
    """``ok``, ``skipped``, ``TIMED OUT`` (exit 124/137 from ``timeout``) or ``FAILED (exit N)``."""
    status = phase["status"]
    if status == "0":
        return "ok"
    if status == "skipped":
        return "skipped"
    if status in ("124", "137"):
        return "TIMED OUT"
    return f"FAILED (exit {status})"


def read_junit(path: str) -> list[dict]:
    """One entry per test case of a pytest JUnit XML: name, outcome, seconds, message, captured output."""
    if not os.path.isfile(path):
        return []
    cases = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "FAILED", "error": "ERROR", "skipped": "skipped"}[child.tag]
                message = (child.get("message") or child.text or "").strip()
        output = "".join((child.text or "") for child in case if child.tag == "system-out").strip()
        name = case.get("name", "?")
        module = (case.get("classname") or "").rsplit(".", 1)[-1]
        cases.append({"name": f"{module}::{name}" if module else name, "outcome": outcome,
                      "seconds": float(case.get("time") or 0), "message": message, "output": output})
    return cases


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def summary(out_dir: str, mode: str, budget: float | None) -> tuple[str, bool]:
    """The summary's Markdown text and whether every phase passed."""
    phases = read_phases(out_dir)
    env = json.loads(_read(os.path.join(out_dir, "env.json")) or "{}")
    cases = read_junit(os.path.join(out_dir, "gpu_tests.xml"))
    bench = json.loads(_read(os.path.join(out_dir, "bench_gpu.json")) or "{}")
    ok = bool(phases) and all(phase_outcome(p) in ("ok", "skipped") for p in phases)
    total = sum(float(p["seconds"] or 0) for p in phases)
    lines = [f"# crlft GPU check ({mode}): {'PASS' if ok else 'FAIL'}", ""]
    lines.append(f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}; phases took {total:.0f} s"
                 + (f" of a {budget:.0f} s budget" if budget else "") + ".")
    lines += ["", "## Machine", ""]
    gpu = env.get("gpu")
    lines.append(f"- GPU: {gpu['name']} (compute capability {'.'.join(map(str, gpu['capability']))}, "
                 f"{gpu['memory_gib']} GiB; nvidia-smi: {gpu.get('nvidia_smi', '')})" if gpu else
                 f"- GPU: none (CUDA available: {env.get('cuda_available')})")
    lines.append(f"- Python {env.get('python')} ({env.get('executable')}), torch CUDA {env.get('torch_cuda')}")
    versions = env.get("versions", {})
    lines.append("- " + ", ".join(f"{d} {v}" for d, v in versions.items() if v)
                 + "; not installed: " + (", ".join(d for d, v in versions.items() if not v) or "none"))
    failed_imports = {m: i["error"] for m, i in env.get("imports", {}).items() if not i.get("ok")}
    lines.append("- imports: " + ("all of " + ", ".join(env.get("imports", {})) + " import" if not failed_imports
                                   else "; ".join(f"{m} FAILED: {e}" for m, e in failed_imports.items())))
    attention = env.get("attention", {})
    if attention:
        lines.append(f"- crlft attention backends (bf16): {attention.get('crlft_available_bf16')}; "
                     f"torch.nn.attention flash impls: {attention.get('torch_flash_impls')}; varlen_attn "
                     f"parameters: {attention.get('varlen_attn_parameters')}")
        for impl, reason in (attention.get("torch_flash_impl_unavailable") or {}).items():
            lines.append(f"- {impl}: {'available' if reason is None else 'unavailable: ' + reason}")

    lines += ["", "## Phases", "", "| phase | outcome | seconds | limit | note |", "| --- | --- | --- | --- | --- |"]
    for p in phases:
        lines.append(f"| {p['name']} | {phase_outcome(p)} | {p['seconds']} | {p['limit']} | {p['note']} |")
    install = _read(os.path.join(out_dir, "install.log"))
    if install and install.strip():
        lines += ["", "Install log (last lines):", "", "```", *install.strip().splitlines()[-8:], "```"]

    lines += ["", "## Tests marked gpu", ""]
    if cases:
        counts = {k: sum(c["outcome"] == k for c in cases) for k in ("passed", "FAILED", "ERROR", "skipped")}
        lines.append(", ".join(f"{n} {k.lower()}" for k, n in counts.items() if n) + ".")
        lines += ["", "| test | outcome | seconds | detail |", "| --- | --- | --- | --- |"]
        for c in cases:
            detail = c["message"] if c["outcome"] != "passed" else ""
            printed = [line for line in c["output"].splitlines() if line.strip()]
            if printed and c["outcome"] == "passed":
                detail = " / ".join(printed[-3:])
            lines.append(f"| {c['name']} | {c['outcome']} | {c['seconds']:.1f} | {_one_line(detail)} |")
    else:
        lines.append("No JUnit report (the phase did not run or did not finish); see gpu_tests.log.")

    lines += ["", "## bench_gpu.py", ""]
    if bench:
        lines.append(f"`{bench.get('command')}`: {bench.get('device')}, {bench.get('dtype')}, "
                     f"{bench.get('layers')} layers of shape {bench.get('shape')}, rows of {bench.get('row_tokens')} "
                     f"tokens ({bench.get('mean_real_tokens_per_row', 0):.0f} real, "
                     f"{bench.get('mean_conversations_per_row', 0):.1f} conversations), peak "
                     f"{bench.get('peak_flops')} FLOP/s.")
        lines += ["", bench.get("mfu_formula", ""), "", bench.get("attention_log", ""), ""]
        lines += ["| attention | checkpointing | tokens/s | s/step | TFLOP/s | MFU | peak GiB | note |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in bench.get("runs", []):
            ckpt = "on" if r["checkpointing"] else "off"
            if "skipped" in r or "error" in r:
                note = ("skipped: " + r["skipped"]) if "skipped" in r else r["error"]
                lines.append(f"| {r['attn']} | {ckpt} | | | | | | {_one_line(note)} |")
                continue
            mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "n/a"
            lines.append(f"| {r['attn']} | {ckpt} | {r['tokens_per_s']:.0f} | {r['seconds_per_step']:.3f} | "
                         f"{r['tflops_per_s']:.1f} | {mfu} | {r['peak_memory_gib']:.1f} | |")
    else:
        lines.append("No bench_gpu.json (the phase did not run or measured nothing); see bench_gpu.log.")
    return "\n".join(lines) + "\n", ok


def main(argv: list[str] | None = None) -> int:
    """``probe`` or ``write``; see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    probe_parser = commands.add_parser("probe", help="write what this machine holds as JSON")
    probe_parser.add_argument("path")
    write_parser = commands.add_parser("write", help="write OUT/summary.md")
    write_parser.add_argument("out_dir")
    write_parser.add_argument("--mode", default="gpu")
    write_parser.add_argument("--budget", type=float)
    args = parser.parse_args(argv)
    if args.command == "probe":
        info = probe()
        with open(args.path, "w") as f:
            json.dump(info, f, indent=2)
        failed = [m for m, i in info["imports"].items() if not i["ok"]]
        for module in failed:
            print(f"probe: {module} does not import: {info['imports'][module]['error']}", file=sys.stderr)
        print(f"probe: python {info['python']}, " + ", ".join(f"{d} {v}" for d, v in info["versions"].items() if v))
        return 1 if failed else 0
    text, ok = summary(args.out_dir, args.mode, args.budget)
    with open(os.path.join(args.out_dir, "summary.md"), "w") as f:
        f.write(text)
    print(text)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
