"""Per-family checks beyond the shared contract: construction errors, bad input, math."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from registry import perturb

import invnet


def test_leaky_relu_refuses_non_invertible_slopes():
    with pytest.raises(ValueError, match="ReLU"):
        invnet.LeakyReLU(0.0)
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="slope"):
            invnet.LeakyReLU(bad)
    with pytest.raises(ValueError, match="open interval"):
        invnet.LeakyReLU(1.0, learnable=True)
    assert invnet.LeakyReLU(1.0).forward(jnp.array([-2.0]))[0][0] == -2.0


def test_learned_slope_stays_in_range():
    act = invnet.LeakyReLU(0.2, learnable=True)
    for theta in (-50.0, 0.0, 50.0):
        act.theta[...] = jnp.asarray(theta, jnp.float32)
        a = float(act.slope())
        assert 0.0 <= a <= 1.0


def test_from_matrix_refuses_non_square_singular_non_finite():
    with pytest.raises(ValueError, match=r"square.*\(10, 784\)"):
        invnet.LULinear.from_matrix(np.ones((10, 784)))
    singular = np.array([[1.0, 2.0], [2.0, 4.0]])
    with pytest.raises(ValueError, match="condition number"):
        invnet.LULinear.from_matrix(singular)
    with pytest.raises(ValueError, match="non-finite"):
        invnet.LULinear.from_matrix(np.array([[1.0, np.nan], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="bias"):
        invnet.LULinear.from_matrix(np.eye(3), np.ones(4))


def test_from_matrix_reproduces_the_matrix():
    rng = np.random.default_rng(1)
    w, b = rng.normal(size=(6, 6)), rng.normal(size=6)
    layer = invnet.LULinear.from_matrix(w, b, param_dtype=jnp.float64)
    np.testing.assert_allclose(layer.weight(), w, atol=1e-12)
    x = rng.normal(size=(4, 6))
    y, log_det = layer.forward(jnp.asarray(x))
    np.testing.assert_allclose(y, x @ w.T + b, atol=1e-12)
    np.testing.assert_allclose(log_det, np.linalg.slogdet(w)[1], atol=1e-12)


def test_from_matrix_names_the_real_problem():
    cases = [
        (np.ones(3), ValueError, r"one square \(D, D\) matrix, got a 1-D array of shape \(3,\)"),
        (np.ones((2, 3, 3)), ValueError, r"3-D array of shape \(2, 3, 3\).*one LULinear per"),
        (np.zeros((0, 0)), ValueError, r"empty \(0x0\)"),
        (np.eye(2) * (1 + 1j), TypeError, "complex"),
        (np.array([["a", "b"], ["c", "d"]]), TypeError, "real numbers, got dtype <U1"),
    ]
    for weight, error, message in cases:
        with pytest.raises(error, match=message):
            invnet.LULinear.from_matrix(weight)
    with pytest.raises(TypeError, match="float32 or float64"):
        invnet.LULinear.from_matrix(np.eye(2), param_dtype=jnp.float16)


def _with_condition(condition, dim=8):
    rng = np.random.default_rng(0)
    q1, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
    q2, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
    return q1 @ np.diag(np.logspace(0, -np.log10(condition), dim)) @ q2.T


def test_from_matrix_stores_the_dtype_it_reports_and_checks_against_it():
    ill = _with_condition(1e8)  # fine for float64, singular to float32 precision
    with jax.enable_x64(False):
        with pytest.raises(ValueError, match="jax_enable_x64"):
            invnet.LULinear.from_matrix(ill, param_dtype=jnp.float64)
        with pytest.raises(ValueError, match="float32 precision"):
            invnet.LULinear.from_matrix(ill)  # float64 W, x64 off: float32 storage
        layer = invnet.LULinear.from_matrix(_with_condition(10.0))
        assert layer.param_dtype == jnp.float32 and layer.lower[...].dtype == jnp.float32
    layer = invnet.LULinear.from_matrix(ill, param_dtype=jnp.float64)  # x64 on in tests
    assert layer.param_dtype == jnp.float64 and layer.lower[...].dtype == jnp.float64


def test_from_matrix_condition_estimate_is_the_1_norm_condition_number():
    for condition in (10.0, 1e4):
        w = _with_condition(condition)
        limit = np.linalg.cond(w, 1)
        invnet.LULinear.from_matrix(w, max_condition=1.01 * limit)  # a lower estimate
        with pytest.raises(ValueError, match="condition number"):
            invnet.LULinear.from_matrix(w, max_condition=limit / 10)  # within a factor 10


def test_lulinear_identity_init_and_orthogonal_init():
    ident = invnet.LULinear(4, init="identity", param_dtype=jnp.float64, rngs=nnx.Rngs(0))
    np.testing.assert_allclose(ident.weight(), np.eye(4), atol=0)
    rot = invnet.LULinear(4, init="orthogonal", param_dtype=jnp.float64, rngs=nnx.Rngs(0))
    w = np.asarray(rot.weight())
    np.testing.assert_allclose(w @ w.T, np.eye(4), atol=1e-12)
    # the default random init keeps the factors themselves well conditioned at any size
    big = invnet.LULinear(512, param_dtype=jnp.float64, rngs=nnx.Rngs(0))
    _, lower, upper = (np.asarray(a) for a in big.factors())
    assert np.linalg.cond(lower) < 5 and np.linalg.cond(upper) < 5
    assert sorted(np.asarray(big.perm[...]).tolist()) == list(range(512))
    with pytest.raises(ValueError, match="init"):
        invnet.LULinear(4, init="zeros", rngs=nnx.Rngs(0))


def test_lulinear_stays_invertible_for_any_parameters():
    layer = invnet.LULinear(4, param_dtype=jnp.float64, rngs=nnx.Rngs(0))
    layer.log_scale[...] = jnp.array([-3.0, 0.0, 2.0, 1.0])
    layer.lower[...] = jnp.ones((4, 4))
    w = np.asarray(layer.weight())
    assert abs(np.linalg.det(w)) > 0
    np.testing.assert_allclose(np.log(abs(np.linalg.det(w))), 0.0, atol=1e-12)


@pytest.mark.parametrize(
    "layer",
    [
        invnet.LULinear(4, rngs=nnx.Rngs(0)),
        invnet.AffineCoupling(4, hidden=(4,), rngs=nnx.Rngs(0)),
        invnet.AdditiveCoupling(4, hidden=(4,), rngs=nnx.Rngs(0)),
        invnet.Permute(4, rngs=nnx.Rngs(0)),
        invnet.ActNorm(4),
        invnet.Sequential(invnet.LULinear(4, rngs=nnx.Rngs(0)), invnet.LeakyReLU(0.1)),
    ],
    ids=lambda layer: type(layer).__name__,
)
def test_bad_input_errors(layer):
    with pytest.raises(ValueError, match=r"expected last axis of size 4.*\(2, 3\)"):
        layer.forward(jnp.ones((2, 3)))
    with pytest.raises(ValueError, match="expected last axis of size 4"):
        layer.inverse(jnp.ones((2, 5)))
    with pytest.raises(TypeError, match="floating"):
        layer.forward(jnp.ones((2, 4), jnp.int32))
    with pytest.raises(ValueError, match="scalar"):
        layer.forward(jnp.asarray(1.0))


def test_errors_are_raised_under_jit_too():
    layer = invnet.LULinear(4, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(layer)
    f = jax.jit(lambda s, x: nnx.merge(graphdef, s).forward(x))
    with pytest.raises(ValueError, match="expected last axis of size 4"):
        f(state, jnp.ones((2, 3)))


def test_conditional_block_needs_a_cond_of_the_right_size():
    block = invnet.AffineCoupling(4, hidden=(4,), cond_dim=2, rngs=nnx.Rngs(0))
    x = jnp.ones((3, 4))
    with pytest.raises(ValueError, match="conditional"):
        block.forward(x)
    with pytest.raises(ValueError, match="cond with last axis of size 2"):
        block.forward(x, cond=jnp.ones((3, 5)))
    with pytest.raises(ValueError, match="batch shape"):
        block.forward(x, cond=jnp.ones((2, 2)))
    # one condition for the whole batch broadcasts explicitly
    y1, _ = block.forward(x, cond=jnp.ones(2))
    y2, _ = block.forward(x, cond=jnp.ones((3, 2)))
    np.testing.assert_array_equal(y1, y2)


def test_nan_input_propagates_without_crashing():
    model = invnet.Sequential(
        invnet.LULinear(3, rngs=nnx.Rngs(0)),
        invnet.LeakyReLU(0.2),
        invnet.AffineCoupling(3, hidden=(4,), rngs=nnx.Rngs(0)),
    )
    x = jnp.array([[jnp.nan, 0.0, 1.0], [0.5, 0.2, 0.1]])
    y, _ = model.forward(x)
    assert bool(jnp.any(jnp.isnan(y[0]))) and bool(jnp.all(jnp.isfinite(y[1])))
    xb, _ = model.inverse(y)
    assert bool(jnp.all(jnp.isfinite(xb[1])))


def test_coupling_identity_at_init_and_clamped_scale():
    block = invnet.AffineCoupling(4, hidden=(8,), clamp=1.5, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (5, 4))
    y, ld = block.forward(x)
    np.testing.assert_array_equal(y, x)
    np.testing.assert_array_equal(ld, 0.0)
    block.conditioner.out.bias[...] = jnp.full((4,), 1e6)  # absurd raw scales
    _, ld = block.forward(x)
    assert bool(jnp.all(jnp.abs(ld) <= 2 * 1.5 + 1e-5))
    with pytest.raises(ValueError, match="clamp"):
        invnet.AffineCoupling(4, clamp=0.0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=">= 2"):
        invnet.AffineCoupling(1, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="mask"):
        invnet.AffineCoupling(4, mask=[True] * 4, rngs=nnx.Rngs(0))


def test_conditioner_features_of_a_one_dimensional_input_are_not_all_kinked_at_zero():
    """With zero hidden biases every ReLU feature of a 1-D input was ``relu(w x)``: the
    conditioner was positively homogeneous at init (``h(2x) = 2 h(x)``), one kink at 0, so a
    2-D coupling started unable to bend its splines anywhere else and trained slowly (the
    2-D ring of examples/11_variational.py). Hidden biases start uniform on
    ``+-1/sqrt(fan_in)`` (PyTorch's and equinox's default); the output layer stays zero."""
    mlp = invnet.MLP(1, (64, 64), 3, rngs=nnx.Rngs(0))
    for layer, fan_in in zip(mlp.hidden_layers, (1, 64), strict=True):
        bias = np.asarray(layer.bias[...])
        assert np.all(np.abs(bias) <= 1 / np.sqrt(fan_in)) and np.std(bias) > 0.1 / np.sqrt(fan_in)
    np.testing.assert_array_equal(mlp.out.kernel[...], 0.0)

    def features(x):
        h = x
        for layer in mlp.hidden_layers:
            h = jax.nn.relu(layer(h))
        return h

    x = jnp.array([[0.7]])
    assert float(jnp.max(jnp.abs(features(2 * x) - 2 * features(x)))) > 1e-2
    block = invnet.SplineCoupling(2, hidden=(16,), rngs=nnx.Rngs(0))
    z = jax.random.normal(jax.random.key(0), (5, 2))
    np.testing.assert_allclose(block.forward(z)[0], z, atol=1e-6)  # still the identity


def test_user_conditioner():
    class Cond(nnx.Module):
        def __init__(self):
            self.lin = nnx.Linear(2, 4, rngs=nnx.Rngs(1))

        def __call__(self, h):
            return self.lin(h)

    block = invnet.AffineCoupling(4, conditioner=Cond(), rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (3, 4), jnp.float32)
    y, _ = block.forward(x)
    np.testing.assert_allclose(block.inverse(y)[0], x, atol=1e-5)
    with pytest.raises(ValueError, match="user conditioner"):
        invnet.save(block, "/tmp/never-written.invnet")
    bad = invnet.AffineCoupling(4, conditioner=nnx.Linear(2, 3, rngs=nnx.Rngs(1)), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="conditioner returned last axis 3"):
        bad.forward(x)


def test_actnorm_data_init_standardises_and_keeps_params_after():
    norm = invnet.ActNorm(3, param_dtype=jnp.float64)
    x = 5.0 + 2.0 * jax.random.normal(jax.random.key(0), (500, 3))
    y, _ = norm.forward(x)
    np.testing.assert_allclose(y.mean(0), 0.0, atol=1e-8)
    np.testing.assert_allclose(y.std(0), 1.0, atol=1e-5)
    y2, _ = norm.forward(x + 100.0)  # already initialised: parameters are kept
    np.testing.assert_allclose(y2, y + 100.0 * jnp.exp(norm.log_scale[...]), atol=1e-8)
    # under nnx.jit the data-dependent init is traced and its update kept
    fresh = invnet.ActNorm(3, param_dtype=jnp.float64)
    nnx.jit(lambda m, v: m.forward(v))(fresh, x)
    assert bool(fresh.initialized[...])
    np.testing.assert_allclose(fresh.bias[...], norm.bias[...], atol=1e-10)


def _primitives_outside_cond(jaxpr) -> set[str]:
    """Names of the primitives a jaxpr runs unconditionally (not inside a ``cond``)."""
    names = set()
    for eqn in jaxpr.eqns:
        names.add(eqn.primitive.name)
        if eqn.primitive.name == "cond":
            continue
        for value in eqn.params.values():
            for sub in value if isinstance(value, tuple | list) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    names |= _primitives_outside_cond(inner)
    return names


def test_actnorm_in_a_traced_step_computes_batch_statistics_only_when_uninitialised():
    """A training step that passes the model's state in (``nnx.split`` + ``jax.jit``) sees
    ActNorm's init flag as a tracer: the batch statistics (finite check, mean, variance)
    must then sit behind a conditional, not run (and be thrown away) on every step."""
    x = 5.0 + 2.0 * jax.random.normal(jax.random.key(0), (64, 4, 4, 3))
    norm = invnet.ActNorm(3, event_ndim=3, param_dtype=jnp.float64)
    graphdef, state = nnx.split(norm)
    step = jax.jit(lambda s, v: nnx.merge(graphdef, s).forward(v)[0])
    jaxpr = jax.make_jaxpr(lambda s, v: nnx.merge(graphdef, s).forward(v)[0])(state, x)
    assert "is_finite" not in _primitives_outside_cond(jaxpr.jaxpr)
    # uninitialised: the traced step standardises the batch; initialised: stored values
    y = step(state, x)
    np.testing.assert_allclose(y.mean((0, 1, 2)), 0.0, atol=1e-8)
    invnet.data_init(norm, x + 3.0)
    _, state = nnx.split(norm)
    np.testing.assert_allclose(step(state, x), y - 3.0 * jnp.exp(norm.log_scale[...]), atol=1e-8)


def test_sequential_slicing_and_intermediates():
    rngs = nnx.Rngs(0)
    model = invnet.Sequential(
        invnet.LULinear(3, param_dtype=jnp.float64, rngs=rngs),
        invnet.LeakyReLU(0.3),
        invnet.LULinear(3, param_dtype=jnp.float64, rngs=rngs),
    )
    assert len(model) == 3 and isinstance(model[1:], invnet.Sequential)
    assert [type(m).__name__ for m in model] == ["LULinear", "LeakyReLU", "LULinear"]
    x = jax.random.normal(jax.random.key(0), (4, 3))
    y, _, hs = model.forward(x, return_intermediates=True)
    assert len(hs) == 3 and bool(jnp.array_equal(hs[-1], y))
    np.testing.assert_allclose(model[:2].inverse(hs[1])[0], x, atol=1e-12)
    with pytest.raises(TypeError, match="not an invnet Bijector"):
        invnet.Sequential(nnx.Linear(3, 3, rngs=rngs))
    with pytest.raises(ValueError, match="different sizes"):
        invnet.Sequential(invnet.LULinear(3, rngs=rngs), invnet.LULinear(4, rngs=rngs))


def test_precision_setting_reaches_every_layer_and_is_saved(tmp_path):
    model = invnet.Sequential(
        invnet.LULinear(3, rngs=nnx.Rngs(0)),
        invnet.AffineCoupling(3, hidden=(4,), rngs=nnx.Rngs(0)),
    )
    invnet.set_precision(model, "default")
    assert all(m.precision == "default" for m in model)
    loaded = invnet.load(invnet.save(model, tmp_path / "m.invnet"))
    assert all(m.precision == "default" for m in loaded)
    with pytest.raises(ValueError, match="precision"):
        invnet.set_precision(model, "fast")


def test_uninitialised_actnorm_under_pure_jax_grad_does_not_crash():
    model = invnet.Sequential(invnet.ActNorm(3), invnet.LULinear(3, rngs=nnx.Rngs(0)))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    x = 2.0 + jax.random.normal(jax.random.key(0), (64, 3), jnp.float32)

    @jax.jit
    def grads(params, rest, x):
        def loss(p):
            z, ld = nnx.merge(graphdef, p, rest).forward(x)
            return jnp.mean(z**2) - jnp.mean(ld)

        return jax.grad(loss)(params)

    g = grads(params, rest, x)
    assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(g))
    assert not bool(model.layers[0].initialized[...])  # nothing could be written back


def test_inverted_actnorm_initialises_on_the_data_side_and_never_in_the_model_inverse():
    """An ActNorm inside `Inverse` sees data through its own inverse: data_init (and the
    model's first forward) standardise what comes out there, and the model's inverse never
    initialises it (it used to, so the first round trip came back wrong)."""
    x = 5.0 + 2.0 * jax.random.normal(jax.random.key(0), (500, 3), jnp.float64)
    for make_ready in (lambda m: invnet.data_init(m, x), lambda m: m.forward(x)):
        model = invnet.Sequential(
            invnet.LULinear(3, param_dtype=jnp.float64, rngs=nnx.Rngs(0)),
            invnet.Inverse(invnet.ActNorm(3, param_dtype=jnp.float64)),
        )
        make_ready(model)
        assert all(node.not_ready() is None for node in invnet.core.nodes(model))
        y, log_det = model.forward(x)
        np.testing.assert_allclose(y.mean(0), 0.0, atol=1e-8)
        np.testing.assert_allclose(y.std(0), 1.0, atol=1e-5)
        x_back, inv_log_det = model.inverse(y)
        np.testing.assert_allclose(x_back, x, atol=1e-10)
        np.testing.assert_allclose(log_det + inv_log_det, 0.0, atol=1e-10)
    # the model's inverse of a fresh model leaves every ActNorm as it was
    fresh = invnet.Sequential(
        invnet.Inverse(invnet.ActNorm(3, param_dtype=jnp.float64)),
        invnet.ActNorm(3, param_dtype=jnp.float64),
    )
    fresh.inverse(x)
    norms = [n for n in invnet.core.nodes(fresh) if isinstance(n, invnet.ActNorm)]
    assert len(norms) == 2 and all(n.not_ready() is not None for n in norms)


@pytest.mark.parametrize("shape", [(5,), (3, 5), (2, 3, 5)])
def test_permute_fast_paths_are_the_same_data_movement(shape):
    """Reverse runs as jnp.flip and other permutations gather rows of the transposed batch
    on CPU: both must equal plain numpy indexing, under jit too, and invert exactly."""
    x = np.arange(np.prod(shape), dtype=np.float64).reshape(shape)
    perm = np.array([3, 0, 4, 1, 2])
    for layer, p in [
        (invnet.Permute(5, mode="reverse"), np.arange(5)[::-1]),
        (invnet.Permute(5, perm=perm), perm),
    ]:
        y, _ = layer.forward(jnp.asarray(x))
        np.testing.assert_array_equal(y, x[..., p])
        np.testing.assert_array_equal(nnx.jit(lambda m, v: m.forward(v)[0])(layer, x), x[..., p])
        np.testing.assert_array_equal(layer.inverse(y)[0], x)
    np.testing.assert_array_equal(
        invnet.layers.permute.take_last(jnp.asarray(x), perm), x[..., perm]
    )


def test_lulinear_inverse_by_solves_and_by_inverse_matrix_agree():
    """The inverse runs triangular solves for a few rows and the GEMM-formed W^{-1} for
    batches of more than D/16 rows (XLA's CPU triangular solve is slow whatever the batch):
    both are exact inverses, in float64 to 1e-12 and in float32 to eps x cond(W)."""
    layer = perturb(invnet.LULinear(64, param_dtype=jnp.float64, rngs=nnx.Rngs(0)), 0.1)
    few = jax.random.normal(jax.random.key(0), (2, 64), jnp.float64)  # 32 < 64: solves
    many = jnp.concatenate([few, jnp.ones((6, 64), jnp.float64)])  # 128 >= 64: W^{-1}
    x_few, ld_few = layer.inverse(few)
    x_many, ld_many = layer.inverse(many)
    np.testing.assert_allclose(x_many[:2], x_few, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(ld_many[:2], ld_few, rtol=1e-12)
    np.testing.assert_allclose(layer.forward(x_many)[0], many, rtol=1e-11, atol=1e-11)
    bound = layer.error_bound()[0]
    x32 = layer.inverse(many.astype(jnp.float32))[0]
    assert float(jnp.max(jnp.abs(x32.astype(jnp.float64) - x_many))) <= 64 * 1.2e-7 * bound * float(
        jnp.max(jnp.abs(x_many))
    )


def test_actnorm_init_ignores_non_finite_samples_and_refuses_a_batch_without_finite_ones():
    """One NaN row used to make every ActNorm parameter NaN (so every Glow's)."""
    x = 5.0 + 2.0 * jax.random.normal(jax.random.key(0), (64, 3), jnp.float64)
    bad = x.at[3, 1].set(jnp.nan).at[10, 0].set(jnp.inf)
    clean = invnet.ActNorm(3, param_dtype=jnp.float64)
    clean.forward(jnp.delete(x, jnp.array([3, 10]), axis=0))
    norm = invnet.ActNorm(3, param_dtype=jnp.float64)
    with pytest.warns(RuntimeWarning, match=r"ignored 2 of 64 samples .*\[3, 10\]"):
        invnet.data_init(invnet.Sequential(norm), bad)
    np.testing.assert_allclose(norm.bias[...], clean.bias[...], rtol=1e-12)
    np.testing.assert_allclose(norm.log_scale[...], clean.log_scale[...], rtol=1e-12)
    traced = invnet.ActNorm(3, param_dtype=jnp.float64)  # inside nnx.jit: no warning
    nnx.jit(lambda m, v: m.forward(v))(traced, bad)
    np.testing.assert_allclose(traced.bias[...], clean.bias[...], rtol=1e-10)
    with pytest.raises(ValueError, match="all 64 samples .* NaN or inf"):
        invnet.ActNorm(3).data_init(jnp.full((64, 3), jnp.nan, jnp.float32))


def test_glow_data_init_survives_one_nan_image():
    glow = invnet.glow((4, 4, 1), levels=1, steps=1, hidden=4, rngs=nnx.Rngs(0))
    images = jax.random.uniform(jax.random.key(0), (16, 4, 4, 1), jnp.float32)
    with pytest.warns(RuntimeWarning, match="ignored 1 of 16 samples"):
        invnet.data_init(glow, images.at[5, 2, 2, 0].set(jnp.nan))
    params = jax.tree.leaves(nnx.state(glow, nnx.Param))
    assert all(bool(jnp.all(jnp.isfinite(p))) for p in params)
    assert bool(jnp.all(jnp.isfinite(glow.log_prob(images))))
