"""invnet.freeze (module invnet.compiled): compiled equals eager, never stale (also
inside a jit), y-only calls, inverse-method accuracy bounds.

Tolerances: float64 compares compiled and eager to 1e-10 relative (they differ only by the
order of rounding: one dense GEMM vs two triangular products). float32 to 2e-5 relative
(D <= 8: a few hundred eps; the dense W is rounded once from float64, the eager path rounds
after each factor).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from registry import perturb

import invnet

DIM = 6
COND_DIM = 3


def _every_layer(dt):
    """One model holding every layer type (and both containers, nested)."""
    r = nnx.Rngs(0)
    return invnet.Sequential(
        invnet.LULinear(DIM, param_dtype=dt, rngs=r),
        invnet.LeakyReLU(0.5),
        invnet.AffineCoupling(DIM, hidden=(8,), cond_dim=COND_DIM, param_dtype=dt, rngs=r),
        invnet.Permute(DIM, rngs=r),
        invnet.ActNorm(DIM, param_dtype=dt),
        invnet.AdditiveCoupling(DIM, hidden=(8,), param_dtype=dt, rngs=r),
        invnet.LeakyReLU(0.3, learnable=True, param_dtype=dt),
        invnet.Inverse(invnet.Sequential(invnet.LULinear(DIM, param_dtype=dt, rngs=r))),
    )


def _prepared(dt):
    model = perturb(_every_layer(dt), 0.2)
    x = jax.random.normal(jax.random.key(2), (5, DIM), dt)
    cond = jax.random.normal(jax.random.key(3), (5, COND_DIM), dt) if model.cond_dim else None
    for _, node in nnx.iter_graph(model):  # perturbed ActNorm parameters count as initialised
        if isinstance(node, invnet.ActNorm):
            node.initialized[...] = jnp.asarray(True)
    return model, x, cond


def _rel(a, b):
    return float(jnp.max(jnp.abs(a - b)) / jnp.maximum(jnp.max(jnp.abs(b)), 1e-30))


@functools.cache
def _eager(dtype):
    """The model, inputs and the layers' own outputs for one dtype, computed once (the layers'
    methods as written, run under one jax.jit: op-by-op dispatch is slow on small CPUs)."""
    dt = jnp.dtype(dtype)
    with jax.enable_x64(dt == jnp.float64):
        model, x, cond = _prepared(dt)
        graphdef, state = nnx.split(model)

        @jax.jit
        def run(state, x, cond):
            m = nnx.merge(graphdef, state)
            y, log_det = m.forward(x, cond=cond)
            return y, log_det, m.inverse(y, cond=cond)[0]

        y, log_det, x_back = run(state, x, cond)
        return model, x, cond, y, log_det, x_back


@pytest.mark.parametrize("method", invnet.LU_INVERSE_METHODS)
@pytest.mark.parametrize(
    "dtype, tol", [("float32", 2e-5), pytest.param("float64", 1e-10, marks=pytest.mark.extended)]
)
def test_compiled_equals_eager(method, dtype, tol):
    """Forward, inverse and log-det of every layer type, compiled vs eager."""
    model, x, cond, y, log_det, x_back = _eager(dtype)
    with jax.enable_x64(dtype == "float64"):
        fast = invnet.freeze(model, lu_inverse=method)
        y_c, log_det_c = fast.forward(x, cond=cond)
        x_c, inv_log_det_c = fast.inverse(y, cond=cond)
        log_det_only = fast.log_det(x, cond=cond)
        _assert_close(x, y, log_det, x_back, y_c, log_det_c, x_c, inv_log_det_c, log_det_only, tol)


def _assert_close(x, y, log_det, x_back, y_c, log_det_c, x_c, inv_log_det_c, log_det_only, tol):
    assert y_c.dtype == x.dtype and log_det_c.shape == x.shape[:-1]
    scale = 1 + float(jnp.max(jnp.abs(log_det)))
    assert _rel(y_c, y) <= tol
    assert float(jnp.max(jnp.abs(log_det_c - log_det))) <= tol * scale
    assert float(jnp.max(jnp.abs(log_det_only - log_det))) <= tol * scale
    assert _rel(x_c, x_back) <= tol
    assert _rel(x_c, x) <= tol
    assert float(jnp.max(jnp.abs(inv_log_det_c + log_det))) <= tol * scale


def test_unpacks_into_two_functions():
    layer = perturb(invnet.LULinear(DIM, rngs=nnx.Rngs(0)), 0.2)
    x = jax.random.normal(jax.random.key(2), (5, DIM))
    fwd, inv = invnet.freeze(layer)
    y, _ = fwd(x)
    assert _rel(inv(y)[0], x) <= 2e-5


def test_stale_compiled_is_refused_and_refresh_rebuilds():
    r = nnx.Rngs(0)
    model = perturb(invnet.Sequential(invnet.LULinear(DIM, rngs=r), invnet.LeakyReLU(0.5)), 0.2)
    x, cond = jax.random.normal(jax.random.key(2), (5, DIM)), None
    fast = invnet.freeze(model)
    fwd, inv = fast
    y, _ = fwd(x, cond=cond)
    perturb(model, 0.05, seed=7)  # an optimizer step would do the same
    for call in (fwd, inv, fast.log_det):
        with pytest.raises(invnet.StaleCompiledError, match="refresh"):
            call(x, cond=cond)
    fast.refresh()
    y_new = fast.forward(x, cond=cond)[0]
    assert _rel(y_new, model.forward(x, cond=cond)[0]) <= 2e-5
    assert not jnp.allclose(y_new, y)
    # an in-place write to one variable, and a new precision, are both caught
    model.layers[0].bias[...] = model.layers[0].bias[...] + 1.0
    with pytest.raises(invnet.StaleCompiledError):
        fast.forward(x, cond=cond)
    fast.refresh()
    invnet.set_precision(model, "bf16x6")
    with pytest.raises(invnet.StaleCompiledError):
        fast.inverse(y, cond=cond)
    fast.refresh()
    # a variable replaced by a new one is caught too
    model.layers[0].bias = nnx.Param(jnp.zeros(DIM))
    with pytest.raises(invnet.StaleCompiledError):
        fast.forward(x, cond=cond)


def test_bad_arguments():
    with pytest.raises(ValueError, match="lu_inverse"):
        invnet.freeze(invnet.LeakyReLU(0.5), lu_inverse="cholesky")
    with pytest.raises(TypeError, match="Bijector"):
        invnet.freeze(nnx.Linear(2, 2, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="data_init"):
        invnet.freeze(invnet.ActNorm(3))
    fast = invnet.freeze(invnet.LULinear(4, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="expected last axis of size 4"):
        fast.forward(jnp.ones((2, 5)))


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="the error is for non-GPU backends")
def test_tf32x3_off_gpu_is_a_clear_error():
    model = invnet.set_precision(invnet.LULinear(4, rngs=nnx.Rngs(0)), "tf32x3")
    with pytest.raises(ValueError, match="needs an NVIDIA GPU"):
        invnet.freeze(model)


def _conditioned(dim, kappa, seed=0):
    rng = np.random.default_rng(seed)
    q1, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    q2, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    s = np.logspace(0, -np.log10(kappa), dim)
    return invnet.LULinear.from_matrix((q1 * s) @ q2.T, rng.standard_normal(dim))


@pytest.mark.parametrize("kappa", [1.0, 1e4])
@pytest.mark.parametrize("method", invnet.LU_INVERSE_METHODS)
def test_inverse_method_accuracy_bound(method, kappa):
    """float32, D=32: every method recovers x to within 30 * eps32 * cond(W) relative
    (measured at D=64: at most 7.5 eps at cond 1 and 0.15 eps * cond at cond 1e4)."""
    dim = 32
    layer = _conditioned(dim, kappa)
    perm, lower, upper = (np.asarray(a, np.float64) for a in layer.factors())
    w = (lower @ upper)[perm.astype(int)]
    x = np.random.default_rng(1).standard_normal((64, dim)).astype(np.float32)
    y = (x.astype(np.float64) @ w.T + np.asarray(layer.bias[...], np.float64)).astype(np.float32)
    x_hat = invnet.freeze(layer, lu_inverse=method).inverse(jnp.asarray(y))[0]
    err = np.abs(np.asarray(x_hat, np.float64) - x).max() / np.abs(x).max()
    assert err <= 30 * np.finfo(np.float32).eps * np.linalg.cond(w)


def test_y_only_calls_equal_the_full_ones():
    layer = perturb(invnet.LULinear(DIM, rngs=nnx.Rngs(0)), 0.2)
    x = jax.random.normal(jax.random.key(2), (5, DIM))
    fast = invnet.freeze(invnet.Sequential(layer, invnet.LeakyReLU(0.5)))
    y, _ = fast.forward(x)
    assert jnp.array_equal(fast.apply(x), y)
    assert jnp.array_equal(fast.apply_inverse(y), fast.inverse(y)[0])


def test_captured_in_a_users_jit_is_refused_and_pure_functions_stay_fresh():
    """A jitted closure over a Compiled object used to return the old model's output after
    an update (the freshness check only ran while tracing); now it is refused, and the pure
    functions take the snapshot as an argument."""
    model = perturb(invnet.Sequential(invnet.LULinear(DIM, rngs=nnx.Rngs(0))), 0.2)
    x = jax.random.normal(jax.random.key(2), (5, DIM))
    fast = invnet.freeze(model)
    with pytest.raises(invnet.CompiledTraceError, match="pure"):
        jax.jit(lambda v: fast.forward(v)[0])(x)
    with pytest.raises(invnet.CompiledTraceError):
        jax.jit(lambda: fast.inverse(x)[0])()  # x closed over: still inside the trace
    with pytest.raises(invnet.CompiledTraceError):
        jax.vmap(fast.apply)(x)
    fns, snapshot = fast.pure()
    jf = jax.jit(lambda s, v: fns.forward(s, v)[0])
    assert _rel(jf(snapshot, x), fast.forward(x)[0]) <= 1e-6
    perturb(model, 0.05, seed=7)  # an optimizer step would do the same
    with pytest.raises(invnet.StaleCompiledError):
        fast.pure()
    fns_new, snapshot = fast.refresh().pure()
    assert fns_new.forward is fns.forward  # same functions: no recompilation
    with invnet.eager():
        expected = model.forward(x)[0]
    assert _rel(jf(snapshot, x), expected) <= 2e-5
    x_back = jax.jit(lambda s, v: fns.apply_inverse(s, v))(snapshot, expected)
    assert _rel(x_back, x) <= 2e-5


def test_the_former_name_compile_warns_and_gives_the_same_object():
    model = invnet.Sequential(invnet.LULinear(3, rngs=nnx.Rngs(0)))
    with pytest.warns(DeprecationWarning, match="now invnet.freeze"):
        old = invnet.compile(model)
    assert isinstance(old, invnet.Compiled) and isinstance(invnet.freeze(model), invnet.Compiled)
    assert "compile" not in invnet.__all__ and "freeze" in invnet.__all__


def test_a_read_only_nnx_jit_call_does_not_make_a_frozen_model_stale():
    """nnx.jit writes every variable of a model passed in back as a new array, even when the
    call only reads them (an evaluation): the frozen model used to call that a change and
    raise StaleCompiledError. Equal values are not a change; different ones still are."""
    model = perturb(invnet.Sequential(invnet.LULinear(DIM, rngs=nnx.Rngs(0))), 0.2)
    x = jax.random.normal(jax.random.key(2), (5, DIM))
    fast = invnet.freeze(model)
    y = fast.forward(x)[0]
    evaluate = nnx.jit(lambda m, v: jnp.sum(m.forward(v)[0]))
    evaluate(model, x)
    assert jnp.array_equal(fast.forward(x)[0], y)  # not stale: the values are the same
    assert _rel(fast.inverse(y)[0], x) <= 2e-5

    def step(m):  # a real change, made inside nnx.jit
        m.layers[0].bias[...] = m.layers[0].bias[...] + 1.0

    nnx.jit(step)(model)
    with pytest.raises(invnet.StaleCompiledError):
        fast.forward(x)
