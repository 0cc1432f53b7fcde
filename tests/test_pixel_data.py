"""Dequantisation, the Dequantize layer and bits per dimension of discrete pixels."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import invnet

LEVELS = 16


def _pixels(shape, seed=0):
    return np.random.default_rng(seed).integers(0, LEVELS, shape)


def test_dequantize_adds_noise_within_each_bin():
    pixels = _pixels((50, 4))
    x = np.asarray(invnet.dequantize(0, pixels, levels=LEVELS))
    assert x.dtype == np.float32
    assert np.all(x >= pixels) and np.all(x < pixels + 1)
    assert np.std(x - pixels) > 0.2  # noise, not a constant offset
    x64 = invnet.dequantize(jax.random.key(1), pixels.astype(np.float64), dtype=jnp.float64)
    assert x64.dtype == jnp.float64


@pytest.mark.parametrize(
    "pixels, match",
    [(np.array([[0.5, 1.0]]), "whole numbers"), (np.array([[-1, 2]]), "0..15"),
     (np.array([[0, 16]]), "0..15"), (np.array([[np.nan, 1.0]]), "whole numbers")],
)  # fmt: skip
def test_dequantize_refuses_pixels_that_are_not_levels(pixels, match):
    with pytest.raises(ValueError, match=match):
        invnet.dequantize(0, pixels, levels=LEVELS)


def test_dequantize_layer_scales_to_the_unit_interval_with_its_log_det():
    layer = invnet.Dequantize(LEVELS, event_ndim=3)
    x = invnet.dequantize(0, _pixels((2, 4, 4, 1)))
    y, log_det = layer.forward(x)
    assert float(y.min()) >= 0 and float(y.max()) < 1
    np.testing.assert_allclose(log_det, [-16 * np.log(LEVELS)] * 2, rtol=1e-6)
    x_back, inv = layer.inverse(y)
    np.testing.assert_allclose(x_back, x, rtol=1e-6)
    np.testing.assert_allclose(inv, -log_det)
    for bad in (1, 0, float("nan"), True, "256"):
        with pytest.raises(ValueError, match="levels"):
            invnet.Dequantize(bad)


def _vector_flow(with_layer: bool):
    rngs = nnx.Rngs(0)
    layers = [invnet.Logit(0.05), invnet.AffineCoupling(4, hidden=(8,), rngs=rngs)]
    if with_layer:
        layers.insert(0, invnet.Dequantize(LEVELS))
    return invnet.Flow(invnet.Sequential(*layers))


def test_bits_per_dim_accounts_for_the_scale_of_the_flows_input():
    """A flow that scales inside (Dequantize) and the same flow fed pre-scaled data give
    the same bits/dim: the scale's log-det and the `scale` correction agree."""
    pixels = _pixels((32, 4))
    inside = invnet.bits_per_dim(_vector_flow(True), pixels, key=3, levels=LEVELS)
    outside = invnet.bits_per_dim(_vector_flow(False), pixels, key=3, scale=1 / LEVELS)
    assert inside.shape == (32,)
    np.testing.assert_allclose(inside, outside, rtol=1e-5)
    # by hand: the same noise, the density of the dequantised pixels in bits per value
    x = invnet.dequantize(jax.random.fold_in(jax.random.key(3), 0), pixels)
    by_hand = -_vector_flow(True).log_prob(x) / (4 * float(np.log(2)))  # a weak scalar
    np.testing.assert_allclose(inside, by_hand, rtol=1e-5)
    averaged = invnet.bits_per_dim(_vector_flow(True), pixels, key=3, samples=3)
    assert averaged.shape == (32,) and bool(jnp.all(jnp.isfinite(averaged)))


