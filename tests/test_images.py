"""Image models end to end: Logit alone on pixels, compile, save/load, fit on a tiny Glow."""

from __future__ import annotations

import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import invnet


def _glow():
    flow = invnet.glow((4, 4, 1), levels=2, steps=1, hidden=4, rngs=nnx.Rngs(0))
    x = jax.random.uniform(jax.random.key(0), (8, 4, 4, 1), jnp.float64)
    invnet.data_init(flow, x)
    return flow, x


def test_logit_on_pixels_log_det_and_round_trip():
    layer = invnet.Logit(0.05)
    x = jax.random.uniform(jax.random.key(1), (6,), jnp.float64)
    y, ld = layer.forward(x)
    jac = jax.jacrev(lambda v: layer.forward(v)[0])(x)
    np.testing.assert_allclose(float(ld), float(jnp.linalg.slogdet(jac)[1]), atol=1e-10)
    x_back, ild = layer.inverse(y)
    assert float(jnp.max(jnp.abs(x_back - x))) <= 1e-12
    np.testing.assert_allclose(float(ild), -float(ld), atol=1e-12)


@pytest.mark.extended  # ~15 s
def test_glow_compile_and_save_load_match_eager():
    flow, x = _glow()
    z, ld = flow.forward(x)
    fast = invnet.freeze(flow)
    zc, ldc = fast.forward(x)
    # float32 parameters: compile rounds W and W^-1 (formed in float64) to float32 once
    np.testing.assert_allclose(zc, z, atol=1e-6)
    np.testing.assert_allclose(ldc, ld, atol=1e-6)
    np.testing.assert_allclose(fast.inverse(z)[0], flow.inverse(z)[0], atol=1e-6)
    with tempfile.TemporaryDirectory() as tmp:
        loaded = invnet.load(invnet.save(flow, os.path.join(tmp, "glow.invnet")))
    assert bool(jnp.array_equal(loaded.forward(x)[0], z))


@pytest.mark.extended  # ~11 s
def test_glow_trains_with_fit():
    flow, x = _glow()
    history = invnet.fit(flow, x, epochs=2, batch_size=4)
    assert np.all(np.isfinite(history.train_loss))


@pytest.mark.extended  # ~35 s
def test_reversible_and_verify_on_a_glow():
    """Reversible backprop and verify on image events (log-det of the batch shape)."""
    glow = invnet.glow((4, 4, 1), levels=2, steps=1, hidden=8, rngs=nnx.Rngs(0))
    x = jax.random.uniform(jax.random.key(0), (8, 4, 4, 1), jnp.float64)
    invnet.data_init(glow, x)
    rev = invnet.reversible(glow.bijector)

    def loss(m):
        y, log_det = m.forward(x)
        return jnp.mean(y**2) + jnp.mean(log_det)

    for a, b in zip(
        jax.tree.leaves(nnx.grad(loss)(rev)),
        jax.tree.leaves(nnx.grad(loss)(glow.bijector)),
        strict=True,
    ):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-8, atol=1e-10)
    assert invnet.verify(glow, x).ok
