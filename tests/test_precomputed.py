"""The default inverse of LU layers runs on precomputed arrays (invnet._runtime's per-version
tables, `LULinear.prepare`): it equals the layers' own triangular solves, is never stale
after training or a manual change, and `prepare` forms only what the call runs.

Tolerances: float64 (conftest enables x64) unless stated; a float64 inverse formed on the
host and the layer's float64 solves differ by rounding: 1e-12 relative at these sizes
(condition numbers below 10).
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from registry import perturb

import invnet
from invnet import _runtime

D = 6


def _model():
    r = nnx.Rngs(0)
    return perturb(
        invnet.Sequential(
            invnet.LULinear(D, param_dtype=jnp.float64, rngs=r),
            invnet.LeakyReLU(0.5),
            invnet.Inverse(invnet.LULinear(D, param_dtype=jnp.float64, rngs=r)),
            invnet.LULinear(D, param_dtype=jnp.float64, rngs=r),
        ),
        0.2,
    )


def _x(n=64):
    return jax.random.normal(jax.random.key(1), (n, D), jnp.float64)


def _close(a, b, tol=1e-12):
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert float(jnp.max(jnp.abs(u - v))) <= tol * (1 + float(jnp.max(jnp.abs(v))))


def _as_written(model, y):
    """The layers' own triangular solves / in-call products: the methods traced as written
    inside a jit of the caller's (one compile; invnet.eager() runs the same code op by op)."""
    return nnx.jit(lambda m, v: m.inverse(v))(model, y)


def test_default_inverse_uses_the_precomputed_inverse_and_equals_the_solves():
    model = _model()
    y, log_det = model.forward(_x())
    got = model.inverse(y)
    tables = _runtime.snapshot(model)._prepared[("inverse", "matrix")][1]
    kinds = [sorted(t) for t in tables if t is not None]
    # W^{-1} for the layers whose inverse runs, W for the one inside Inverse (its forward)
    assert kinds == [["weight_inv"], ["weight"], ["weight_inv"]]
    _close(got, _as_written(model, y))
    _close(got[0], _x())
    _close(got[1], -log_det)


def test_default_inverse_is_never_stale_after_a_parameter_change():
    model = _model()
    x = _x()
    y = model.forward(x)[0]
    before = model.inverse(y)[0]
    # a manual change: values replaced through nnx.update
    params = nnx.state(model, nnx.Param)
    nnx.update(model, jax.tree.map(lambda p: p * 1.1, params))
    after = model.inverse(y)
    assert float(jnp.max(jnp.abs(after[0] - before))) > 1e-3  # the change shows
    _close(after, _as_written(model, y))
    # an optimizer step
    opt = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
    grads = nnx.jit(nnx.grad(lambda m: jnp.sum(m.forward(x)[0] ** 2)))(model)
    opt.update(model, grads)
    _close(model.inverse(y), _as_written(model, y))
    # sampling runs the inverse on the same tables
    flow = invnet.Flow(model)
    _close(flow.sample(jax.random.key(2), 5, dtype=jnp.float64), _as_written_sample(flow))


def test_default_inverse_is_never_stale_after_fit():
    model = _model()
    x = _x()
    y = model.forward(x)[0]
    before = model.inverse(y)[0]
    invnet.fit(invnet.Flow(model), np.asarray(x), epochs=2, batch_size=32, progress=False)
    after = model.inverse(y)
    assert float(jnp.max(jnp.abs(after[0] - before))) > 1e-6  # training moved it
    _close(after, _as_written(model, y))


def _as_written_sample(flow):
    return nnx.jit(lambda f: f.sample(jax.random.key(2), 5, dtype=jnp.float64))(flow)


