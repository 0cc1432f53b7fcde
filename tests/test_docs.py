"""The README quickstart and every docstring example run, in a fresh process without x64."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_block(heading: str) -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split(f"## {heading}\n", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-W", "error", "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


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
