"""MaskedAutoregressive (MAF / IAF): autoregressive structure, exact scanned inverse."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from registry import perturb

import invnet

D, C = 4, 2


def _block(transformer, cond_dim=0, hidden=(12, 12)):
    block = invnet.MaskedAutoregressive(
        D, transformer=transformer, hidden=hidden, cond_dim=cond_dim, bins=4,
        param_dtype=jnp.float64, rngs=nnx.Rngs(0),
    )  # fmt: skip
    return perturb(block, 0.5, seed=2)


@pytest.mark.parametrize("transformer", ["affine", "spline"])
def test_jacobian_is_lower_triangular_and_inverse_exact(transformer):
    block = _block(transformer, cond_dim=C)
    x = jax.random.normal(jax.random.key(0), (D,), jnp.float64)
    cond = jnp.asarray([0.3, -1.2])
    jac = nnx.jit(lambda b, v: jax.jacfwd(lambda u: b.forward(u, cond=cond)[0])(v))(block, x)
    np.testing.assert_array_equal(np.triu(jac, 1), 0.0)  # y_i depends on x_{<=i} only
    assert float(jnp.min(jnp.abs(jnp.diag(jac)))) > 0
    y, log_det = block.forward(x, cond=cond)
    x_back, inv_log_det = block.inverse(y, cond=cond)
    np.testing.assert_allclose(x_back, x, atol=1e-13)
    np.testing.assert_allclose(inv_log_det, -log_det, atol=1e-12)
    # the condition reaches every feature, the first included
    y_other, _ = block.forward(x, cond=cond + 1.0)
    assert bool(jnp.all(y_other != y))


def test_identity_at_init_and_masks_are_buffers():
    block = invnet.MaskedAutoregressive(D, hidden=(8,), rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (3, D))
    y, log_det = block.forward(x)
    np.testing.assert_array_equal(y, x)
    np.testing.assert_array_equal(log_det, 0.0)
    masks = jax.tree.leaves(nnx.state(block, invnet.Buffer))
    assert len(masks) == 2 and all(m.dtype == jnp.bool_ for m in masks)
    params = jax.tree.leaves(nnx.state(block, nnx.Param))
    assert all(p.dtype != jnp.bool_ for p in params)


def test_inverse_is_one_loop_not_unrolled():
    block = invnet.MaskedAutoregressive(6, hidden=(8,), rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(block)
    inverse = lambda s, y: nnx.merge(graphdef, s).inverse(y)  # noqa: E731 - the model passed in
    jaxpr = str(jax.make_jaxpr(inverse)(state, jnp.ones((2, 6))))
    looped = "scan" in jaxpr or "while" in jaxpr  # fori_loop with static bounds is a scan
    assert looped and jaxpr.count("dot_general") == 2  # the 2-layer MADE appears once


def test_iaf_is_the_inverse_and_round_trips():
    iaf = invnet.Inverse(_block("affine"))
    z = jax.random.normal(jax.random.key(2), (5, D), jnp.float64)
    x, log_det = iaf.forward(z)  # D sequential passes
    z_back, inv_log_det = iaf.inverse(x)  # one pass
    np.testing.assert_allclose(z_back, z, atol=1e-13)
    np.testing.assert_allclose(inv_log_det, -log_det, atol=1e-12)


def test_bad_settings_are_refused():
    for kwargs, match in (
        ({"transformer": "cubic"}, "transformer"),
        ({"cond_dim": -1}, "cond_dim"),
        ({"clamp": 0.0}, "clamp"),
        ({"transformer": "spline", "bins": 0}, "bins"),
        ({"activation": "softmax"}, "activation"),
    ):
        with pytest.raises(ValueError, match=match):
            invnet.MaskedAutoregressive(D, rngs=nnx.Rngs(0), **kwargs)
    assert invnet.MaskedAutoregressive(D, rngs=nnx.Rngs(0)).error_bound()[1] == "exp(2*clamp)"
