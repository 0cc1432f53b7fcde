"""from_dense: square leaky-ReLU networks become exact invnet models; others are refused."""

import jax
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
    model = invnet.from_dense(layers, weight_layout="out_in")
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
    a = invnet.from_dense(layers, weight_layout="out_in")
    b = invnet.from_dense(dicts, weight_layout="in_out")
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
                ("softmax",),
                ("leaky_relu", 0.0),
            ],
            weight_layout="out_in",
        )
    msg = str(info.value)
    assert "layer 1 (relu)" in msg and "leaky ReLU" in msg and "no inverse exists" in msg
    assert "layer 2 (dense 5->5)" in msg and "rank 4 < 5" in msg
    assert "layer 3 (softmax)" in msg and "layer 4 (leaky_relu)" in msg
    with pytest.raises(ValueError, match="not understood"):
        invnet.from_dense([42])


def test_tanh_sigmoid_and_default_leaky_slope_network():
    rng = np.random.default_rng(4)
    w1, b1, w2 = rng.normal(size=(D, D)), rng.normal(size=D), rng.normal(size=(D, D))
    model = invnet.from_dense(
        [("dense", w1, b1), "tanh", ("dense", w2), "leaky_relu", ("dense", w1), ("sigmoid",)],
        weight_layout="out_in",
    )
    kinds = [type(m).__name__ for m in model]
    assert kinds == ["LULinear", "Tanh", "LULinear", "LeakyReLU", "LULinear", "Sigmoid"]
    assert model[3].negative_slope == 0.01  # PyTorch's default
    x = rng.normal(size=(16, D)) * 0.3
    h = np.tanh(x @ w1.T + b1) @ w2.T
    want = 1 / (1 + np.exp(-(np.where(h < 0, 0.01 * h, h) @ w1.T)))
    y, log_det = model.forward(jnp.asarray(x))
    np.testing.assert_allclose(y, want, rtol=1e-10)
    x_back, inv_log_det = model.inverse(y)
    np.testing.assert_allclose(x_back, x, atol=1e-7)  # float64; 1/slope = 100 amplifies
    np.testing.assert_allclose(inv_log_det, -log_det, atol=1e-8)


def test_state_dict_of_a_torch_sequential():
    rng = np.random.default_rng(5)
    w0, b0, w2, b2 = (rng.normal(size=s) for s in ((D, D), D, (D, D), D))
    # torch: Sequential(Linear, LeakyReLU(0.2), Linear, Tanh) -> keys 0.* and 2.*
    state = {"net.0.weight": w0, "net.0.bias": b0, "net.2.weight": w2, "net.2.bias": b2}
    model = invnet.from_dense(state, activations={1: ("leaky_relu", 0.2), 3: "tanh"})
    listed = invnet.from_dense(
        [("dense", w0, b0), ("leaky_relu", 0.2), ("dense", w2, b2), "tanh"], weight_layout="out_in"
    )
    x = jnp.asarray(rng.normal(size=(4, D)))
    np.testing.assert_allclose(model(x), listed(x), rtol=1e-12)
    # one spec for several dense layers: the state_dict cannot say whether an activation
    # follows the last Linear (it used to be dropped silently); both mappings are spelled out
    both = r"=\{1: 'sigmoid'\} if .*=\{1: 'sigmoid', 3: 'sigmoid'\}"
    with pytest.raises(ValueError, match=both):
        invnet.from_dense(state, activations="sigmoid")
    with pytest.raises(ValueError, match=r"module 1 .*activations=\{1: 'tanh'\}"):
        invnet.from_dense(state)
    with pytest.raises(ValueError, match="'0.running_mean'"):
        invnet.from_dense({"0.weight": w0, "0.running_mean": b0})
    with pytest.raises(ValueError, match="hold weights"):
        invnet.from_dense(state, activations={2: "tanh"})


def test_keras_kernel_read_as_torch_names_weight_layout():
    rng = np.random.default_rng(6)
    kernel, bias = rng.normal(size=(784, 10)), np.zeros(10)  # Keras Dense(10) on 784 inputs
    with pytest.raises(invnet.NotInvertibleError, match="weight_layout='in_out'"):
        invnet.from_dense([("dense", kernel, bias)])
    with pytest.raises(invnet.NotInvertibleError, match="weight_layout='out_in'"):
        invnet.from_dense([("dense", kernel.T, bias)], weight_layout="in_out")
    # the other way round the message is about the lost dimensions, with no layout hint
    with pytest.raises(invnet.NotInvertibleError) as info:
        invnet.from_dense([("dense", kernel.T, bias)])
    assert "weight_layout" not in str(info.value)


