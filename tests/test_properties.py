"""Hypothesis property tests: random sizes, batch shapes and parameters (float64)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st
from registry import perturb

import invnet

pytestmark = pytest.mark.extended  # hypothesis stacks: long


SETTINGS = settings(max_examples=8, deadline=None)
batch_shapes = st.lists(st.integers(1, 3), min_size=0, max_size=2).map(tuple)


def _check_round_trip(model, x, cond=None):
    y, ld = model.forward(x, cond=cond)
    xb, ild = model.inverse(y, cond=cond)
    assert y.shape == x.shape and ld.shape == x.shape[:-1]
    np.testing.assert_allclose(xb, x, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(ld + ild, 0.0, atol=1e-10)


@SETTINGS
@given(
    dim=st.integers(1, 7), batch=batch_shapes, seed=st.integers(0, 2**16), scale=st.floats(0, 0.5)
)
def test_lulinear_round_trip(dim, batch, seed, scale):
    layer = invnet.LULinear(dim, param_dtype=jnp.float64, rngs=nnx.Rngs(seed))
    perturb(layer, scale, seed=seed)
    x = jax.random.normal(jax.random.key(seed + 1), (*batch, dim), jnp.float64)
    _check_round_trip(layer, x)


@SETTINGS
@given(
    dim=st.integers(2, 6),
    batch=batch_shapes,
    seed=st.integers(0, 2**16),
    cond_dim=st.integers(0, 2),
    slope=st.floats(0.05, 1.0),
)
def test_stack_round_trip(dim, batch, seed, cond_dim, slope):
    rngs = nnx.Rngs(seed)
    model = invnet.Sequential(
        invnet.LULinear(dim, param_dtype=jnp.float64, rngs=rngs),
        invnet.LeakyReLU(slope),
        invnet.AffineCoupling(
            dim, hidden=(4,), cond_dim=cond_dim, param_dtype=jnp.float64, rngs=rngs
        ),
        invnet.Permute(dim, rngs=rngs),
        invnet.AdditiveCoupling(
            dim, hidden=(4,), cond_dim=cond_dim, param_dtype=jnp.float64, rngs=rngs
        ),
    )
    perturb(model, 0.3, seed=seed)
    kx, kc = jax.random.split(jax.random.key(seed + 2))
    x = jax.random.normal(kx, (*batch, dim), jnp.float64) * 3
    cond = jax.random.normal(kc, (*batch, cond_dim), jnp.float64) if cond_dim else None
    _check_round_trip(model, x, cond)
