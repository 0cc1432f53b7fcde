"""The README quickstart, every code block of the README and of the documentation site
(docs/**/*.md), and every docstring example run, each in a fresh process without x64; the
site builds with `mkdocs build --strict`."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"

# A ```python block of a docs page runs unless the line just before its fence is
# `<!-- no-run: the reason -->` (GPU-only code, a long training run): use it sparingly.
_FENCE = re.compile(
    r"(?:<!--\s*no-run:(?P<reason>[^>]*?)-->\s*\n)?```python\n(?P<code>.*?)```", re.S
)


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


def test_readme_quickstart_is_short():
    # it runs in test_every_readme_python_block_runs_on_its_own, with every README block
    code = readme_block("Quickstart")
    assert code in README_BLOCKS and len(code.strip().splitlines()) <= 25


@pytest.mark.extended  # every doctest in one process: ~70 s
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


def docs_blocks() -> list:
    """One pytest param per ```python block of docs/**/*.md: (page, index, code), with
    an id such as ``guide/layers.md-0``; blocks marked no-run are left out (with a reason)."""
    params = []
    for page in sorted(DOCS.rglob("*.md")):
        name = page.relative_to(DOCS).as_posix()
        for index, match in enumerate(_FENCE.finditer(page.read_text())):
            if match.group("reason") is not None:
                assert match.group("reason").strip(), f"{name} block {index}: no-run needs a reason"
                continue
            params.append(pytest.param(name, index, match.group("code"), id=f"{name}-{index}"))
    return params


@pytest.mark.extended  # 13 fresh processes: 5-30 s each
@pytest.mark.parametrize("page, index, code", docs_blocks())
def test_every_docs_python_block_runs_on_its_own(page, index, code, tmp_path):
    """Each docs page's code block runs as written, alone, in a fresh process in a temp
    folder, with warnings as errors."""
    prelude = f"import sys; sys.path.insert(0, {str(ROOT)!r})\n"
    result = run_python(prelude + code, cwd=tmp_path)
    assert result.returncode == 0, f"docs/{page} block {index}:\n{code}\n{result.stderr}"


def test_docs_no_run_marker_is_recognised():
    """A block preceded by a no-run comment is skipped, one without it is kept."""
    text = (
        "x\n<!-- no-run: needs a GPU -->\n```python\nraise SystemExit(1)\n```\n"
        "```python\npass\n```\n"
    )
    found = [(m.group("reason"), m.group("code")) for m in _FENCE.finditer(text)]
    assert found == [(" needs a GPU ", "raise SystemExit(1)\n"), (None, "pass\n")]


def test_api_reference_lists_every_public_name():
    """docs/api.md renders each name of ``invnet.__all__`` (a new public name needs its
    ``::: invnet.Name`` line there)."""
    import invnet

    listed = set(re.findall(r"^::: invnet\.(\w+)$", (DOCS / "api.md").read_text(), re.M))
    missing = sorted(set(invnet.__all__) - listed - {"__version__"})
    assert not missing, f"add to docs/api.md: {missing}"


@pytest.mark.extended
def test_docs_site_builds_strictly(tmp_path):
    """`mkdocs build --strict` succeeds: no broken link, nav entry or docstring warning."""
    mkdocs = Path(sys.executable).with_name("mkdocs")
    command = [str(mkdocs)] if mkdocs.exists() else [sys.executable, "-m", "mkdocs"]
    result = subprocess.run(
        [*command, "build", "--strict", "-d", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