def test_default_inverse_of_nonfinite_parameters_is_nan_with_the_warning_not_an_error():
    layer = invnet.LULinear(D, param_dtype=jnp.float64, rngs=nnx.Rngs(0))
    y = _x(4)
    layer.log_scale[...] = layer.log_scale[...].at[2].set(jnp.nan)
    with pytest.warns(invnet.NonFiniteWarning, match="4 of 4 samples"):
        x, _ = layer.inverse(y)
    assert not bool(jnp.any(jnp.all(jnp.isfinite(x), axis=-1)))  # every sample has a NaN


def test_finite_results_stay_silent_and_nonfinite_inputs_are_not_blamed():
    model = invnet.Sequential(invnet.LULinear(2, rngs=nnx.Rngs(0)), invnet.Tanh())
    y = jnp.array([[0.5, -0.2], [jnp.nan, 0.0], [0.1, 0.1]], jnp.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x, _ = model.inverse(y)  # sample 1 was NaN already: nothing lost
        model.inverse(y[jnp.array([0, 2])])
    assert bool(jnp.all(jnp.isfinite(x[jnp.array([0, 2])])))


@pytest.mark.parametrize("kind", ["random", "orthogonal", "cond1e4"])
def test_prepared_inverse_is_the_float64_inverse_rounded_once(kind):
    """The explicit inverse `prepare` forms equals W^{-1} in float64 to a few ulps times the
    condition number, and its float32 rounding round-trips as a float32 inverse should."""
    d = 48
    if kind == "cond1e4":
        rng = np.random.default_rng(0)
        q1 = np.linalg.qr(rng.normal(size=(d, d)))[0]
        q2 = np.linalg.qr(rng.normal(size=(d, d)))[0]
        w = (q1 * np.logspace(0, -4, d)) @ q2.T
        layer = invnet.LULinear.from_matrix(w, param_dtype=jnp.float64)
    else:
        layer = invnet.LULinear(d, init=kind, param_dtype=jnp.float64, rngs=nnx.Rngs(0))
    perm, lower, upper = layer._float64_factors()
    weight = (lower @ upper)[perm]
    cond = np.linalg.cond(weight)
    prepared = layer.prepare()
    np.testing.assert_allclose(np.asarray(prepared["weight"]), weight, rtol=0, atol=1e-14)
    eye = np.asarray(prepared["weight_inv"]) @ weight
    assert np.max(np.abs(eye - np.eye(d))) < 50 * np.finfo(np.float64).eps * cond
    assert sorted(layer.prepare(run=("inverse",))) == ["weight_inv"]
    assert sorted(layer.prepare(run=("forward",))) == ["weight"]
    assert layer.prepare(lu_inverse="solve") is None


@pytest.mark.extended  # the default-path tests above cover the same tables
def test_compile_forms_each_directions_matrices_when_first_needed():
    model = _model()
    x = _x()
    y = model.forward(x)[0]
    fast = invnet.freeze(model)
    assert fast._snap._prepared == {}  # nothing formed by compile itself
    x_back, log_det = fast.inverse(y)
    assert list(fast._snap._prepared) == [("inverse", "matrix")]  # no W for the forward
    _close((x_back, log_det), _as_written(model, y))
    _close(fast.forward(x), model.forward(x))
    fns, snapshot = fast.pure()  # one snapshot for every pure function
    _close(jax.jit(fns.inverse)(snapshot, y), (x_back, log_det))
    _close(jax.jit(fns.apply)(snapshot, x), y)


@pytest.mark.parametrize("d", [1, 5, 37, 64])
def test_host_unit_lower_inverse_by_recursive_blocks(d):
    from invnet.layers.linear import _unit_lower_inverse_f64

    rng = np.random.default_rng(d)
    lower = np.tril(rng.normal(size=(d, d)) * 0.5, -1) + np.eye(d)
    got = _unit_lower_inverse_f64(np.asfortranarray(lower), base=4)  # several levels
    assert np.allclose(np.triu(got, 1), 0.0) and np.allclose(np.diag(got), 1.0)
    assert np.max(np.abs(got @ lower - np.eye(d))) < 1e-12
