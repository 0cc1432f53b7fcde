"""Slips a newcomer makes in the first hour: each gets an error that says what was wrong and
what to write instead (or the right answer), never a raw ``int()`` / ``ZeroDivisionError``."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import invnet
from invnet.layers.coupling import MLP


def test_conv_coupling_hidden_is_one_width():
    with pytest.raises(ValueError, match=r"hidden must be an integer >= 1.*got \(16, 16\).*one"):
        invnet.ConvAffineCoupling(4, hidden=(16, 16), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="hidden must be an integer >= 1.*got 0"):
        invnet.ConvAdditiveCoupling(4, hidden=0, rngs=nnx.Rngs(0))


@pytest.mark.parametrize(
    "build",
    [
        lambda h: invnet.AffineCoupling(4, hidden=h, rngs=nnx.Rngs(0)),
        lambda h: invnet.SplineCoupling(4, hidden=h, rngs=nnx.Rngs(0)),
        lambda h: invnet.MaskedAutoregressive(4, hidden=h, rngs=nnx.Rngs(0)),
        lambda h: invnet.spline_flow(2, layers=1, hidden=h, rngs=nnx.Rngs(0)),
        lambda h: MLP(2, h, 2, rngs=nnx.Rngs(0)),
    ],
)
def test_hidden_widths_checked(build):
    with pytest.raises(TypeError, match=r"list of hidden-layer widths.*hidden=\(\) for no"):
        build(0)
    with pytest.raises(TypeError, match=r"hidden=\(8,\) for one hidden layer of 8 units"):
        build(8)
    with pytest.raises(ValueError, match=r"every hidden width must be an integer >= 1.*\(4, 0\)"):
        build((4, 0))


def test_glow_counts_are_integers():
    with pytest.raises(ValueError, match="glow: levels must be an integer >= 1, got 2.5"):
        invnet.glow((8, 8, 1), levels=2.5, steps=1, hidden=4, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="glow: steps must be an integer >= 1, got 0"):
        invnet.glow((8, 8, 1), levels=1, steps=0, hidden=4, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="hidden must be an integer >= 1"):
        invnet.glow((8, 8, 1), levels=1, steps=1, hidden=0, rngs=nnx.Rngs(0))


def test_dequantize_takes_numpy_integers():
    layer = invnet.Dequantize(np.int64(256))
    assert layer.levels == 256 and isinstance(layer.levels, int)
    assert json.dumps(layer.to_spec()) == json.dumps(invnet.Dequantize(256).to_spec())
    y, _ = layer.forward(jnp.array([[0.5, 255.5]]))
    np.testing.assert_allclose(y, [[0.5 / 256, 255.5 / 256]], rtol=1e-6)


def test_log_prob_of_an_empty_batch_is_empty():
    glow = invnet.glow((4, 4, 1), levels=2, steps=1, hidden=4, rngs=nnx.Rngs(0))
    empty = jnp.zeros((0, 4, 4, 1))
    assert glow.log_prob(empty).shape == (0,)  # through Squeeze, FactorOut and Reshape
    y, log_det = invnet.Squeeze().forward(empty)
    assert y.shape == (0, 2, 2, 4) and log_det.shape == (0,)
    assert invnet.Squeeze().inverse(y)[0].shape == (0, 4, 4, 1)
    flow = invnet.spline_flow(2, layers=1, hidden=(4,), rngs=nnx.Rngs(0))
    assert flow.log_prob(jnp.zeros((0, 2))).shape == (0,)
