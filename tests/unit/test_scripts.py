"""install.sh and launch.sh: usage on --help without side effects, and python3 where there is no python."""

import os
import subprocess
import sys

import pytest
from helpers import REPO_ROOT


@pytest.mark.parametrize("script", ["install.sh", "launch.sh"])
def test_help_prints_usage_and_does_nothing_else(script, tmp_path):
    result = subprocess.run(["bash", os.path.join(REPO_ROOT, script), "--help"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=30, env={**os.environ, "PYTHON": "/nonexistent/python"})
    assert result.returncode == 0, result.stderr
    assert f"./{script}" in result.stdout and "--help" not in result.stderr
    assert os.listdir(tmp_path) == []  # nothing installed, prepared or written


def test_install_sh_refuses_an_unknown_option():
    result = subprocess.run(["bash", os.path.join(REPO_ROOT, "install.sh"), "--devv"], capture_output=True, text=True,
                            timeout=30, env={**os.environ, "PYTHON": "/nonexistent/python"})
    assert result.returncode == 2 and "unknown option --devv" in result.stderr


def _pick(tmp_path, names, python_env=None):
    bin_dir = tmp_path / ("bin_" + "_".join(names) + ("_env" if python_env else ""))
    bin_dir.mkdir()
    for name in names:
        (bin_dir / name).symlink_to(sys.executable)
    env = {"PATH": str(bin_dir)}  # nothing else: only what the test put there
    if python_env:
        env["PYTHON"] = python_env
    script = f"source {os.path.join(REPO_ROOT, 'scripts', 'python.sh')} && crlft_python"
    return subprocess.run(["/bin/bash", "-c", script], capture_output=True, text=True, timeout=30, env=env)


def test_scripts_use_python3_when_there_is_no_python(tmp_path):
    assert _pick(tmp_path, ["python3"]).stdout.strip() == "python3"


def test_scripts_prefer_python_then_the_python_variable(tmp_path):
    assert _pick(tmp_path, ["python", "python3"]).stdout.strip() == "python"
    assert _pick(tmp_path, ["python3"], python_env="/opt/py/bin/python").stdout.strip() == "/opt/py/bin/python"


def test_scripts_say_so_when_there_is_no_python_at_all(tmp_path):
    result = _pick(tmp_path, [])
    assert result.returncode == 1 and "neither python nor python3 is on PATH" in result.stderr


def test_torch_extensions_dir_is_per_environment(monkeypatch, tmp_path):
    from crlft.dist import torch_extensions_dir

    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "venv_a"))
    (tmp_path / "venv_a").mkdir()
    assert torch_extensions_dir() == str(tmp_path / "venv_a" / "share" / "crlft" / "torch_extensions")
    monkeypatch.setattr(sys, "prefix", "/nonexistent/read-only/env")  # not writable: the user cache, keyed
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    other = torch_extensions_dir()
    assert other.startswith(str(tmp_path / "cache" / "crlft" / "torch_extensions"))
    monkeypatch.setattr(sys, "prefix", "/nonexistent/another/env")
    assert torch_extensions_dir() != other
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "/chosen")
    assert torch_extensions_dir() == "/chosen"
