"""invnet.verify: passes healthy models of every layer type, fails (naming the layer) on an
ill-conditioned one, is not fooled by a wrong inverse, reports non-finite values."""

import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from registry import perturb

import invnet
from invnet.core import Bijector

D = 4
ROOT = Path(__file__).resolve().parents[1]


def ill_conditioned_model(condition=1e6):
    rng = np.random.default_rng(0)
    q1, _ = np.linalg.qr(rng.normal(size=(D, D)))
    q2, _ = np.linalg.qr(rng.normal(size=(D, D)))
    weight = q1 @ np.diag(np.logspace(0, -np.log10(condition), D)) @ q2.T
    rngs = nnx.Rngs(0)
    coupling = perturb(invnet.AffineCoupling(D, hidden=(8,), rngs=rngs))
    return invnet.Sequential(
        invnet.LULinear(D, rngs=rngs),
        invnet.LeakyReLU(0.5),
        invnet.LULinear.from_matrix(
            weight, rng.normal(size=D), param_dtype=jnp.float32, max_condition=1e9
        ),
        coupling,
    )


def test_every_layer_type_passes_with_nested_names():
    rngs = nnx.Rngs(0)
    model = invnet.Sequential(
        invnet.ActNorm(D),
        invnet.LULinear(D, rngs=rngs),
        invnet.LeakyReLU(0.3),
        invnet.AffineCoupling(D, hidden=(8,), cond_dim=2, rngs=rngs),
        invnet.Permute(D, rngs=rngs),
        invnet.AdditiveCoupling(D, hidden=(8,), rngs=rngs),
        invnet.Sequential(invnet.LULinear(D, rngs=rngs), invnet.Inverse(invnet.LeakyReLU(0.5))),
        invnet.Inverse(
            invnet.Sequential(
                invnet.AffineCoupling(D, hidden=(8,), rngs=rngs), invnet.Permute(D, mode="reverse")
            )
        ),
    )
    perturb(model)
    x = jax.random.normal(jax.random.key(0), (32, D), jnp.float32)
    cond = jax.random.normal(jax.random.key(1), (32, 2), jnp.float32)
    invnet.data_init(model, x, cond=cond)
    x = x.at[5, 2].set(jnp.nan)  # one unusable sample: counted and skipped, not a failure
    report = invnet.verify(model, x, cond=cond, check_float64=False)

    assert report.ok, report.table()
    kinds = {layer.kind for layer in report.layers}
    assert {"ActNorm", "LULinear", "LeakyReLU", "AffineCoupling", "Permute"} <= kinds
    assert {"AdditiveCoupling", "Inverse(LeakyReLU)", "Inverse(AffineCoupling)"} <= kinds
    names = [layer.name for layer in report.layers]
    # Inverse(Sequential(a, b)) runs b.inverse first, then a.inverse
    assert names[-4:] == [
        "model[6][0]",
        "model[6][1].bijector",
        "model[7].bijector[1]",
        "model[7].bijector[0]",
    ]
    assert all(layer.ok and layer.max_rel <= layer.tol for layer in report.layers)
    assert 0 < report.forward.max_rel <= report.tol and 0 < report.inverse.max_rel <= report.tol
    assert report.n_finite == 31 and report.nonfinite == {"inputs": 1, "outputs": 0}
    assert report.log_det["n"] == 8 and report.log_det["ok"]
    assert 0 < report.log_det["forward_max_err"] < 1e-4
    assert not report.float64["available"] and "check_float64" in report.float64["reason"]
    eps = float(jnp.finfo(jnp.float32).eps)
    bound = float(np.prod([layer.bound for layer in report.layers]))
    assert report.condition_bound == pytest.approx(bound)
    assert report.tol == pytest.approx(min(10 * D * eps * bound, eps**0.5))
    table = report.table()
    assert "PASS" in table and "model[7].bijector[0]" in table and "tolerance" in table
    data = json.loads(report.to_json())
    assert data["ok"] is True and len(data["layers"]) == len(report.layers)


