"""Every example and `invnet demo` run in their quick modes (in-process, to share JAX)."""

from __future__ import annotations

import contextlib
import importlib.util
from pathlib import Path

import jax
import numpy as np
import pytest

from invnet.cli import main as cli_main

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_example_is_tested():
    scripts = sorted(p.stem for p in EXAMPLES.glob("[0-9][0-9]_*.py"))
    assert scripts == sorted(NAMES)


NAMES = [
    "01_reverse_regression",
    "02_digits",
    "03_exact_vs_gradient_descent",
    "04_saliency_and_hidden_units",
    "05_two_moons_density",
    "06_glow_digits",
    "07_conditional_digits",
    "08_invertible_classifier",
    "09_glow_patches",
    "10_tarflow_digits",
    "11_variational",
    "12_inverse_kinematics",
]


def _run(name, tmp_path, promotion=None):
    """Run an example's quick mode; ``promotion="standard"`` for an example whose own code
    is not clean under the suite's strict dtype promotion (see `USER_CODE_PROMOTES`)."""
    scope = jax.numpy_dtype_promotion(promotion) if promotion else contextlib.nullcontext()
    with scope:
        results = _load(name).main(["--quick", "--out", str(tmp_path)])
    assert (tmp_path / f"{name}.png").stat().st_size > 1000
    return results


# Examples 01 and 03 train with optax directly (optax's adam raises its decay rate, a weak
# float, to an int32 step count) and, with x64 on in the suite, mix float64 arrays with
# float32 parameters in their own code (01's nnx.Linear, 03's parameter noise): the user's
# code, not invnet's, so they run under JAX's standard promotion. The invnet calls they
# make are covered under strict by the rest of the suite.
USER_CODE_PROMOTES = "standard"


@pytest.mark.extended  # an example's quick run: 10-50 s
def test_01_reverse_regression(tmp_path):
    r = _run("01_reverse_regression", tmp_path, USER_CODE_PROMOTES)
    assert abs(r["x_gd"] - r["x_exact"]) < 2.0  # gradient descent settles near the exact x
    assert r["inn_round_trip"] < 1e-4  # float32 round trip of the invnet model
    assert r["relu_error"] > 10 * r["inn_round_trip"]


@pytest.mark.extended  # an example's quick run: 10-50 s
def test_02_digits_conditional_samples_are_their_class(tmp_path):
    r = _run("02_digits", tmp_path)
    # quick mode (4 blocks, 30 epochs): observed 80% of cINN samples classified as their
    # condition by an independent RBF SVM (CPU, float32); the full run gives 98%.
    assert r["cinn_judge_accuracy"] >= 0.6
    assert r["pinv_own_accuracy"] == 1.0  # pinv satisfies its own classifier by construction


@pytest.mark.extended  # an example's quick run: 10-50 s
def test_03_exact_vs_gradient_descent(tmp_path):
    r = _run("03_exact_vs_gradient_descent", tmp_path, USER_CODE_PROMOTES)
    assert r["exact_error"] < 1e-5
    assert min(r["gd_errors"].values()) > 100 * r["exact_error"]


@pytest.mark.extended  # an example's quick run: 10-50 s
def test_04_saliency_and_hidden_units(tmp_path):
    r = _run("04_saliency_and_hidden_units", tmp_path)
    assert r["unit_after"] < 1e-5 and r["other_units_change"] < 1e-5


@pytest.mark.extended  # an example's quick run: 10-50 s
def test_05_two_moons_density(tmp_path):
    r = _run("05_two_moons_density", tmp_path)
    assert r["best_val_nll"] < 2.5 and 0.8 < r["mass_in_view"] <= 1.0 + 1e-3


@pytest.mark.extended  # an example's quick run: 10-50 s
@pytest.mark.parametrize("argv", [["demo", "--quick", "--no-progress"]])
def test_demo_runs(tmp_path, argv, capsys):
    assert cli_main([*argv, "--out", str(tmp_path)]) == 0
    assert (tmp_path / "demo.png").stat().st_size > 1000
    assert "round trip OK" in capsys.readouterr().out


