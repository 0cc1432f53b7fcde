"""The benchmark scripts run and write JSON + a markdown table (tiny sizes)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name):
    """A benchmark script as a module (``benchmarks/`` on the path for its own imports)."""
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(f"invnet_bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run_module():
    return _load("run")


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


def test_images_quick(tmp_path):
    images = _load("images")
    assert images.main(["--quick", "--no-plot", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("images_*.json")
    results = json.loads(path.read_text())
    assert results["env"]["jax"] and results["env"]["mode"] == "quick"
    methods = {"jit", "compiled", "compiled y-only"}
    for section in ("conv1x1", "glow"):
        rows = results[section]
        assert {r["method"] for r in rows} == methods, section
        for r in rows:
            assert r["forward_ms"] > 0 and r["inverse_ms"] > 0, r
            assert r["inverse/forward"] == pytest.approx(r["inverse_ms"] / r["forward_ms"])
            assert r["roundtrip_rel_err"] < 1e-4, r
            assert r["forward_vs_jit_rel_diff"] < 1e-4, r
            if r["method"] != "compiled y-only":  # the y-only calls have no log-det
                assert r["log_det_ms"] > 0 and r["log_det_err"] < 1e-4, r
    for r in results["train"]:
        assert r["images_per_s"] > 0 and r["loss_decreased"], r
    memory = results["memory"]
    assert [r["depth"] for r in memory] == results["env"]["sizes"]["mem_depths"]
    for r in memory:
        assert r["ordinary_temp_bytes"] > 0 and r["reversible_temp_bytes"] > 0
        assert r["reversible_grad_rel_diff"] < 1e-3, r
    assert {t["target"].split(" ")[0] for t in results["targets"]} >= {"compiled", "reversible"}
    text = path.with_suffix(".md").read_text()
    assert "## Conv1x1" in text and "## Reversible vs ordinary" in text
    assert "normflows" in text
