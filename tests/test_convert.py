"""from_dense: square leaky-ReLU networks become exact invnet models; others are refused."""

import jax.numpy as jnp
import numpy as np
import pytest

import invnet

D = 5


def numpy_net(x, layers):
    for layer in layers:
        if layer[0] == "dense":
            x = x @ layer[1].T + layer[2]
        elif layer[0] == "leaky_relu":
            x = np.where(x < 0, layer[1] * x, x)
    return x


def random_net(seed=0):
    rng = np.random.default_rng(seed)
    return [
        ("dense", rng.normal(size=(D, D)), rng.normal(size=D)),
        ("leaky_relu", 0.1),
        ("dense", rng.normal(size=(D, D)), rng.normal(size=D)),
        "identity",
        ("leaky_relu", 0.5),
        ("dense", rng.normal(size=(D, D)), np.zeros(D)),
    ]


def test_round_trip_of_random_square_network():
    layers = random_net()
    model = invnet.from_dense(layers)
    assert [type(m).__name__ for m in model] == ["LULinear", "LeakyReLU", "LULinear"] + [
        "LeakyReLU",
        "LULinear",
    ]
    x = np.random.default_rng(1).normal(size=(32, D))
    y, log_det = model.forward(jnp.asarray(x))
    np.testing.assert_allclose(y, numpy_net(x, layers), rtol=1e-10, atol=1e-10)  # float64 here
    x_back, inv_log_det = model.inverse(y)
    np.testing.assert_allclose(x_back, x, atol=1e-9)
    np.testing.assert_allclose(inv_log_det, -log_det, atol=1e-9)


def test_keras_layout_and_dict_format_give_the_same_model():
    layers = random_net(2)
    dicts = []
    for item in layers:
        if item == "identity":
            dicts.append({"type": "identity"})
        elif item[0] == "dense":
            dicts.append({"type": "dense", "weight": item[1].T, "bias": item[2]})
        else:
            dicts.append({"type": "leaky_relu", "negative_slope": item[1]})
    a, b = invnet.from_dense(layers), invnet.from_dense(dicts, weight_layout="in_out")
    x = jnp.asarray(np.random.default_rng(3).normal(size=(4, D)))
    np.testing.assert_allclose(a(x), b(x), rtol=1e-12)


def test_784_to_10_layer_is_refused_with_the_explanation():
    rng = np.random.default_rng(0)
    with pytest.raises(invnet.NotInvertibleError) as info:
        invnet.from_dense([("dense", rng.normal(size=(10, 784)), np.zeros(10)), "identity"])
    msg = str(info.value)
    assert isinstance(info.value, ValueError)
    for phrase in ("784->10", "only 10 of the 784", "pinv", "minimum-norm", "noise", "[y, z]"):
        assert phrase in msg, phrase


def test_relu_network_is_refused_and_every_problem_listed():
    rng = np.random.default_rng(0)
    singular = rng.normal(size=(D, D))
    singular[-1] = singular[0]
    with pytest.raises(invnet.NotInvertibleError) as info:
        invnet.from_dense(
            [
                ("dense", rng.normal(size=(D, D)), np.zeros(D)),
                "relu",
                ("dense", singular),
                ("tanh",),
                ("leaky_relu", 0.0),
            ]
        )
    msg = str(info.value)
    assert "layer 1 (relu)" in msg and "leaky ReLU" in msg and "no inverse exists" in msg
    assert "layer 2 (dense 5->5)" in msg and "rank 4 < 5" in msg
    assert "layer 3 (tanh)" in msg and "layer 4 (leaky_relu)" in msg
    with pytest.raises(ValueError, match="not understood"):
        invnet.from_dense([42])
