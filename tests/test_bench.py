"""`invnet.bench` and `invnet bench PATH`: the report's schema and the CLI's errors.

Timing values are never asserted (only that they are positive and finite)."""

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flax import nnx
from registry import perturb

import invnet
from invnet import benchmarking
from invnet.benchmarking import OPS, SCHEMA, BenchReport
from invnet.cli import main

ROOT = Path(__file__).resolve().parents[1]
D, C = 4, 2
FAST = ["--batch-size", "8", "--repeats", "2", "--warmup", "0", "--min-time", "0"]


@pytest.fixture(scope="module")
def flow_path(tmp_path_factory):
    rngs = nnx.Rngs(0)
    model = invnet.Flow(invnet.Sequential(invnet.LULinear(D, rngs=rngs), invnet.LeakyReLU(0.5)))
    return invnet.save(perturb(model), tmp_path_factory.mktemp("bench") / "flow.invnet")


@pytest.fixture(scope="module")
def cond_path(tmp_path_factory):
    model = invnet.AffineCoupling(D, cond_dim=C, hidden=(8,), rngs=nnx.Rngs(1))
    return invnet.save(perturb(model), tmp_path_factory.mktemp("bench") / "cond.invnet")


def check_schema(report: dict, modes, ops) -> None:
    assert report["schema"] == SCHEMA
    model = report["model"]
    assert set(model) == {"type", "params", "dtype", "event_shape", "cond_dim", "flow"}
    assert isinstance(model["params"], int) and model["params"] > 0
    assert model["dtype"] in ("float32", "float64") and model["event_shape"] == [D]
    assert set(report["device"]) == {"platform", "kind", "name"}
    assert report["device"]["platform"] == "cpu"
    assert isinstance(report["batch_size"], int) and set(report["versions"]) == {"jax", "invnet"}
    assert report["peak_memory_bytes"] is None or report["peak_memory_bytes"] > 0
    assert report["skipped"] == {}
    rows = report["results"]
    assert {(r["op"], r["mode"]) for r in rows} == {(o, m) for o in ops for m in modes}
    for r in rows:
        assert set(r) == {
            "op", "mode", "time_s", "first_call_s", "samples_per_s", "xla_temp_bytes",
            "q1_s", "q3_s", "min_s", "max_s",
        }  # fmt: skip
        for key in ("time_s", "first_call_s", "samples_per_s", "q1_s", "q3_s", "min_s"):
            assert isinstance(r[key], float) and r[key] > 0 and math.isfinite(r[key]), r
        assert r["min_s"] <= r["q1_s"] <= r["time_s"] <= r["q3_s"] <= r["max_s"], r
        assert r["xla_temp_bytes"] is None or isinstance(r["xla_temp_bytes"], int)
    assert set(report["ranking"]) == set(ops)
    for order in report["ranking"].values():  # every mode once, joined by < or ~
        assert sorted(re.split(r" [<~] ", order.split(";")[0])) == sorted(modes), order
    assert set(report["round_trip"]) == set(modes)
    assert all(0 <= e < 1e-5 for e in report["round_trip"].values()), report["round_trip"]
    if "compiled" in modes:
        assert report["compile_build_s"] > 0


def test_bench_json_schema(flow_path, capsys):
    argv = ["bench", str(flow_path), "--json", "--modes", "jit", "compiled", *FAST]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    check_schema(report, ("jit", "compiled"), OPS)  # a Flow: sampling too
    assert report["model"]["flow"] is True and report["batch_size"] == 8
    assert BenchReport.from_dict(report).to_dict() == report


def test_table_and_conditional_model(cond_path, tmp_path, capsys):
    argv = ["bench", str(cond_path), "--json", "--cond", str(C), "--modes", "jit", *FAST]
    assert main(argv) == 0
    check_schema(json.loads(capsys.readouterr().out), ("jit",), OPS[:3])
    conds = tmp_path / "c.npy"
    np.save(conds, np.ones((20, C), np.float32))
    assert main(["bench", str(cond_path), "--cond", str(conds), "--modes", "jit", *FAST]) == 0
    out = capsys.readouterr().out
    assert "samples/s" in out and "round trip" in out and "peak device memory" in out
    assert re.search(r"^inverse\s+jit\s", out, re.M) and "cond_dim 2" in out


def test_eager_and_call_modes():
    report = invnet.bench(
        invnet.LeakyReLU(0.5),
        shape=(D,),
        batch_size=4,
        repeats=1,
        min_time=0,
        warmup=0,
        modes=["eager", "call"],
    )
    assert {(r["op"], r["mode"]) for r in report.results} == {
        (o, m) for o in OPS[:3] for m in ("eager", "call")
    }
    assert report.round_trip["eager"] < 1e-6 and report.skipped == {}
    assert report.time("inverse", "eager") > 0 and report.time("sample", "eager") is None


