"""Compiled by default (invnet._runtime): a model's methods on concrete arrays run as cached
jitted functions of the current variables; the results equal the layers run as written,
never come from old parameters, and bad inputs give the same errors.

Tolerances: float64 throughout (conftest enables x64); compiled vs as written differ only by
XLA's fusion and operation order: 1e-12 relative (float32 samples: 1e-6).
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from registry import perturb

import invnet
from invnet import _runtime

DIM, COND = 4, 2


def _model():
    r = nnx.Rngs(0)
    return perturb(
        invnet.Sequential(
            invnet.LULinear(DIM, param_dtype=jnp.float64, rngs=r),
            invnet.LeakyReLU(0.5),
            invnet.AffineCoupling(DIM, hidden=(8,), cond_dim=COND, param_dtype=jnp.float64, rngs=r),
        ),
        0.2,
    )


def _data(n=5):
    x = jax.random.normal(jax.random.key(1), (n, DIM), jnp.float64)
    return x, jax.random.normal(jax.random.key(2), (n, COND), jnp.float64)


def _close(a, b):
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        tol = 1e-12 if v.dtype == jnp.float64 else 1e-6  # float32 samples: a few eps
        assert float(jnp.max(jnp.abs(u - v))) <= tol * (1 + float(jnp.max(jnp.abs(v))))


def _compiled(model) -> bool:
    return model in _runtime._SNAPSHOTS


def test_methods_are_compiled_and_equal_as_written():
    model, (x, c) = _model(), _data()
    got = (
        model.forward(x, cond=c),
        model.inverse(x, cond=c),
        model(x, cond=c),
        model.forward(x, cond=c, return_intermediates=True),
    )
    assert _compiled(model)
    with invnet.eager():
        other = _model()
        want = (
            other.forward(x, cond=c),
            other.inverse(x, cond=c),
            other(x, cond=c),
            other.forward(x, cond=c, return_intermediates=True),
        )
    assert not _compiled(other)
    _close(got, want)
    assert len(got[3][2]) == len(model)


def test_never_stale_after_updates_and_structural_changes():
    model, (x, c) = _model(), _data()
    model.forward(x, cond=c)
    perturb(model, 0.1, seed=5)  # values changed in place (an optimizer step)
    model.layers[0].bias = nnx.Param(jnp.ones(DIM, jnp.float64))  # a variable replaced
    invnet.set_precision(model, "bf16x6")  # a static setting changed
    y = model.forward(x, cond=c)
    with invnet.eager():
        _close(y, model.forward(x, cond=c))


def test_an_nnx_transform_over_the_model_is_not_a_structural_change():
    """Any nnx transform over the model (an nnx.jit evaluation, a training step) replaces
    nnx's bookkeeping attribute on every module; the runtime used to take that for a new
    structure and split the model and form its tables again on the next call."""
    model, (x, c) = _model(), _data()
    model.forward(x, cond=c)
    snap = _runtime.snapshot(model)
    nnx.jit(lambda m, v: m.forward(v, cond=c)[0])(model, x)
    assert _runtime.snapshot(model) is snap
    perturb(model, 0.1, seed=5)  # values changed: the same snapshot, fresh results
    y = model.forward(x, cond=c)
    with invnet.eager():
        _close(y, model.forward(x, cond=c))


def test_inside_user_transformations_it_traces_as_written():
    model, (x, c) = _model(), _data()
    y = model.forward(x, cond=c)[0]
    with pytest.warns(invnet.BakedParametersWarning):  # the model closed over: baked in
        _close(jax.jit(lambda v: model.forward(v, cond=c)[0])(x), y)
    _close(jax.vmap(lambda v, w: model(v, cond=w))(x, c), y)
    grads = nnx.grad(lambda m: jnp.sum(m.forward(x, cond=c)[1]))(model)
    assert all(jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads))


@pytest.mark.extended  # op by op: ~15 s
def test_under_jax_disable_jit_it_runs_as_written():
    model, (x, c) = _model(), _data()
    want = model.forward(x, cond=c)
    with jax.disable_jit():  # a user debugging op by op: no dispatch (it used to recurse)
        got = model.forward(x, cond=c)
        back = model.inverse(got[0], cond=c)[0]
        sampled = invnet.Flow(model).sample(jax.random.key(0), 3, cond=c[:3])
    _close(got, want)
    _close(back, x)
    assert sampled.shape == (3, DIM)


def test_data_dependent_init_runs_as_written_then_compiled():
    model = invnet.Sequential(invnet.ActNorm(DIM), invnet.LeakyReLU(0.5))
    x = 3.0 + 2.0 * _data(64)[0]
    y, _, hs = model.forward(x, return_intermediates=True)  # initialises the ActNorm
    assert model.layers[0].not_ready() is None and not _compiled(model)
    assert float(jnp.max(jnp.abs(jnp.mean(hs[0], 0)))) < 1e-6
    _close(model.forward(x)[0], y)
    assert _compiled(model)


@pytest.mark.parametrize(
    "call, error",
    [
        (lambda m, x, c: m.forward(x[:, :3], cond=c), ValueError),
        (lambda m, x, c: m.inverse(x.astype(jnp.int32), cond=c), TypeError),
        (lambda m, x, c: m.forward(x), ValueError),  # missing cond
        (lambda m, x, c: m.forward(x, cond=c[:3]), ValueError),  # cond batch mismatch
        (lambda m, x, c: m(x, cond=c[:, :1]), ValueError),  # cond width
        (lambda m, x, c: m.layers[1].forward(x, cond=c), ValueError),  # unconditional
    ],
)
def test_bad_inputs_give_the_same_errors(call, error):
    model, (x, c) = _model(), _data()
    with pytest.raises(error) as compiled:
        call(model, x, c)
    with invnet.eager(), pytest.raises(error) as written:
        call(model, x, c)
    assert str(compiled.value) == str(written.value)


def test_env_var_opts_out(monkeypatch):
    monkeypatch.setenv("INVNET_EAGER", "1")
    model, (x, c) = _model(), _data()
    model.forward(x, cond=c)
    assert _runtime.eager_mode() and not _compiled(model)


def test_flow_sampling_and_densities_compiled():
    flow = invnet.Flow(_model())
    x, c = _data()
    got = (
        flow.sample(jax.random.key(3), 5, cond=c),
        flow.log_prob(x, cond=c),
        flow.sample_and_log_prob(3, 5, cond=c[0], temperature=0.5, dtype=jnp.float64),
        invnet.sample_posterior(flow.bijector, jnp.ones(2), 4, n=5, cond=c),
    )
    assert _compiled(flow) and _compiled(flow.bijector)
    with invnet.eager():
        want = (
            flow.sample(jax.random.key(3), 5, cond=c),
            flow.log_prob(x, cond=c),
            flow.sample_and_log_prob(3, 5, cond=c[0], temperature=0.5, dtype=jnp.float64),
            invnet.sample_posterior(flow.bijector, jnp.ones(2), 4, n=5, cond=c),
        )
    _close(got, want)
    # under a user's jit (key and temperature traced) sampling traces as written
    draw = nnx.jit(lambda f, k, t: f.sample(k, 5, cond=c, temperature=t))
    _close(draw(flow, jax.random.key(3), 1.0), want[0])
    with pytest.raises(ValueError, match="cond"):
        flow.sample(0, 5)  # a conditional flow needs cond: the same error as written


def test_a_model_closed_over_by_a_users_jit_warns_with_the_fix():
    """jax.jit(flow.log_prob) bakes the parameters into the user's compiled function as
    constants: after training it silently kept the untrained model's values. It warns now,
    naming the fix; passing the model in (nnx.jit) and vmap/grad/scan run on the spot do not."""
    flow = invnet.Flow(invnet.AffineCoupling(2, rngs=nnx.Rngs(0)))
    x = jnp.ones((3, 2), jnp.float32)
    with pytest.warns(invnet.BakedParametersWarning, match=r"nnx\.jit\(lambda m, x"):
        jax.jit(flow.log_prob)(x)
    with pytest.warns(invnet.BakedParametersWarning, match="forward"):
        jax.jit(lambda v: flow.bijector.forward(v))(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        nnx.jit(lambda m, v: m.log_prob(v))(flow, x)
        jax.vmap(flow.log_prob)(x)
        jax.grad(lambda v: flow.log_prob(v).sum())(x)
        jax.lax.scan(lambda c, v: (c, flow.log_prob(v)), 0.0, x)
