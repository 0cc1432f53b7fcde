"""Fuzzing every registered layer and random compositions of them: no silent wrong answers.

For random parameter draws (perturbations of 0.05 to 1.0 around each layer's init) and
inputs (magnitudes 1e-3 to 1e3), in float64, every call ends in one of two ways:

* the outputs are all finite: then the round trip holds to ``1e-7`` relative to the
  largest magnitude seen, times the model's own error bound (the product of its layers'
  `Bijector.error_bound`, as `invnet.verify` uses), and the log-det equals
  ``slogdet`` of the autodiff Jacobian of the flattened map; a model with a layer that
  declares itself unbounded (Tanh, Sigmoid: a saturated input is lost to rounding) may lose
  samples, which `invnet.verify` reports, and every sample that does come back obeys
  those checks;
* some output is NaN or inf: the failure is loud (a user sees it, `invnet.verify` counts it).

A round trip that is off with finite numbers, or a log-det that disagrees with the Jacobian,
is the silent wrong answer these tests exist to catch.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from registry import CASES, DIM, perturb

import invnet
from invnet.walk import layers

pytestmark = pytest.mark.extended  # hypothesis over every layer: minutes of compiles

VECTOR_CASES = [c for c in CASES if c.event_shape == (DIM,) and not c.cond_dim]


def _bound(model) -> float:
    """The product of the layers' error bounds; ``inf`` when a layer declares itself
    unbounded (Tanh, Sigmoid: saturation loses the input, and `invnet.verify` says so)."""
    total = 1.0
    for step in layers(model):
        total *= max(1.0, float(step.layer.error_bound()[0]))
    return total


def _initialise(model, event_shape, seed):
    if any(node.not_ready() for node in invnet.core.nodes(model)):
        batch = jax.random.normal(jax.random.key(seed), (32, *event_shape), jnp.float64)
        invnet.data_init(model, batch)


def _check(model, event_shape, cond_dim, magnitude, seed):
    kx, kc = jax.random.split(jax.random.key(seed))
    x = magnitude * jax.random.normal(kx, (3, *event_shape), jnp.float64)
    cond = jax.random.normal(kc, (3, cond_dim), jnp.float64) if cond_dim else None
    y, log_det = model.forward(x, cond=cond)
    x_back, inv_log_det = model.inverse(y, cond=cond)
    outs = (y, log_det, x_back, inv_log_det)
    if not all(bool(jnp.all(jnp.isfinite(a))) for a in outs):
        return  # loud: non-finite values are visible (and counted by invnet.verify)
    scale = max(float(jnp.max(jnp.abs(x))), float(jnp.max(jnp.abs(y))), 1.0)
    per_sample = jnp.max(jnp.abs(x_back - x).reshape(x.shape[0], -1), axis=1)
    bound = _bound(model)
    if math.isinf(bound):
        # a layer declares itself unbounded: samples it lost (saturated) are reported by
        # verify, not silent; the samples that came back (to 1e-10) obey every check below
        exact = np.asarray(per_sample <= 1e-10 * scale)
        if not exact.any():
            return
        x, log_det, inv_log_det = x[exact], log_det[exact], inv_log_det[exact]
        cond = None if cond is None else cond[exact]
        bound = 1.0
    else:
        err = float(jnp.max(per_sample))
        assert err <= 1e-7 * bound * scale, f"silent round-trip error {err:.3g}"
    # the log-dets of the two directions agree as the round trip does: to the same
    # conditioning, relative to their size
    ld_scale = max(1.0, float(jnp.max(jnp.abs(log_det))))
    np.testing.assert_allclose(np.asarray(log_det + inv_log_det), 0.0, atol=1e-7 * bound * ld_scale)
    c0 = None if cond is None else cond[0]

    def flat(v):
        return model.forward(v.reshape(event_shape), cond=c0)[0].reshape(-1)

    jac = jax.jacrev(flat)(x[0].reshape(-1))
    sign, logabs = jnp.linalg.slogdet(jac)
    if float(sign) == 0.0 or not math.isfinite(float(logabs)):
        return  # numerically singular Jacobian: a log-det check would prove nothing here
    tol = 1e-6 * max(1.0, abs(float(logabs)))
    assert abs(float(log_det[0]) - float(logabs)) <= tol, (float(log_det[0]), float(logabs))


cases = st.sampled_from(CASES)
magnitudes = st.sampled_from([1e-3, 1.0, 10.0, 1e3])
scales = st.sampled_from([0.05, 0.3, 1.0])


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases, scale=scales, magnitude=magnitudes, seed=st.integers(0, 10_000))
def test_every_layer_is_exact_or_loud(case, scale, magnitude, seed):
    model = case.build(jnp.dtype("float64"), nnx.Rngs(seed))
    _initialise(model, case.event_shape, seed)
    perturb(model, scale, seed=seed)
    _check(model, case.event_shape, case.cond_dim, magnitude, seed + 1)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    picks=st.lists(st.sampled_from(VECTOR_CASES), min_size=2, max_size=4),
    invert=st.lists(st.booleans(), min_size=4, max_size=4),
    scale=scales,
    magnitude=magnitudes,
    seed=st.integers(0, 10_000),
)
def test_random_compositions_are_exact_or_loud(picks, invert, scale, magnitude, seed):
    layers = []
    for i, case in enumerate(picks):
        layer = case.build(jnp.dtype("float64"), nnx.Rngs(seed + i))
        layers.append(invnet.Inverse(layer) if invert[i] else layer)
    model = invnet.Sequential(*layers)
    _initialise(model, (DIM,), seed)
    perturb(model, scale, seed=seed)
    _check(model, (DIM,), 0, magnitude, seed + 1)
