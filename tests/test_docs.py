"""The README quickstart and every docstring example run, in a fresh process without x64."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def readme_block(heading: str) -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split(f"## {heading}\n", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def run_python(code: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-W", "error", "-c", code],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


README_BLOCKS = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


@pytest.mark.parametrize("index", range(len(README_BLOCKS)))
def test_every_readme_python_block_runs_on_its_own(index, tmp_path):
    """Each README code block runs as written, alone, in a fresh process (in a temp folder,
    so files it writes land there)."""
    env_root = str(ROOT)
    code = f"import sys; sys.path.insert(0, {env_root!r})\n" + README_BLOCKS[index]
    result = run_python(code, cwd=tmp_path)
    assert result.returncode == 0, f"README block {index}:\n{README_BLOCKS[index]}\n{result.stderr}"


def test_readme_quickstart_runs():
    code = readme_block("Quickstart")
    assert len(code.strip().splitlines()) <= 25
    result = run_python(code)
    assert result.returncode == 0, result.stderr


def test_docstring_examples_run():
    code = (
        "import doctest, sys, pkgutil, importlib, invnet\n"
        "failed = 0\n"
        "for m in pkgutil.walk_packages(invnet.__path__, 'invnet.'):\n"
        "    mod = importlib.import_module(m.name)\n"
        "    flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE\n"
        "    r = doctest.testmod(mod, optionflags=flags)\n"
        "    failed += r.failed\n"
        "sys.exit(1 if failed else 0)\n"
    )
    result = run_python(code)
    assert result.returncode == 0, result.stdout + result.stderr
