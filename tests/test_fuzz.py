"""Hostile input: fuzz layer configurations, shapes, dtypes and extreme magnitudes.

Every call either raises the documented error type, or returns outputs of the input's shape
and dtype where (a) finite inputs give finite outputs and (b) those round-trip within the
documented bound, relative to the largest input magnitude: 1e-10 in float64, 1e-4 in
float32 (single perturbed layers, amplification <= exp(2 * clamp) or 1/slope). Non-finite
inputs propagate to non-finite outputs only in the samples that hold them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from registry import perturb

import invnet

pytestmark = pytest.mark.extended  # hypothesis at every magnitude: long


KINDS = ["lu", "leaky", "affine", "affine_cond", "additive", "permute", "actnorm"]


def make(kind: str, dim: int, dtype, seed: int):
    rngs = nnx.Rngs(seed)
    if kind == "lu":
        layer = invnet.LULinear(dim, param_dtype=dtype, rngs=rngs)
    elif kind == "leaky":
        layer = invnet.LeakyReLU(0.25, param_dtype=dtype)
    elif kind in ("affine", "affine_cond"):
        layer = invnet.AffineCoupling(
            dim,
            hidden=(6,),
            cond_dim=2 if kind == "affine_cond" else 0,
            param_dtype=dtype,
            rngs=rngs,
        )
    elif kind == "additive":
        layer = invnet.AdditiveCoupling(dim, hidden=(6,), param_dtype=dtype, rngs=rngs)
    elif kind == "permute":
        layer = invnet.Permute(dim, rngs=rngs)
    else:
        layer = invnet.ActNorm(dim, param_dtype=dtype)
        layer.data_init(jax.random.normal(jax.random.key(seed), (8, dim), dtype))
    return perturb(layer, 0.2, seed=seed)


magnitudes = st.sampled_from([1e-30, 1e-10, 1e-3, 1.0, 1e3, 1e10, 1e30])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    kind=st.sampled_from(KINDS),
    dim=st.integers(2, 5),
    batch=st.sampled_from([(), (1,), (3,), (2, 2)]),
    dtype=st.sampled_from(["float32", "float64"]),
    magnitude=magnitudes,
    seed=st.integers(0, 1000),
)
def test_finite_inputs_round_trip_at_any_magnitude(kind, dim, batch, dtype, magnitude, seed):
    layer = make(kind, dim, jnp.dtype(dtype), seed)
    kx, kc = jax.random.split(jax.random.key(seed + 1))
    x = magnitude * jax.random.normal(kx, (*batch, dim), dtype)
    cond = jax.random.normal(kc, (*batch, 2), dtype) if kind == "affine_cond" else None
    y, log_det = layer.forward(x, cond=cond)
    assert y.shape == x.shape and y.dtype == x.dtype and log_det.shape == batch
    assert bool(jnp.all(jnp.isfinite(y))) and bool(jnp.all(jnp.isfinite(log_det)))
    x_back, inv_log_det = layer.inverse(y, cond=cond)
    bound = 1e-10 if dtype == "float64" else 1e-4
    scale = float(jnp.max(jnp.abs(x))) if x.size else 1.0
    err = float(jnp.max(jnp.abs(x_back - x))) if x.size else 0.0
    assert err <= bound * max(scale, float(jnp.max(jnp.abs(y)))), (err, scale)
    np.testing.assert_allclose(
        log_det + inv_log_det, 0.0, atol=1e-3 if dtype == "float32" else 1e-9
    )


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    kind=st.sampled_from(KINDS),
    special=st.sampled_from([np.nan, np.inf, -np.inf]),
    seed=st.integers(0, 1000),
)
def test_non_finite_inputs_stay_in_their_sample(kind, special, seed):
    dim = 4
    layer = make(kind, dim, jnp.float32, seed)
    x = jax.random.normal(jax.random.key(seed), (3, dim), jnp.float32)
    x = x.at[1, seed % dim].set(special)
    cond = jnp.zeros((3, 2), jnp.float32) if kind == "affine_cond" else None
    y, log_det = layer.forward(x, cond=cond)  # never raises
    assert y.shape == x.shape
    # samples 0 and 2 are untouched by sample 1's bad value
    clean = jnp.array([0, 2])
    assert bool(jnp.all(jnp.isfinite(y[clean]))) and bool(jnp.all(jnp.isfinite(log_det[clean])))
    x_back, _ = layer.inverse(y, cond=cond)
    np.testing.assert_allclose(x_back[clean], x[clean], atol=1e-4)


@settings(max_examples=20, deadline=None)
@given(
    kind=st.sampled_from([k for k in KINDS if k != "leaky"]),
    wrong=st.integers(1, 8),
    dtype=st.sampled_from(["int32", "bool", "float32"]),
)
def test_bad_shapes_and_dtypes_raise_the_documented_errors(kind, wrong, dtype):
    dim = 4
    layer = make(kind, dim, jnp.float32, 0)
    size = wrong if wrong != dim else dim + 1
    x = jnp.zeros((2, size), dtype)
    expected = TypeError if dtype != "float32" else ValueError
    with pytest.raises(expected):
        layer.forward(x, cond=jnp.zeros((2, 2)) if kind == "affine_cond" else None)


def test_saturating_coupling_inputs_stay_finite():
    block = perturb(invnet.AffineCoupling(4, hidden=(8,), rngs=nnx.Rngs(0)), 1.0, seed=0)
    # float32 inputs up to ~1e36: the conditioner's raw scales saturate, the soft clamp holds.
    # (Near float32's max, 3.4e38, the conditioner's own sums overflow to inf - inf = NaN;
    # that is reported as a non-finite output, not hidden.)
    x = jnp.array([[1e36, -1e36, 1.0, 2.0], [1e30, 1e30, -1e30, 1e30]], jnp.float32)
    y, log_det = block.forward(x)
    assert bool(jnp.all(jnp.isfinite(log_det))) and bool(jnp.all(jnp.isfinite(y)))
    assert bool(jnp.all(jnp.abs(log_det) <= 2 * 2.0 * 2 + 1e-4))  # |s| <= clamp per feature