@pytest.mark.parametrize("dtype", ["float32", pytest.param("float64", marks=pytest.mark.extended)])
def test_tanh_and_sigmoid_domain_and_log_det(dtype):
    x = jnp.asarray([-30.0, -9.5, -3.0, -1e-8, 0.0, 0.5, 3.0, 9.5, 30.0], dtype)[:, None]
    xs = np.abs(np.asarray(x, np.float64))
    # float64 references: log(1 - tanh^2) = 2 (log 2 - |x| - log1p(e^-2|x|)), log sig'(x)
    tanh_exact = 2 * (np.log(2) - xs - np.log1p(np.exp(-2 * xs)))
    sigmoid_exact = -np.logaddexp(0, -xs) - np.logaddexp(0, xs)
    for layer, exact in ((invnet.Tanh(), tanh_exact), (invnet.Sigmoid(), sigmoid_exact)):
        y, log_det = layer.forward(x)
        assert y.dtype == x.dtype and bool(jnp.all(jnp.isfinite(log_det)))
        np.testing.assert_allclose(log_det, exact[:, 0], rtol=1e-6, atol=1e-6)
        grads = jax.grad(lambda v, m=layer: jnp.sum(m.forward(v)[1]))(x)
        assert bool(jnp.all(jnp.isfinite(grads)))
    for layer, (lo, hi) in ((invnet.Tanh(), (-1.0, 1.0)), (invnet.Sigmoid(), (0.0, 1.0))):
        y = jnp.asarray([lo - 0.5, lo, hi, hi + 0.5], dtype)[:, None]
        with pytest.warns(invnet.NonFiniteWarning, match="4 of 4 samples"):  # said, not silent
            x_back, log_det = layer.inverse(y)
        assert np.isnan(x_back[0, 0]) and np.isnan(x_back[3, 0])
        assert x_back[1, 0] == -np.inf and x_back[2, 0] == np.inf
        ok = jnp.asarray([[0.3]], dtype)
        np.testing.assert_allclose(layer.forward(layer.inverse(ok)[0])[0], ok, rtol=1e-6)


def test_tanh_sigmoid_error_bounds_are_stated():
    for layer in (invnet.Tanh(), invnet.Sigmoid()):
        bound, rule = layer.error_bound()
        assert bound == float("inf") and "unbounded" in rule


def test_square_array_needs_its_layout_and_flax_modules_are_read_right():
    """A square Flax/Keras kernel read as PyTorch's (out, in) gave the transposed network
    without a word; now an array's layout must be said, and modules carry their own."""
    from flax import nnx

    linear = nnx.Linear(3, 3, rngs=nnx.Rngs(0))
    kernel, bias = np.asarray(linear.kernel[...]), np.asarray(linear.bias[...])
    with pytest.raises(ValueError, match="square .*weight_layout='out_in'.*'in_out'"):
        invnet.from_dense([("dense", kernel, bias)])
    x = jnp.asarray(np.random.default_rng(7).normal(size=(4, 3)), jnp.float32)
    want = np.tanh(np.asarray(linear(x)))
    for model in (
        invnet.from_dense([("dense", kernel, bias), "tanh"], weight_layout="in_out"),
        invnet.from_dense([linear, nnx.tanh]),
        invnet.from_dense(nnx.Sequential(linear, nnx.tanh)),
    ):
        assert [type(m).__name__ for m in model] == ["LULinear", "Tanh"]
        np.testing.assert_allclose(model(x), want, rtol=1e-5, atol=1e-6)
    with pytest.raises(invnet.NotInvertibleError, match="relu"):
        invnet.from_dense([linear, nnx.relu])


class _KerasDense:  # what from_dense reads of a keras.layers.Dense, without keras
    def __init__(self, kernel, bias, activation):
        self.kernel, self.bias, self.activation = kernel, bias, activation

    def get_weights(self):
        return [self.kernel, self.bias]

    def get_config(self):
        return {"units": self.kernel.shape[1], "activation": self.activation}


_KerasDense.__name__ = "Dense"


class LeakyReLU:  # keras.layers.LeakyReLU's interface (Keras's default slope is 0.3)
    def get_weights(self):
        return []

    def get_config(self):
        return {"negative_slope": 0.3}


def test_keras_like_layers_keep_their_activations():
    rng = np.random.default_rng(8)
    k1, b1, k2, b2 = (
        rng.normal(size=(D, D)),
        rng.normal(size=D),
        rng.normal(size=(D, D)),
        np.zeros(D),
    )
    dense1, dense2 = _KerasDense(k1, b1, "tanh"), _KerasDense(k2, b2, "linear")
    model = invnet.from_dense([dense1, LeakyReLU(), dense2])
    assert [type(m).__name__ for m in model] == ["LULinear", "Tanh", "LeakyReLU", "LULinear"]
    x = rng.normal(size=(4, D)) * 0.3
    h = np.tanh(x @ k1 + b1)
    want = np.where(h < 0, 0.3 * h, h) @ k2 + b2
    np.testing.assert_allclose(model(jnp.asarray(x)), want, rtol=1e-10, atol=1e-12)


def test_state_dict_keeps_a_trailing_activation():
    """torch Sequential(Linear, Tanh): one spec used to be dropped (one LULinear came back)."""
    rng = np.random.default_rng(9)
    w, b = rng.normal(size=(D, D)), rng.normal(size=D)
    model = invnet.from_dense({"0.weight": w, "0.bias": b}, activations="tanh")
    assert [type(m).__name__ for m in model] == ["LULinear", "Tanh"]
    x = rng.normal(size=(4, D)) * 0.3
    np.testing.assert_allclose(model(jnp.asarray(x)), np.tanh(x @ w.T + b), rtol=1e-12)


def test_ill_conditioned_matrix_is_built_with_a_warning_that_verify_would_fail():
    """A cond-1e6 matrix was accepted silently in float32, then invnet.verify failed it."""
    rng = np.random.default_rng(10)
    q1, _ = np.linalg.qr(rng.normal(size=(D, D)))
    q2, _ = np.linalg.qr(rng.normal(size=(D, D)))
    w = q1 @ np.diag(np.logspace(0, -6, D)) @ q2  # condition number 1e6
    with pytest.warns(RuntimeWarning, match=r"condition number 1e\+06.*float64"):
        invnet.from_dense([("dense", w)], weight_layout="out_in", param_dtype=jnp.float32)
    invnet.from_dense([("dense", w)], weight_layout="out_in", param_dtype=jnp.float64)  # fine
