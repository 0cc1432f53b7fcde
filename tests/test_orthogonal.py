"""Householder: orthogonal, no NaN for a zero vector, float32 stacks do not drift with depth."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import invnet


def test_matrix_is_orthogonal_with_the_stated_determinant():
    for reflections in (1, 3, 6):
        layer = invnet.Householder(6, reflections=reflections, param_dtype=jnp.float64,
                                   rngs=nnx.Rngs(reflections))  # fmt: skip
        q = layer.matrix()
        np.testing.assert_allclose(q @ q.T, np.eye(6), atol=1e-14)
        assert round(float(jnp.linalg.det(q))) == (-1) ** reflections
    assert invnet.Householder(6, rngs=nnx.Rngs(0)).reflections == 6  # default: dim
    assert layer.error_bound() == (1.0, "orthogonal")


def test_zero_vector_is_the_identity_without_nan():
    layer = invnet.Householder(3, reflections=1, param_dtype=jnp.float64, rngs=nnx.Rngs(0))
    layer.vectors[...] = jnp.zeros((1, 3))
    x = jnp.asarray([[1.0, -2.0, 3.0]])
    np.testing.assert_array_equal(layer.forward(x)[0], x)
    grad = jax.grad(lambda m: jnp.sum(m.forward(x)[0] ** 2))(layer)
    assert bool(jnp.all(jnp.isfinite(grad.vectors[...])))


def test_float32_round_trip_does_not_grow_with_depth():
    x = jax.random.normal(jax.random.key(0), (1024, 16), jnp.float32)

    def error(depth):
        model = invnet.Sequential(*[invnet.Householder(16, rngs=nnx.Rngs(i)) for i in range(depth)])
        e = model.inverse(model(x))[0] - x
        return float(jnp.sqrt(jnp.mean(e**2))), float(jnp.max(jnp.abs(e)))

    (shallow, _), (deep, deep_max) = error(4), error(32)
    # orthogonal layers add rounding errors, never multiply them: the RMS error grows about
    # as sqrt(depth) (2.8x from 4 to 32 layers; linear growth would be 8x). The RMS over
    # 16k entries, not the max of 1k entries, whose ratio reached 4.6x on one CPU
    assert deep <= 4 * shallow and deep_max < 1e-4


def test_compiled_uses_the_float64_matrix():
    layer = invnet.Householder(8, rngs=nnx.Rngs(3))
    fast = invnet.freeze(layer)
    x = jax.random.normal(jax.random.key(1), (16, 8), jnp.float32)
    y = fast.forward(x)[0]
    np.testing.assert_allclose(y, layer(x), atol=1e-5)
    q = layer.prepare()["q"]
    np.testing.assert_allclose(np.asarray(q, np.float64) @ np.asarray(q, np.float64).T,
                               np.eye(8), atol=1e-6)  # fmt: skip
    assert float(jnp.max(jnp.abs(fast.inverse(y)[0] - x))) < 1e-5