@pytest.mark.extended  # an example's quick run: 10-50 s
def test_06_glow_digits_bits_per_dim(tmp_path):
    r = _run("06_glow_digits", tmp_path)
    # quick mode (4 epochs): both flows already beat the uniform 17-level baseline (4.09)
    assert np.isfinite(r["glow_bpd"]) and np.isfinite(r["flat_bpd"])
    assert r["glow_bpd"] < r["uniform_bpd"] and r["flat_bpd"] < r["uniform_bpd"]


@pytest.mark.extended  # an example's quick run: 10-50 s
def test_07_conditional_samples_are_their_class(tmp_path):
    r = _run("07_conditional_digits", tmp_path)
    # quick mode (15 epochs, adam 3e-3) passes this under the suite's x64 (6 epochs gave 17%);
    # the full run: 100% of samples labelled as their condition by an RBF SVM; chance is 10%
    assert r["sample_accuracy"] >= 0.2


@pytest.mark.extended  # an example's quick run: 10-50 s
def test_08_invertible_classifier(tmp_path):
    r = _run("08_invertible_classifier", tmp_path)
    # quick mode (25 epochs, CPU, float32 model): observed 98.0% held-out accuracy, round trip
    # 3-4e-6, self-consistency 100%, the SVM judge agrees on 86.5% (under the suite's x64) /
    # 96.5% (plain) of the class-k inversions (chance 10%; 10 epochs gave 49% under x64)
    assert r["test_accuracy"] >= 0.9
    assert r["reconstruction_error"] < 1e-4
    assert r["self_consistency"] >= 0.95
    assert r["judge_agreement"] >= 0.5


@pytest.mark.extended  # an example's quick run: 10-50 s
def test_09_glow_patches_bits_per_dim(tmp_path):
    r = _run("09_glow_patches", tmp_path)
    # quick mode (3 epochs on 1000 patches): observed glow 7.30, flat 7.08 bits/dim (CPU,
    # float32); both already under the uniform 256-level baseline (8 bits/dim)
    assert np.isfinite(r["glow_bpd"]) and np.isfinite(r["flat_bpd"])
    assert r["glow_bpd"] < r["uniform_bpd"] and r["flat_bpd"] < r["uniform_bpd"]
    assert 0 < r["std"] < 1 and 0 < r["mean"] < 1


@pytest.mark.extended  # an example's quick run: 10-50 s
def test_10_tarflow_digits(tmp_path):
    r = _run("10_tarflow_digits", tmp_path)
    # quick mode (4 epochs, tiny flows): both under the uniform 17-level baseline (4.09);
    # the jacobi sampler agrees with the sequential one (float32 rounding)
    assert r["tarflow_bpd"] < r["uniform_bpd"] and r["glow_bpd"] < r["uniform_bpd"]
    assert r["jacobi_vs_sequential"] < 1e-3


@pytest.mark.extended  # an example's quick run: 10-50 s
def test_11_variational_invnet_and_flowjax(tmp_path):
    # flowjax's own code is not strict-promotion clean: the example runs under standard
    r = _run("11_variational", tmp_path, USER_CODE_PROMOTES)
    # quick mode (2 spline layers, 60 steps; observed under x64 on a loaded 2-core CPU: invnet
    # ESS 0.022 / 0.032 and log Z off by -0.84 / -0.22 nats on the ring / the 10-D mixture;
    # flowjax ESS 0.022 / 0.058; with the decaying default schedule, float32: invnet ESS
    # 0.016 / 0.026, log Z off by +0.28 / -0.23): far from converged, but the weights are finite
    # and invnet's log Z estimate is within 1.5 nats of the true one
    # (flowjax, the optional peer, is compared where it is installed: the ".[peers]" extra)
    for key, v in r.items():
        assert 0.0 < v["ess"] <= 1.0 and np.isfinite(v["log_z"]), key
    for target in ("ring (2-D)", "mixture (10-D)"):
        assert abs(r[f"{target}|invnet"]["log_z_error"]) < 1.5


@pytest.mark.extended  # an example's quick run: 10-50 s
def test_12_inverse_kinematics_posterior_beats_the_prior(tmp_path):
    r = _run("12_inverse_kinematics", tmp_path)
    # quick mode (3 blocks, 15 epochs on 4000 poses; observed Err_resim 0.18 affine, 0.15
    # spline against 3.34 for poses from the prior): the posterior samples reach the target
    for kind in ("affine", "spline"):
        assert np.isfinite(r[kind]["err_post"])
        assert r[kind]["err_resim"] < 0.5 * r["prior_resim"]