def test_ill_conditioned_lulinear_fails_and_is_named():
    x = jax.random.normal(jax.random.key(0), (64, D), jnp.float32)
    report = invnet.verify(ill_conditioned_model(), x, check_float64=False)
    assert not report.ok
    assert report.failing_layers() == ["model[2]"]
    assert report.worst_layer().name == "model[2]"
    assert report.layers[2].bound == pytest.approx(1e6, rel=0.5)
    assert report.forward.max_rel > report.tol
    assert any("model[2]" in msg and "cond(W)" in msg for msg in report.failures)
    assert "FAIL" in report.table()
    data = json.loads(report.to_json())
    assert data["ok"] is False and data["worst_layer"] == "model[2]"


def test_user_tolerance_overrides_the_derived_one():
    x = jax.random.normal(jax.random.key(0), (64, D), jnp.float32)
    ill = ill_conditioned_model()[2:3]  # just the LULinear with cond(W) = 1e6
    assert not invnet.verify(ill, x, check_float64=False, jacobian_samples=0).ok
    report = invnet.verify(ill, x, tol=0.5, check_float64=False, jacobian_samples=0)
    assert report.ok and report.tol == 0.5 and "user" in report.tol_rule
    assert all(layer.tol == 0.5 for layer in report.layers)


class _CachedLookingScale(Bijector):
    """y = 2x with an inverse that is off by 1%: a cache would hide it, verify must not."""

    dim = D

    def _forward(self, x, cond):
        return 2.0 * x, jnp.full(x.shape[:-1], D * jnp.log(2.0), x.dtype)

    def _inverse(self, y, cond):
        return 0.505 * y, jnp.full(y.shape[:-1], -D * jnp.log(2.0), y.dtype)


class _WrongLogDet(Bijector):
    dim = D

    def _forward(self, x, cond):
        return 2.0 * x, jnp.zeros(x.shape[:-1], x.dtype)  # should be D log 2

    def _inverse(self, y, cond):
        return 0.5 * y, jnp.zeros(y.shape[:-1], y.dtype)


def test_wrong_inverse_and_wrong_log_det_are_caught():
    x = jax.random.normal(jax.random.key(0), (16, D), jnp.float32)
    model = invnet.Sequential(invnet.LeakyReLU(0.5), _CachedLookingScale(), _WrongLogDet())
    report = invnet.verify(model, x, check_float64=False)
    assert not report.ok
    assert report.failing_layers() == ["model[1]"]
    assert report.layers[1].bound_rule == "unknown, assumed 1"
    assert not report.log_det["ok"]
    assert report.log_det["forward_max_err"] == pytest.approx(D * np.log(2), rel=1e-3)


def test_nonfinite_outputs_are_counted_not_raised():
    norm = invnet.ActNorm(2)
    norm.log_scale[...] = jnp.asarray([100.0, 0.0], jnp.float32)  # exp(100) overflows float32
    norm.initialized[...] = jnp.asarray(True)
    x = jnp.asarray([[1.0, 2.0], [jnp.inf, 0.0], [0.5, 0.5]], jnp.float32)
    report = invnet.verify(invnet.Sequential(norm), x, jacobian_samples=1, check_float64=False)
    assert not report.ok
    assert report.nonfinite == {"inputs": 1, "outputs": 2}
    assert "non-finite" in report.table() and "NaN/inf" in " ".join(report.failures)


def test_bad_inputs_raise_clear_errors():
    model = invnet.Sequential(invnet.LULinear(D, rngs=nnx.Rngs(0)))
    with pytest.raises(TypeError, match="floating"):
        invnet.verify(model, jnp.ones((3, D), jnp.int32))
    with pytest.raises(ValueError, match="size 4"):
        invnet.verify(model, jnp.ones((3, D + 1), jnp.float32))
    cinn = invnet.AffineCoupling(D, hidden=(4,), cond_dim=2, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="conditional"):
        invnet.verify(cinn, jnp.ones((3, D), jnp.float32))


