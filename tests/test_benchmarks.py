"""The benchmark scripts run and write JSON + a markdown table (tiny sizes)."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(autouse=True)
def _standard_promotion():
    """The benchmark scripts are user-level code that trains with optax directly (optax's
    adam raises a weak float to an int32 step count, which the suite's strict dtype
    promotion refuses): they run under JAX's standard promotion, as users run them."""
    with jax.numpy_dtype_promotion("standard"):
        yield


def _load(name):
    """A benchmark script as a module (``benchmarks/`` on the path for its own imports)."""
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(f"invnet_bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run_module():
    return _load("run")


@pytest.mark.extended  # ~9 s
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


def _normflows_importable() -> bool:
    try:
        import normflows  # noqa: F401
        import torch  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "skip"
        return False
    return True


@pytest.mark.extended  # ~35 s
def test_images_quick(tmp_path, capsys):
    images = _load("images")
    assert images.main(["--quick", "--no-plot", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
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
    # the normflows (PyTorch) peer: measured where it imports, else skipped with a reason
    # and the CPU-torch install line, in the output, the JSON and the table
    peer, rows = results["peers"]["normflows"], results["train_peers"]
    (target,) = [t for t in results["targets"] if "normflows" in t["target"]]
    assert target["cmp"] == ">=" and target["bound"] == images.TARGET_TRAIN_SPEEDUP
    if _normflows_importable():
        assert peer["skipped"] is None and rows
        assert {r["torch_threads"] for r in rows} == set(peer["torch_threads"])
        for r in rows:
            assert r["normflows_images_per_s"] > 0 and r["normflows_loss_decreased"], r
            assert r["speedup"] == pytest.approx(
                r["invnet_images_per_s"] / r["normflows_images_per_s"]
            )
        # the target is read at torch's defaults (the peer as its users run it)
        default = [r for r in rows if r["torch_setting"] == "torch default"]
        assert [r["torch_threads"] for r in default] == [peer["torch_default_threads"]]
        assert target["value"] == default[0]["speedup"]
        assert "## Glow training step: invnet vs normflows" in text
    else:
        install = "pip install torch==2.13.0 normflows"
        assert peer["skipped"].startswith("not importable") and rows == []
        assert "normflows peer skipped" in printed and install in printed
        assert "normflows peer skipped" in text and install in text
        assert "skipped" in target["target"] and target["value"] is None
        assert target["met"] is None


def test_normflows_peer_runs_at_torch_defaults(monkeypatch):
    """Loading the peer sets no OpenMP variable (OMP_WAIT_POLICY=PASSIVE, set by an earlier
    version, slowed normflows' two-thread step 1.8x) and changes no torch setting."""
    images = _load("images")
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    peer, info = images.load_normflows()
    assert "OMP_WAIT_POLICY" not in os.environ
    if peer is not None:
        assert info["omp_wait_policy"] is None
        assert info["torch_threads"][0] == info["torch_default_threads"]
        assert info["torch_default_threads"] == peer[0].get_num_threads()


def test_images_normflows_glow_is_invnet_glow():
    """normflows' Glow as built for the peer has invnet.glow's architecture: the same latent
    size and log-density shape, and parameter counts that differ only by invnet's 1x1-conv
    bias (C per step). Runs where normflows and torch import (the peers-torch extra)."""
    if not _normflows_importable():
        pytest.skip("normflows / torch not installed (pip install torch==2.13.0 normflows)")
    import jax
    from flax import nnx

    import invnet

    images = _load("images")
    peer, info = images.load_normflows()
    torch, _ = peer
    for shape, levels, steps, hidden in (((8, 8, 1), 2, 1, 8), ((16, 16, 3), 3, 2, 4)):
        flow = invnet.glow(shape, levels=levels, steps=steps, hidden=hidden, rngs=nnx.Rngs(0))
        n_invnet = sum(p.size for p in jax.tree.leaves(nnx.state(flow, nnx.Param)))
        model = images._nf_glow(torch, peer[1], shape, levels, steps, hidden)
        n_nf = sum(p.numel() for p in model.parameters())
        channels = [shape[2] * 2 ** (level + 1) for level in range(1, levels + 1)]
        assert n_invnet - n_nf == steps * sum(channels), (shape, n_invnet, n_nf)
        x = torch.rand(5, shape[2], shape[0], shape[1])
        with torch.no_grad():
            z, _ = model.inverse_and_log_det(x)
            assert sum(zi[0].numel() for zi in z) == flow.latent_shape()[0]
            assert model.log_prob(x, None).shape == (5,)
    spec = dict(shape=(8, 8, 1), levels=2, steps=1, hidden=8)
    x = np.random.default_rng(0).random((8, 8, 8, 1), np.float32)
    _, losses, _, _ = images._nf_train(peer, spec, x, x, 3, info["torch_threads"][-1])
    assert losses[-1] < losses[0]


@pytest.mark.extended  # ~15 s
def test_quality_smoke(tmp_path):
    """The model-quality protocol end to end on one tiny set: every model trains, gets a
    finite held-out NLL and a rank, and the JSON and table are written."""
    quality = _load("quality")
    out = tmp_path / "quality"
    rows = quality.main(["--smoke", "--out", str(out)])
    models = {r["model"] for r in rows}
    assert "invnet spline" in models  # flowjax's is there when flowjax imports
    assert all(np.isfinite(r["nll"]) and r["epochs"] >= 1 for r in rows)
    saved = json.loads(out.with_suffix(".json").read_text())
    assert len(saved["rows"]) == len(rows) and saved["env"]["jax"]
    assert "mean rank" in out.with_suffix(".md").read_text()
    ranks = quality.ranks(rows, sorted(models), ["moons2"])
    assert sorted(r["moons2"] for r in ranks.values()) == list(range(1, len(models) + 1))


@pytest.mark.extended  # ~20 s
def test_ik_noise_and_variational_peers_write_their_rows(tmp_path):
    """Both scripts end to end at a tiny budget: a header with the environment, then one
    row per fit with finite figures."""

    def rows(name):
        path = tmp_path / f"{name}_{jax.default_backend()}.jsonl"
        lines = [json.loads(line) for line in path.read_text().splitlines()]
        assert lines[0]["env"]["jax"]
        return [line for line in lines if "env" not in line]  # one header per run

    tiny = ["--n-train", "1000", "--epochs", "1", "--targets", "2", "--results", str(tmp_path)]
    _load("ik_noise").main(["--kinds", "affine", "--noise", "0", "0.01", *tiny])
    ik = rows("ik_noise")
    assert [r["noise"] for r in ik] == [0.0, 0.01]
    assert all(np.isfinite(r["err_post"]) and 0 < r["err_resim"] < np.inf for r in ik)
    # the other two places for the noise: on x, and its std as a condition (a row per std)
    _load("ik_noise").main(["--kinds", "affine", "--noise", "0.01", "--on", "x", *tiny])
    _load("ik_noise").main(["--kinds", "spline", "--noise", "0.02", "--on", "soft",
                            "--eval-noise", "0", "0.01", *tiny])  # fmt: skip
    x_row, *soft = rows("ik_noise")[2:]
    assert x_row["on"] == "x" and [r["eval_noise"] for r in soft] == [0.0, 0.01]
    assert all(np.isfinite(r["err_post"]) and 0 < r["err_resim"] < np.inf for r in soft)
    _load("ik_noise").main(["--floor", "--noise", "0.006", "--targets", "2", "--results",
                            str(tmp_path)])  # fmt: skip
    (fl,) = rows("ik_noise")[5:]
    assert fl["floor"] and fl["worst"] >= fl["err_post"] and np.isfinite(fl["err_post"])
    _load("variational_peers").main(["--libraries", "invnet", "--targets", "twomoons2",
                                     "--seeds", "0", "--steps", "5", "--results",
                                     str(tmp_path)])  # fmt: skip
    (vi,) = rows("variational_peers")
    assert vi["library"] == "invnet" and 0 < vi["ess"] <= 1 and np.isfinite(vi["log_z_error"])


def test_quality_ranks_ties_and_nan():
    quality = _load("quality")
    rows = [{"set": "s", "model": m, "nll": v} for m, v in
            (("a", 1.0), ("b", 1.0), ("c", float("nan")), ("d", 0.5))]  # fmt: skip
    assert quality.ranks(rows, ["a", "b", "c", "d"], ["s"]) == {
        "a": {"s": 2.5}, "b": {"s": 2.5}, "c": {"s": 4.0}, "d": {"s": 1.0}}  # fmt: skip
