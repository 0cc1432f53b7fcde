"""An inverse that returns NaN says which layer and which samples left the model's range."""

import warnings

import jax.numpy as jnp
import pytest
from flax import nnx

import invnet
from invnet.verification import warn_nonfinite


def _model():
    rngs = nnx.Rngs(0)
    return invnet.Flow(
        invnet.Sequential(
            invnet.Sigmoid(), invnet.LULinear(2, rngs=rngs), invnet.Tanh(),
            invnet.LULinear(2, rngs=rngs),
        )
    )  # fmt: skip


def test_first_layer_and_samples_that_leave_the_range_are_named():
    model = _model()
    x = jnp.asarray([[0.3, -0.2], [1.0, 2.0], [-0.5, 0.1], [0.0, 0.0]])
    z, _ = model.forward(x)
    # sample 1: far outside what the Tanh can give; sample 3: NaN already
    target = z.at[1].set(jnp.asarray([50.0, -50.0])).at[3, 0].set(jnp.nan)
    with pytest.warns(invnet.NonFiniteWarning, match="samples 1,"):
        x_back, _ = model.inverse(target)
    assert bool(jnp.isnan(x_back[1]).any())  # the NaN the report explains
    report = invnet.explain_nonfinite(model, target)
    assert not report.ok and report.inverse and report.batch == 4
    assert report.nonfinite_input == (3,)
    assert [(f.name, f.kind, f.samples) for f in report.layers] == [
        ("model.bijector[2]", "Tanh", (1,))
    ]
    assert "model.bijector[2] (Tanh): 1 sample(s) [1]" in str(report)
    assert "(-1, 1) of a Tanh" in str(report)
    assert invnet.explain_nonfinite(model, z).ok
    forward = invnet.explain_nonfinite(model, x.at[2, 0].set(jnp.inf), inverse=False)
    assert forward.nonfinite_input == (2,) and forward.layers == ()


def test_warn_nonfinite_names_the_layer_and_stays_quiet_when_all_is_finite_or_traced():
    model = _model()
    fine, _ = model.forward(jnp.asarray([[0.1, 0.2], [0.5, -1.0], [0.0, -0.1]]))
    target = fine.at[1].set(80.0)
    with pytest.warns(invnet.NonFiniteWarning):
        out, _ = model.inverse(target)
    with pytest.warns(RuntimeWarning, match=r"model\.bijector\[\d\] \((Tanh|Sigmoid)\).*\[1\]"):
        warn_nonfinite(model, target, out, inverse=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_nonfinite(model, fine, model.inverse(fine)[0], inverse=True)
        traced = nnx.jit(lambda m, t: warn_nonfinite(m, t, m.inverse(t)[0], inverse=True))
        traced(model, target)
    assert bool(jnp.all(jnp.isfinite(model.inverse(fine)[0])))


def test_the_models_inverse_warns_when_finite_targets_come_back_nonfinite():
    """model.inverse of a target outside a Tanh's range returned NaN with nothing said; the
    compiled call now warns with the samples and points at explain_nonfinite."""
    model = invnet.Sequential(invnet.LULinear(2, rngs=nnx.Rngs(0)), invnet.Tanh())
    y = jnp.array([[0.5, -0.2], [1.5, 0.0], [0.1, 0.1]], jnp.float32)
    with pytest.warns(invnet.NonFiniteWarning, match=r"1 of 3 samples .*samples 1,"):
        x, _ = model.inverse(y)
    assert not bool(jnp.all(jnp.isfinite(x[1])))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.inverse(y[jnp.array([0, 2])])  # all in range: silent