@pytest.mark.extended  # slow; CI runs it
def test_docs_verification_example_runs():
    """The first example of the docs' verification page runs as a user would see it: float32
    (x64 off)."""
    page = (ROOT / "docs" / "guide" / "verification.md").read_text()
    code = re.search(r"```python\n(.*?)```", page, re.S).group(1)
    namespace: dict = {}
    with jax.enable_x64(False):
        exec(compile(code, "docs/guide/verification.md", "exec"), namespace)
    report = namespace["report"]
    assert report.ok and report.dtype == "float32"
    assert namespace["grad"].shape == (128, 4)
    assert isinstance(namespace["net"], invnet.Sequential)


@pytest.mark.extended  # slow; CI runs it
def test_reversible_model_gives_one_row_per_layer_with_its_bound():
    x = jax.random.normal(jax.random.key(0), (16, D), jnp.float32)
    model = ill_conditioned_model(condition=1e3)
    report = invnet.verify(invnet.reversible(model), x, check_float64=False)
    assert [layer.name for layer in report.layers] == [f"model.model[{k}]" for k in range(4)]
    assert [layer.kind for layer in report.layers] == [
        "LULinear",
        "LeakyReLU",
        "LULinear",
        "AffineCoupling",
    ]
    assert [layer.bound_rule for layer in report.layers] == [
        layer.layer.error_bound()[1] for layer in invnet.walk.layers(model)
    ]
    assert report.layers[2].bound == pytest.approx(1e3, rel=0.5)
    assert report.ok, report.table()


def test_rank3_event_model():
    """Images (N, H, W, C): per-sample errors over all event axes, a 32x32 Jacobian."""
    model = invnet.Sequential(invnet.ActNorm(2, event_ndim=3), invnet.LeakyReLU(0.5))
    model[0].log_scale[...] = jnp.asarray([0.3, -0.2], jnp.float32)
    model[0].initialized[...] = jnp.asarray(True)
    x = jax.random.normal(jax.random.key(0), (6, 4, 4, 2), jnp.float32)
    report = invnet.verify(model, x, jacobian_samples=2)
    assert report.ok, report.table()
    assert report.dim == 32 and report.event_shape == (4, 4, 2)
    assert report.output_event_shape == (4, 4, 2) and report.n_samples == 6
    assert report.log_det["n"] == 2 and 0 <= report.log_det["forward_max_err"] < 1e-4
    assert report.float64["available"]
    assert "event (4, 4, 2)" in report.table()
    with pytest.raises(ValueError, match=r"invnet.verify: .*event shape"):
        invnet.verify(model, jnp.ones((3, 4, 4, 3), jnp.float32))


@pytest.mark.extended  # the fresh Glow above changes shapes too; CI runs this one
def test_shape_changing_model():
    """(4, 4, 2) -> (32,): errors compare arrays of their own shapes; bounds per layer."""
    rngs = nnx.Rngs(0)
    model = invnet.Sequential(
        invnet.ActNorm(2, event_ndim=3),
        invnet.Reshape((4, 4, 2), (32,)),
        invnet.LULinear(32, rngs=rngs),
    )
    x = jax.random.normal(jax.random.key(1), (2, 3, 4, 4, 2), jnp.float32)  # two batch axes
    invnet.data_init(model, x)
    report = invnet.verify(model, x, jacobian_samples=2, check_float64=False)
    assert report.ok, report.table()
    assert report.n_samples == 6 and report.dim == 32
    assert report.event_shape == (4, 4, 2) and report.output_event_shape == (32,)
    assert [layer.kind for layer in report.layers] == ["ActNorm", "Reshape", "LULinear"]
    assert report.layers[2].bound == pytest.approx(model[2].error_bound()[0])
    assert report.tol == pytest.approx(
        min(10 * 32 * float(jnp.finfo(jnp.float32).eps) * report.condition_bound, 2**-11.5)
    )
    data = json.loads(report.to_json())
    assert data["event_shape"] == [4, 4, 2] and data["output_event_shape"] == [32]


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_input_is_refused_clearly(dtype):
    model = invnet.Sequential(invnet.LULinear(D, rngs=nnx.Rngs(0)))
    with pytest.raises(TypeError, match=r"invnet.verify: .*float32 or float64.*astype"):
        invnet.verify(model, jnp.ones((3, D), dtype))


