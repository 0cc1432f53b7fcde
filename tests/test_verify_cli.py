"""`invnet verify PATH`: exit code 0 pass, 1 fail, 2 unusable input (one line on stderr)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from registry import perturb

import invnet
from invnet.cli import main
from tests.test_verify import D, ill_conditioned_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def healthy(tmp_path_factory):
    rngs = nnx.Rngs(0)
    model = invnet.Sequential(
        invnet.LULinear(D, rngs=rngs),
        invnet.LeakyReLU(0.3),
        invnet.AffineCoupling(D, hidden=(8,), rngs=rngs),
    )
    return invnet.save(perturb(model), tmp_path_factory.mktemp("cli") / "healthy.invnet")


def test_healthy_model_passes_exit_0(healthy, tmp_path, capsys):
    data = tmp_path / "x.npy"
    np.save(data, np.asarray(jax.random.normal(jax.random.key(3), (40, D), jnp.float32)))
    assert main(["verify", str(healthy), "--data", str(data), "--samples", "16", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is True and report["n_samples"] == 16 and report["dtype"] == "float32"
    # the float32 model re-run in float64: drift of a few float32 ulps, exact float64 round trip
    assert report["float64"]["available"] and 0 < report["float64"]["forward_drift_rel"] < 1e-5
    assert report["float64"]["roundtrip_rel"] < 1e-12


@pytest.mark.extended  # subprocesses; CI runs it
def test_ill_conditioned_model_fails_exit_1(tmp_path, capsys):
    path = invnet.save(ill_conditioned_model(), tmp_path / "ill.invnet")
    assert main(["verify", str(path), "--json", "--samples", "32", "--no-float64"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is False and report["worst_layer"] == "model[2]"


def test_unusable_inputs_exit_2(healthy, tmp_path, capsys):
    corrupt = tmp_path / "corrupt.invnet"
    blob = bytearray(Path(healthy).read_bytes())
    blob[-5] ^= 0xFF
    corrupt.write_bytes(bytes(blob))
    wrong = tmp_path / "wrong.npy"
    np.save(wrong, np.zeros((5, D + 1), np.float32))
    cases = [
        ([str(tmp_path / "missing.invnet")], "not found"),
        ([str(corrupt)], "corrupted"),
        ([str(healthy), "--data", str(wrong)], "size 4"),
        ([str(healthy), "--data", str(tmp_path / "nope.npy")], "not found"),
        ([str(healthy), "--samples", "0"], "--samples"),
    ]
    for args, message in cases:
        assert main(["verify", *args]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("invnet verify: error:") and message in err
        assert len(err.splitlines()) == 1


def test_conditional_model_needs_cond(tmp_path, capsys):
    cinn = invnet.AffineCoupling(D, hidden=(4,), cond_dim=2, rngs=nnx.Rngs(0))
    path = invnet.save(cinn, tmp_path / "cinn.invnet")
    assert main(["verify", str(path)]) == 2
    assert "--cond" in capsys.readouterr().err


@pytest.mark.extended  # subprocesses; CI runs it
def test_subprocess_exit_codes(healthy, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "invnet.cli", "verify"]
    ok = subprocess.run(
        [*cmd, str(healthy), "--samples", "8", "--no-float64"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )
    assert ok.returncode == 0, ok.stderr
    assert "PASS" in ok.stdout


@pytest.mark.extended  # subprocesses; CI runs it
def test_csv_data_is_read(healthy, tmp_path, capsys):
    data = tmp_path / "x.csv"
    np.savetxt(data, np.asarray(jax.random.normal(jax.random.key(4), (12, D))), delimiter=",")
    assert main(["verify", str(healthy), "--data", str(data), "--json", "--no-float64"]) == 0
    assert json.loads(capsys.readouterr().out)["n_samples"] == 12
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b,c,d\n1,2,3,4\n")
    assert main(["verify", str(healthy), "--data", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "read as CSV" in err and "pickled" not in err
    other = tmp_path / "x.txt"
    other.write_text("1 2 3 4\n")
    assert main(["verify", str(healthy), "--data", str(other)]) == 2
    err = capsys.readouterr().err
    assert "not a .npy array" in err and "pickled" not in err


def test_json_errors_are_json_on_stdout(healthy, tmp_path, capsys):
    for args in ([str(tmp_path / "missing.invnet")], [str(healthy), "--data", "nope.npy"]):
        assert main(["verify", *args, "--json"]) == 2
        captured = capsys.readouterr()
        error = json.loads(captured.out)
        assert error["ok"] is False and error["exit_code"] == 2
        assert "not found" in error["error"] and "not found" in captured.err


def test_cond_for_an_unconditional_model_is_an_error(healthy, tmp_path, capsys):
    cond = tmp_path / "c.npy"
    np.save(cond, np.zeros((256, 2), np.float32))
    assert main(["verify", str(healthy), "--cond", str(cond)]) == 2
    assert "not conditional" in capsys.readouterr().err


@pytest.mark.extended  # subprocesses; CI runs it
def test_rank3_model_with_flat_csv_rows(tmp_path, capsys):
    model = invnet.Sequential(
        invnet.ActNorm(2, event_ndim=3),
        invnet.Reshape((4, 4, 2), (32,)),
        invnet.LULinear(32, rngs=nnx.Rngs(0)),
    )
    path = invnet.save(model, tmp_path / "image.invnet")
    data = tmp_path / "x.csv"
    np.savetxt(data, np.asarray(jax.random.normal(jax.random.key(5), (3, 32))), delimiter=",")
    for extra in ([], ["--data", str(data)]):
        args = ["verify", str(path), "--samples", "4", "--json", "--no-float64", *extra]
        assert main(args) == 0
        report = json.loads(capsys.readouterr().out)
        assert report["event_shape"] == [4, 4, 2] and report["output_event_shape"] == [32]


@pytest.mark.extended  # subprocesses; CI runs it
def test_closed_pipe_ends_quietly(healthy):
    """`invnet verify m.invnet | head`: the reader is gone before the report is written."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "invnet.cli", "verify", str(healthy), "--samples", "8"]
    proc = subprocess.Popen(
        [*cmd, "--no-float64", "--jacobian-samples", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        cwd=ROOT,
    )
    proc.stdout.close()  # like `head` exiting: every write to stdout now fails with EPIPE
    with proc.stderr:
        err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 0
    assert "Traceback" not in err and "BrokenPipeError" not in err
