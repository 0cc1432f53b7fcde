"""Flow.log_prob reports non-finite inputs as non-finite values, for those samples only."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import invnet


def _flow(cond_dim=0):
    rngs = nnx.Rngs(0)
    flow = invnet.Flow(
        invnet.Sequential(
            invnet.LULinear(3, rngs=rngs),
            invnet.AffineCoupling(3, hidden=(8,), cond_dim=cond_dim, rngs=rngs),
            invnet.Permute(3, mode="reverse"),
            invnet.AffineCoupling(3, hidden=(8,), cond_dim=cond_dim, rngs=rngs),
        )
    )
    # move the couplings away from the identity, so they mix samples' features for real
    params = nnx.state(flow, nnx.Param)
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    leaves = [
        a + 0.3 * jax.random.normal(k, a.shape, a.dtype) for a, k in zip(leaves, keys, strict=True)
    ]
    nnx.update(flow, jax.tree.unflatten(tree, leaves))
    return flow


def test_nan_and_inf_inputs_give_nonfinite_log_prob_for_that_sample_only():
    flow = _flow()
    x = jax.random.normal(jax.random.key(0), (6, 3), jnp.float32)
    x = x.at[1, 0].set(jnp.nan).at[3, 2].set(jnp.inf).at[4, 1].set(-jnp.inf)
    traced = nnx.jit(lambda f, v: f.log_prob(v))  # the model passed in, as it should be
    for log_prob in (flow.log_prob, lambda v: traced(flow, v)):
        lp = np.asarray(log_prob(x))
        assert lp.shape == (6,)
        assert np.isnan(lp[1])  # NaN in -> NaN out, never a clipped finite number
        assert not np.isfinite(lp[3]) and not np.isfinite(lp[4])  # inf in -> NaN or -inf
        assert np.all(np.isfinite(lp[[0, 2, 5]]))
        clean = np.asarray(log_prob(x[jnp.array([0, 2, 5])]))
        # the others are untouched (to float32 rounding: another batch size, other kernels)
        np.testing.assert_allclose(lp[[0, 2, 5]], clean, rtol=1e-6)


def test_nan_condition_poisons_only_its_own_sample():
    flow = _flow(cond_dim=2)
    x = jax.random.normal(jax.random.key(0), (4, 3), jnp.float32)
    cond = jnp.ones((4, 2), jnp.float32).at[2, 1].set(jnp.nan)
    lp = np.asarray(flow.log_prob(x, cond=cond))
    assert np.isnan(lp[2]) and np.all(np.isfinite(lp[[0, 1, 3]]))