def test_unconditional_model_refuses_cond():
    model = invnet.Sequential(invnet.LULinear(D, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="invnet.verify: .*cond_dim=0"):
        invnet.verify(model, jnp.ones((3, D), jnp.float32), cond=jnp.ones((3, 2)))


def test_fresh_glow_passes_with_a_row_per_leaf_layer_inside_factor_out():
    """verify of a freshly built multi-scale Glow: the ActNorms inside its FactorOut are
    checked as the identity they are (they failed with a log-det error of ~9 when the walk
    did not open FactorOut), and the table has a row per leaf layer, with its path."""
    from invnet.walk import layers

    glow = invnet.glow((4, 4, 1), levels=2, steps=1, hidden=4, rngs=nnx.Rngs(0))
    x = jax.random.uniform(jax.random.key(0), (8, 4, 4, 1), jnp.float32)
    report = invnet.verify(glow, x, jacobian_samples=2, check_float64=False)
    assert report.ok, report.failures
    names = [row.name for row in report.layers]
    assert names == [step.name for step in layers(glow)]
    assert len(names) == 9  # 2 levels x (Squeeze, ActNorm, Conv1x1, coupling) + a Reshape
    assert any(".rest[" in name for name in names)


def test_a_second_verify_of_the_same_structure_does_not_compile_again(monkeypatch):
    """verify used to jit its checks afresh on every call (a new jax.jit each time)."""
    from invnet.verification import checks

    built, make = [], checks._make_checks
    monkeypatch.setattr(checks, "_make_checks", lambda *a: built.append(a) or make(*a))
    x = jax.random.normal(jax.random.key(0), (8, 4))
    model = invnet.Sequential(invnet.LULinear(4, rngs=nnx.Rngs(0)), invnet.LeakyReLU(0.5))
    first = invnet.verify(model, x, jacobian_samples=2)
    nnx.update(model, jax.tree.map(lambda p: p * 1.1, nnx.state(model, nnx.Param)))
    second = invnet.verify(model, x, jacobian_samples=2)  # new parameters, same structure
    nnx.update(model, jax.tree.map(lambda p: p * jnp.nan, nnx.state(model, nnx.Param)))
    broken = invnet.verify(model, x, jacobian_samples=2)  # the parameters are arguments
    assert first.ok and second.ok and not broken.ok and len(built) == 1


def test_condition_numbers_bring_one_jacobian_at_a_time_to_float64():
    # verify's condition numbers at D = 3072 once copied all sampled Jacobians to float64 on
    # the host at once (600 MB for 8 of them); one at a time it is 75 MB
    import tracemalloc

    from invnet.verification.checks import _condition_numbers

    rng = np.random.default_rng(0)
    jac = rng.normal(size=(8, 256, 256)).astype(np.float32)
    jac[3, 0, 0] = np.nan
    one = 256 * 256 * 8  # bytes of one matrix in float64
    tracemalloc.start()
    try:
        got = _condition_numbers(jac)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 3 * one, peak  # all eight in float64 would be 8 * one
    want = [np.linalg.cond(m.astype(np.float64)) for m in np.delete(jac, 3, axis=0)]
    assert np.isnan(got[3])
    np.testing.assert_allclose(np.delete(got, 3), want, rtol=1e-8)
