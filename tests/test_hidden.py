"""Hidden layers: intermediates, exact inversion from layer k, input_for_hidden, saliency."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from registry import perturb

import invnet
from invnet.verification import SAFETY, layer_bound
from tests.test_verify import D


@pytest.fixture(scope="module")
def model():
    rngs = nnx.Rngs(0)
    net = invnet.Sequential(
        invnet.LULinear(D, rngs=rngs),
        invnet.LeakyReLU(0.3),
        invnet.AffineCoupling(D, hidden=(8,), rngs=rngs),
        invnet.LULinear(D, rngs=rngs),
    )
    return perturb(net)


def documented_tol(sub, dtype):
    """hidden.py's documented accuracy: verify's rule min(10 D eps kappa, sqrt(eps))."""
    eps = float(jnp.finfo(dtype).eps)
    kappa = float(np.prod([layer_bound(layer)[0] for layer in sub])) if len(sub) else 1.0
    return min(SAFETY * D * eps * kappa, eps**0.5)


def test_inverse_from_layer_k_reproduces_the_input(model):
    dtype = jnp.float32
    x = jax.random.normal(jax.random.key(0), (16, D), dtype)
    y, _, hs = model.forward(x, return_intermediates=True)
    assert jnp.array_equal(hs[-1], y)
    for k in range(len(model) + 1):
        h = model[:k](x)
        if k:
            assert jnp.array_equal(h, hs[k - 1])
        x_back, _ = model[:k].inverse(h)
        scale = jnp.maximum(jnp.abs(x).max(-1), jnp.abs(h).max(-1))
        rel = float(jnp.max(jnp.abs(x_back - x).max(-1) / scale))
        assert rel <= documented_tol(model[:k], dtype), (k, rel)


def test_input_for_hidden_sets_the_unit_and_keeps_the_rest(model):
    x = jax.random.normal(jax.random.key(1), (16, D), jnp.float32)
    tol = documented_tol(model[:3], jnp.float32)
    for unit, value in [(1, 0.0), ([0, 3], jnp.asarray([2.0, -1.0]))]:
        x_new = invnet.input_for_hidden(model, x, layer=3, unit=unit, value=value)
        h_new, h_old = model[:3](x_new), model[:3](x)
        units = [unit] if isinstance(unit, int) else unit
        others = [j for j in range(D) if j not in units]
        scale = float(jnp.abs(h_old).max())
        target = jnp.broadcast_to(jnp.asarray(value, h_new.dtype), (16, len(units)))
        assert jnp.allclose(h_new[:, units], target, atol=tol * scale)
        assert jnp.allclose(h_new[:, others], h_old[:, others], atol=tol * scale)
        assert not jnp.allclose(x_new, x, atol=1e-3)  # the input really had to change
    with pytest.raises(ValueError, match=r"\[0, 4\]"):
        invnet.input_for_hidden(model, x, layer=7, unit=0)


def test_saliency_matches_the_analytic_jacobian(model):
    x = jax.random.normal(jax.random.key(2), (2, 3, D), jnp.float64)
    w = model[0].weight(jnp.float64)
    jac1 = invnet.saliency(model, x, layer=1)  # h_1 = W x + b
    assert jac1.shape == (2, 3, D, D) and jnp.allclose(jac1, w, atol=1e-12)
    h1 = model[:1](x)
    slope = jnp.where(h1 < 0, 0.3, 1.0)  # h_2 = leaky(h_1): diag(slope) W
    assert jnp.allclose(invnet.saliency(model, x, layer=2), slope[..., None] * w, atol=1e-12)
    full = nnx.jit(lambda m, v: jax.vmap(jax.jacfwd(m))(v))(model, x.reshape(-1, D))
    full = full.reshape(2, 3, D, D)
    assert jnp.allclose(invnet.saliency(model, x, output=2), full[..., 2, :], atol=1e-12)
    assert jnp.allclose(invnet.saliency(model, x, output=[3, 0]), full[..., [3, 0], :], atol=1e-12)
    with pytest.raises(ValueError, match="out of range"):
        invnet.saliency(model, x, output=D)


def test_saliency_of_a_conditional_model():
    block = perturb(invnet.AffineCoupling(D, hidden=(8,), cond_dim=2, rngs=nnx.Rngs(0)))
    x = jax.random.normal(jax.random.key(3), (5, D), jnp.float64)
    cond = jnp.ones(2)
    jac = invnet.saliency(block, x, cond=cond)
    ref = jax.vmap(jax.jacfwd(lambda v: block(v, cond=cond)))(x)
    assert jnp.allclose(jac, ref, atol=1e-12)
    with pytest.raises(ValueError, match="conditional"):
        invnet.saliency(block, x)


@pytest.mark.extended  # slow; CI runs it
def test_saliency_on_images_is_per_pixel():
    """An image model's saliency has the image's shape (it used to treat the last axis,
    the channels, as the model's input)."""
    rngs = nnx.Rngs(0)
    model = perturb(
        invnet.Sequential(
            invnet.Squeeze(),  # (4, 4, 2) -> (2, 2, 8)
            invnet.Conv1x1(8, param_dtype=jnp.float64, rngs=rngs),
            invnet.Reshape((2, 2, 8), (32,)),
            invnet.LeakyReLU(0.5),
        )
    )
    x = jax.random.normal(jax.random.key(4), (3, 4, 4, 2), jnp.float64)
    flat = lambda v: model(v).reshape(-1)  # noqa: E731
    full = jax.vmap(jax.jacrev(flat))(x)  # (3, 32, 4, 4, 2)
    assert invnet.saliency(model, x, output=5).shape == (3, 4, 4, 2)
    np.testing.assert_allclose(invnet.saliency(model, x, output=5), full[:, 5], atol=1e-12)
    np.testing.assert_allclose(
        invnet.saliency(model, x, output=[7, 1]), full[:, [7, 1]], atol=1e-12
    )
    np.testing.assert_allclose(invnet.saliency(model, x), full, atol=1e-12)
    # a hidden state that is still an image: the Jacobian has both image shapes
    jac = invnet.saliency(model, x, layer=1)
    assert jac.shape == (3, 2, 2, 8, 4, 4, 2)
    with pytest.raises(ValueError, match="out of range"):
        invnet.saliency(model, x, output=32)
    with pytest.raises(ValueError, match=r"events of shape \(4, 4, 2\)"):
        invnet.saliency(model, x[..., :1])