@pytest.mark.extended  # ~9 s
def test_a_fitted_flow_beats_the_uniform_model_on_structured_pixels():
    """Pixels near 0 or 15 (like digits; entropy 1.92 bits per value): a short fit of a
    spline flow must beat the uniform model's log2(16) = 4 by a clear margin."""
    rng = np.random.default_rng(0)
    pixels = np.where(rng.uniform(size=(512, 4)) < 0.5, 0, LEVELS - 1)
    pixels = np.clip(pixels + rng.integers(-1, 2, pixels.shape), 0, LEVELS - 1)
    rngs = nnx.Rngs(0)
    flow = invnet.Flow(invnet.Sequential(
        invnet.Dequantize(LEVELS), invnet.Logit(0.05), invnet.ActNorm(4),
        invnet.SplineCoupling(4, hidden=(16,), rngs=rngs), invnet.Permute(4, rngs=rngs),
        invnet.SplineCoupling(4, hidden=(16,), rngs=rngs),
    ))  # fmt: skip
    x = invnet.dequantize(1, pixels, levels=LEVELS)
    invnet.fit(flow, x, epochs=30, batch_size=128, key=0, progress=False)
    bpd = float(invnet.bits_per_dim(flow, pixels, key=2, levels=LEVELS).mean())
    assert bpd < np.log2(LEVELS) - 1.0, bpd


def test_bits_per_dim_on_an_image_flow_and_a_bare_bijector():
    glow = invnet.glow((4, 4, 1), levels=1, steps=1, hidden=4, rngs=nnx.Rngs(0))
    pixels = _pixels((6, 4, 4, 1))
    bpd = invnet.bits_per_dim(glow, pixels, key=0, scale=1 / LEVELS)
    assert bpd.shape == (6,) and bool(jnp.all(jnp.isfinite(bpd)))
    bare = invnet.Sequential(invnet.Dequantize(LEVELS), invnet.Logit(0.05))
    flow = invnet.Flow(bare)
    np.testing.assert_allclose(
        invnet.bits_per_dim(bare, _pixels((5, 4)), key=0),
        invnet.bits_per_dim(flow, _pixels((5, 4)), key=0),
        rtol=1e-6,
    )


def test_bits_per_dim_refuses_bad_arguments():
    flow = _vector_flow(True)
    pixels = _pixels((4, 4))
    with pytest.raises(ValueError, match="scale"):
        invnet.bits_per_dim(flow, pixels, key=0, scale=0)
    with pytest.raises(ValueError, match="samples"):
        invnet.bits_per_dim(flow, pixels, key=0, samples=0)
    with pytest.raises(ValueError, match="whole numbers"):
        invnet.bits_per_dim(flow, pixels + 0.5, key=0)
    with pytest.raises(TypeError, match="key"):
        invnet.bits_per_dim(flow, pixels, key="seed")


def test_bits_per_dim_refuses_a_scale_the_flow_was_not_trained_on():
    """A Glow fitted to (pixels + u) / 16 scored at the default scale=1 returned a huge,
    silently wrong figure (198,164 instead of 8.34 at 256 levels); the reverse too."""
    glow = invnet.glow((4, 4, 1), levels=1, steps=1, hidden=4, rngs=nnx.Rngs(0))
    pixels = _pixels((32, 4, 4, 1))
    invnet.data_init(glow, invnet.dequantize(1, pixels) / LEVELS)  # trained on [0, 1]
    right = invnet.bits_per_dim(glow, pixels, key=0, scale=1 / LEVELS)
    assert float(right.mean()) < np.log2(LEVELS) + 4
    with pytest.raises(ValueError, match=r"Pass scale=1/16"):
        invnet.bits_per_dim(glow, pixels, key=0)
    vector = _vector_flow(True)  # starts with Dequantize: takes the levels themselves
    invnet.bits_per_dim(vector, _pixels((32, 4)), key=0, levels=LEVELS)
    with pytest.raises(ValueError, match=r"Pass scale=1 "):
        invnet.bits_per_dim(vector, _pixels((32, 4)), key=0, scale=1 / LEVELS)