def test_saved_glow_needs_no_shape(tmp_path, capsys):
    """A saved Glow knows its image shape (its Flow's event_shape): no --shape needed."""
    glow = invnet.glow((4, 4, 1), levels=1, steps=1, hidden=2, rngs=nnx.Rngs(0))
    path = invnet.save(glow, tmp_path / "glow.invnet")
    assert main(["bench", str(path), "--json", "--modes", "jit", *FAST]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model"]["event_shape"] == [4, 4, 1] and report["skipped"] == {}


def test_elementwise_model_says_how_to_give_the_shape():
    with pytest.raises(ValueError, match=r"no fixed input size.*--shape 8"):
        invnet.bench(invnet.LeakyReLU(0.5))


def test_cond_file_rows_are_cut_or_repeated(cond_path, tmp_path, capsys):
    few = tmp_path / "few.npy"
    np.save(few, np.arange(3 * C, dtype=np.float32).reshape(3, C))
    assert main(["bench", str(cond_path), "--cond", str(few), "--modes", "jit", *FAST]) == 0
    capsys.readouterr()
    model = invnet.load(cond_path)
    cond = benchmarking._condition(model, np.load(few), 8, np.float32, None)
    np.testing.assert_array_equal(cond, np.load(few)[[0, 1, 2, 0, 1, 2, 0, 1]])
    empty = tmp_path / "empty.npy"
    np.save(empty, np.zeros((0, C), np.float32))
    assert main(["bench", str(cond_path), "--cond", str(empty), *FAST]) == 2
    assert "N >= 1" in capsys.readouterr().err


def test_modes_are_timed_interleaved_round_by_round():
    """Each round samples every op in every mode once, starting one mode later each round,
    so a slow stretch of the machine is not charged to one mode."""
    seen = []
    timed = {
        (op, mode): (lambda op=op, mode=mode: seen.append((op, mode)), 1)
        for op in ("forward", "inverse")
        for mode in ("jit", "compiled", "call")
    }
    samples = benchmarking._interleaved(timed, ("jit", "compiled", "call"), repeats=3)
    assert all(len(v) == 3 for v in samples.values())
    modes = [mode for op, mode in seen]
    assert modes[:6] == ["jit", "compiled", "call"] * 2  # round 1: forward, then inverse
    assert modes[6:9] == ["compiled", "call", "jit"] and modes[12:15] == ["call", "jit", "compiled"]


def test_ranking_only_where_the_spreads_are_apart():
    def row(mode, q1, median, q3):
        return {"mode": mode, "time_s": median, "q1_s": q1, "q3_s": q3}

    apart = [row("jit", 2.0, 2.1, 2.2), row("compiled", 1.0, 1.1, 1.2), row("eager", 9, 10, 11)]
    assert benchmarking._ranking(apart) == "compiled < jit < eager"
    overlap = [row("jit", 1.0, 1.3, 2.0), row("compiled", 0.9, 1.2, 1.5), row("eager", 9, 10, 11)]
    assert benchmarking._ranking(overlap) == ("compiled ~ jit < eager; not ranked: spread too wide")


@pytest.mark.parametrize(
    ("which", "extra", "message"),
    [
        ("flow", ["--cond", "2"], "unconditional"),
        ("cond", [], "conditional (cond_dim=2)"),
        ("cond", ["--cond", "3"], "cond size 3"),
        ("cond", ["--cond", "missing.npy"], "not found"),
        ("flow", ["--shape", "5"], "does not end in the model's event shape (4)"),
        ("flow", ["--device", "gpu"], "no gpu device"),
        ("missing", [], "not found"),
    ],
)
def test_bad_input_exit_2(flow_path, cond_path, tmp_path, capsys, which, extra, message):
    if "--device" in extra and _has_gpu():
        pytest.skip("this machine has a GPU")
    path = {"flow": flow_path, "cond": cond_path, "missing": tmp_path / "no.invnet"}[which]
    assert main(["bench", str(path), *extra, *FAST]) == 2
    err = capsys.readouterr().err
    assert err.startswith("invnet bench: error:") and message in err, err


def _has_gpu() -> bool:
    import jax

    try:
        return bool(jax.devices("gpu"))
    except RuntimeError:
        return False


def test_python_api_errors():
    with pytest.raises(ValueError, match="modes"):
        invnet.bench(invnet.LeakyReLU(0.5), shape=(D,), modes=["fast"])
    with pytest.raises(ValueError, match="batch_size"):
        invnet.bench(invnet.LeakyReLU(0.5), shape=(D,), batch_size=0)


@pytest.mark.slow  # a fresh process compiles 8 functions: 15-40 s on 2 shared cores
def test_docs_section_runs():
    page = ROOT / "docs" / "guide" / "compiled-inference-and-speed.md"
    section = page.read_text().split("## Benchmark your own model\n", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    result = subprocess.run(
        [sys.executable, "-W", "error", "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
