"""The benchmark suite runs and writes JSON + a markdown table (tiny sizes)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _run_module():
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location("invnet_bench_run", BENCH / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_sections_run(tmp_path):
    run = _run_module()
    rc = run.main(["--tiny", "--only", "gd", "peers", "--no-plot", "--out", str(tmp_path)])
    assert rc == 0
    results = json.loads((tmp_path / "results.json").read_text())
    exact, descent = results["sections"]["gd"]
    assert exact["rel_err"] < 1e-4 and descent["rel_err"] > exact["rel_err"]
    assert results["env"]["jax"] and results["env"]["backend"]
    # peers are either measured or skipped with a reason, never silently absent
    assert results["sections"]["peers"] or "peers" in results["skipped"]
    assert "Exact inverse vs gradient-descent" in (tmp_path / "table.md").read_text()


@pytest.mark.slow
def test_whole_suite_tiny(tmp_path):
    run = _run_module()
    assert run.main(["--tiny", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    for name in ("lu", "models", "accuracy", "precision", "reversible"):
        assert results["sections"][name], name
    assert (tmp_path / "table.md").exists()
