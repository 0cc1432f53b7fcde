"""Events of any rank, the one walk, and the core's input rules (issues 9 and 12)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import invnet
from invnet.walk import nodes, steps


def _image_model():
    return invnet.Sequential(
        invnet.ActNorm(2, event_ndim=3),
        invnet.LeakyReLU(0.5),  # takes rank 3 from its neighbours
        invnet.Reshape((4, 4, 2), (32,)),
        invnet.LULinear(32, rngs=nnx.Rngs(0)),
    )


def test_shapes_flow_through_a_sequential():
    model = _image_model()
    assert model.event_pattern() == (4, 4, 2) and model.output_pattern() == (32,)
    assert model.layers[1].event_ndim == 3
    x = jax.random.normal(jax.random.key(0), (2, 3, 4, 4, 2))
    invnet.data_init(model, x)
    y, log_det = model.forward(x)
    assert y.shape == (2, 3, 32) and log_det.shape == (2, 3)


def test_neighbours_that_do_not_fit_are_named():
    with pytest.raises(ValueError, match=r"layer 0 \(Reshape\).*layer 1 \(LULinear\)"):
        invnet.Sequential(invnet.Reshape((4, 4, 2), (32,)), invnet.LULinear(16, rngs=nnx.Rngs(0)))


def test_unconditional_model_refuses_cond():
    model = _image_model()
    x = jnp.ones((3, 4, 4, 2))
    with pytest.raises(ValueError, match="no conditional layer"):
        model.forward(x, cond=jnp.ones((3, 2)))
    flow = invnet.Flow(invnet.LULinear(3, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="no conditional layer"):
        flow.sample(jax.random.key(0), 4, cond=jnp.ones(2))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_inputs_are_refused(dtype):
    layer = invnet.LULinear(3, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="float32 or float64"):
        layer.forward(jnp.ones((2, 3), dtype))


@pytest.mark.parametrize("n", [-1, 2.5, True])
def test_sample_count_is_checked(n):
    flow = invnet.Flow(invnet.LULinear(3, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="number of samples"):
        flow.sample(jax.random.key(0), n)


def test_sample_and_sample_and_log_prob_take_the_same_arguments():
    flow = invnet.Flow(invnet.LULinear(3, rngs=nnx.Rngs(0)))
    x = flow.sample(7, 5, temperature=0.5)
    x2, log_p = flow.sample_and_log_prob(7, 5, temperature=0.5)
    assert jnp.allclose(x, x2, atol=1e-6)
    assert jnp.allclose(log_p, flow.log_prob(x2), atol=1e-4)


def test_the_walk_opens_every_chain():
    inner = invnet.Sequential(invnet.LULinear(3, rngs=nnx.Rngs(0)), invnet.LeakyReLU(0.5))
    model = invnet.reversible(invnet.Flow(invnet.Inverse(inner)))
    names = [(s.name, type(s.layer).__name__, s.inverted) for s in steps(model)]
    assert names == [
        ("model.model.bijector.bijector[1]", "LeakyReLU", True),
        ("model.model.bijector.bijector[0]", "LULinear", True),
    ]
    assert len(list(nodes(model))) == 6


def test_single_block_scan_runs():
    block = invnet.AffineCoupling(4, hidden=(8,), rngs=nnx.Rngs(0))
    y, _ = invnet.reversible(block, scan=True).forward(jnp.ones((2, 4)))
    assert jnp.allclose(y, block.forward(jnp.ones((2, 4)))[0])
