"""invnet.Flow, the objectives and invnet.fit: training works, is reproducible, and is safe."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import invnet
from invnet.demo import build_flow, moons


def _params(model):
    return [np.asarray(a) for a in jax.tree.leaves(nnx.state(model, nnx.Param))]


@pytest.fixture(scope="module")
def trained_moons():
    """A small coupling flow trained on two moons (shared by the tests below)."""
    x, x_val = moons(1024, seed=0), moons(512, seed=1)
    flow = build_flow(blocks=4, hidden=32, seed=0)
    history = invnet.fit(
        flow, x, validation={"x": x_val}, epochs=40, batch_size=128, learning_rate=5e-3,
        progress=False,
    )  # fmt: skip
    return flow, history, x_val


def test_fit_lowers_validation_nll_on_two_moons(trained_moons):
    flow, history, x_val = trained_moons
    # A Gaussian fitted to the standardised moons scores 2.72 nats; the untrained flow ~2.6.
    # Observed after 40 epochs: 1.98 (CPU, float32, seed 0). Stated bound: below 2.2.
    assert len(history.val_loss) == history.epochs == 40
    assert history.val_loss[0] > 2.4
    assert history.best_loss < 2.2
    # restore_best leaves the model at its best validation parameters
    nll = -float(jnp.mean(flow.log_prob(jnp.asarray(x_val))))
    np.testing.assert_allclose(nll, history.best_loss, rtol=1e-5)
    assert history.nonfinite_steps == 0 and history.steps == 40 * 8


def test_saved_and_loaded_flow_gives_identical_outputs(trained_moons, tmp_path):
    flow, _, x_val = trained_moons
    path = invnet.save(flow, tmp_path / "moons.invnet")
    again = invnet.load(path)
    assert isinstance(again, invnet.Flow)
    x = jnp.asarray(x_val[:64])
    np.testing.assert_array_equal(again.log_prob(x), flow.log_prob(x))
    key = jax.random.key(3)
    np.testing.assert_array_equal(again.sample(key, 16), flow.sample(key, 16))


def test_flow_log_prob_matches_gaussian_for_a_linear_flow():
    layer = invnet.LULinear(3, rngs=nnx.Rngs(0))
    layer.bias[...] = jnp.array([0.3, -0.2, 0.1], jnp.float32)
    flow = invnet.Flow(layer)
    w, b = np.asarray(layer.weight(), float), np.asarray(layer.bias[...], float)
    x = np.asarray(jax.random.normal(jax.random.key(1), (5, 3)))
    # z = W x + b ~ N(0, I)  <=>  x ~ N(-W^-1 b, (W^T W)^-1): the Gaussian log-density
    mean, precision = -np.linalg.solve(w, b), w.T @ w
    d = x - mean
    expected = (-0.5 * np.einsum("bi,ij,bj->b", d, precision, d)
                + 0.5 * np.linalg.slogdet(precision)[1] - 1.5 * np.log(2 * np.pi))  # fmt: skip
    np.testing.assert_allclose(flow.log_prob(jnp.asarray(x)), expected, rtol=1e-5)
    x_s, lp = flow.sample_and_log_prob(jax.random.key(2), 4)
    np.testing.assert_allclose(lp, flow.log_prob(x_s), rtol=1e-5, atol=1e-5)


def test_conditional_flow_samples_and_broadcasts_cond():
    rngs = nnx.Rngs(0)
    flow = invnet.Flow(invnet.AffineCoupling(4, hidden=(8,), cond_dim=2, rngs=rngs))
    with pytest.raises(ValueError, match="cond"):
        flow.sample(jax.random.key(0), 3)
    x = flow.sample(jax.random.key(0), 3, cond=jnp.array([1.0, 0.0]))
    assert x.shape == (3, 4)
    assert flow.log_prob(x, cond=jnp.ones((3, 2))).shape == (3,)


def test_regression_learns_a_bijection_that_inverts_exactly():
    # y = W2 leaky(W1 x + b1) + b2 with W1, W2 reachable from LULinear(init="identity")
    # (positive leading minors: LULinear's permutation and diagonal signs are fixed)
    w1, w2 = np.array([[1.5, 0.5], [-0.4, 1.0]]), np.array([[1.0, -0.6], [0.3, 0.8]])
    x = np.random.default_rng(0).normal(size=(512, 2)).astype(np.float32)
    h = x @ w1.T + np.array([0.2, -0.1])
    y = (np.where(h < 0, 0.5 * h, h) @ w2.T + np.array([0.1, 0.3])).astype(np.float32)
    model = invnet.Sequential(
        invnet.LULinear(2, init="identity", rngs=nnx.Rngs(0)),
        invnet.LeakyReLU(0.5),
        invnet.LULinear(2, init="identity", rngs=nnx.Rngs(1)),
    )
    history = invnet.fit(model, x, y, epochs=40, batch_size=64, learning_rate=1e-2, progress=False)
    assert history.train_loss[-1] < 1e-2 * history.train_loss[0]  # observed: 7e-4 x
    x_back, _ = model.inverse(jnp.asarray(y))  # x recovered from the data's y
    np.testing.assert_allclose(x_back, x, atol=0.1)
    np.testing.assert_allclose(model.inverse(model(x))[0], x, atol=1e-5)


def test_inverse_problem_samples_posterior_consistent_with_y():
    # x ~ N(0, I_2), y = x0 + x1: given y, x lies on a line; z carries the rest.
    x = jax.random.normal(jax.random.key(0), (1024, 2))
    y = (x[:, 0] + x[:, 1])[:, None]
    # init="identity": y = x0 + x1 needs W[0, 0] > 0, and an LULinear keeps the signs of its
    # leading minors for life (see its docstring), so a random orientation may never fit y
    model = invnet.Sequential(
        invnet.LULinear(2, init="identity", rngs=nnx.Rngs(0)),
        invnet.AffineCoupling(2, hidden=(16,), rngs=nnx.Rngs(1)),
    )
    objective = invnet.InverseProblem(y_dim=1, y_sigma=0.05)
    history = invnet.fit(
        model, x, y, objective=objective, epochs=30, batch_size=128, learning_rate=1e-2,
        progress=False,
    )  # fmt: skip
    assert history.train_loss[-1] < history.train_loss[0]
    post = invnet.sample_posterior(model, jnp.array([1.0]), jax.random.key(1), n=500)
    sums, diffs = post[:, 0] + post[:, 1], post[:, 0] - post[:, 1]
    assert abs(float(jnp.mean(sums)) - 1.0) < 0.1 and float(jnp.std(sums)) < 0.15
    # the true posterior of x0 - x1 given y is N(0, 2): the latent must carry that spread
    assert 0.9 < float(jnp.std(diffs)) < 2.0
    # the MMD variant: small for the trained model, large for a shifted latent
    batch = {"x": x[:256], "y": y[:256]}
    mmd_objective = invnet.InverseProblem(y_dim=1, z_loss="mmd")
    mmd = nnx.jit(lambda m, b, k: mmd_objective(m, b, k))  # one compile, not op by op
    trained = float(mmd(model, batch, jax.random.key(2)))
    shifted = invnet.Sequential(model, invnet.ActNorm(2))
    shifted.layers[1].bias[...] = jnp.array([0.0, 2.0], jnp.float32)
    shifted.layers[1].initialized[...] = jnp.asarray(True)
    assert trained < 0.5 * float(mmd(shifted, batch, jax.random.key(2)))


def _tiny_flow():
    return invnet.Flow(invnet.AffineCoupling(2, hidden=(8,), rngs=nnx.Rngs(0)))


def _moons_with_nan_batch(bad_batch: int):
    x = moons(64, seed=0)
    x[16 * bad_batch + 3, 0] = np.nan  # one NaN row poisons batch `bad_batch` (batch size 16)
    return x


def test_nonfinite_step_is_skipped_and_counted():
    flow = _tiny_flow()
    with pytest.warns(invnet.NonFiniteStepWarning, match="non-finite"):
        history = invnet.fit(
            flow, _moons_with_nan_batch(2), epochs=2, batch_size=16, shuffle=False, progress=False
        )
    assert history.nonfinite_steps == 2 and history.nonfinite_at == [2, 6]
    assert history.steps == 8 and all(np.isfinite(history.train_loss))
    assert all(np.all(np.isfinite(p)) for p in _params(flow))


def test_nonfinite_step_keeps_last_finite_parameters():
    # a NaN in the very first batch: with "stop", nothing may have changed
    flow = _tiny_flow()
    before = _params(flow)
    with pytest.warns(invnet.NonFiniteStepWarning):
        history = invnet.fit(
            flow, _moons_with_nan_batch(0), epochs=3, batch_size=16, shuffle=False,
            on_nonfinite="stop", progress=False,
        )  # fmt: skip
    assert history.stop_reason == "nonfinite" and history.epochs == 1
    assert history.nonfinite_steps == 1 and history.steps == 1
    for a, b in zip(_params(flow), before, strict=True):
        np.testing.assert_array_equal(a, b)
    # a NaN in batch 2: the parameters are those after the two finite steps
    x = _moons_with_nan_batch(2)
    stopped, reference = _tiny_flow(), _tiny_flow()
    with pytest.warns(invnet.NonFiniteStepWarning):
        invnet.fit(stopped, x, epochs=1, batch_size=16, shuffle=False, on_nonfinite="stop",
                   progress=False)  # fmt: skip
    invnet.fit(reference, x[:32], epochs=1, batch_size=16, shuffle=False, progress=False)
    for a, b in zip(_params(stopped), _params(reference), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    with pytest.raises(FloatingPointError, match="non-finite"):
        invnet.fit(_tiny_flow(), x, epochs=1, batch_size=16, on_nonfinite="raise", progress=False)


def test_early_stopping_and_checkpoints(tmp_path):
    flow = _tiny_flow()
    x = moons(64, seed=0)
    history = invnet.fit(
        flow, x, validation={"x": moons(32, seed=1)}, optimizer=optax.sgd(0.0), epochs=10,
        batch_size=32, early_stopping=2,
        checkpoints=invnet.Checkpoints(tmp_path, every=1, save_best=True),
        progress=False,
    )  # fmt: skip
    # with a zero learning rate the loss never improves after epoch 0
    assert history.stop_reason == "early_stopping" and history.epochs == 3
    assert history.best_epoch == 0
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["best.invnet", "epoch_0001.invnet", "epoch_0002.invnet",
                     "epoch_0003.invnet", "last.invnet"]  # fmt: skip
    assert invnet.read_metadata(tmp_path / "best.invnet")["epoch"] == 0
    best = invnet.load(tmp_path / "best.invnet")
    np.testing.assert_array_equal(best.log_prob(jnp.asarray(x)), flow.log_prob(jnp.asarray(x)))


def test_same_key_same_run():
    x = moons(128, seed=0)
    a, b = _tiny_flow(), _tiny_flow()
    ha = invnet.fit(a, x, epochs=2, batch_size=32, key=7, progress=False)
    hb = invnet.fit(b, x, epochs=2, batch_size=32, key=7, progress=False)
    assert ha.train_loss == hb.train_loss
    for p, q in zip(_params(a), _params(b), strict=True):
        np.testing.assert_array_equal(p, q)


def test_fit_rejects_bad_arguments():
    flow = _tiny_flow()
    x = moons(32, seed=0)
    with pytest.raises(ValueError, match="rows"):
        invnet.fit(flow, x, cond=np.ones((31, 1)), progress=False)
    with pytest.raises(ValueError, match="on_nonfinite"):
        invnet.fit(flow, x, on_nonfinite="ignore", progress=False)
    with pytest.raises(ValueError, match="cannot map"):
        invnet.fit(flow, x, np.ones((32, 3)), progress=False)


def test_fit_initialises_actnorm_from_data():
    flow = invnet.Flow(invnet.Sequential(invnet.ActNorm(2), _tiny_flow().bijector))
    x = 3.0 + moons(64, seed=0)
    history = invnet.fit(flow, x, epochs=1, batch_size=32, progress=False)
    norm = flow.bijector[0]
    assert bool(norm.initialized[...]) and np.isfinite(history.train_loss[0])
    np.testing.assert_allclose(norm.bias[...], -x.mean(0), atol=0.05)


def test_objectives_take_a_target_of_another_dtype():
    """x and y of different float dtypes (a float32 x with float64 targets, or the reverse):
    the loss is computed in the wider dtype with explicit casts (the suite runs under strict
    dtype promotion, where an implicit float32/float64 op raises), as by hand in float64."""
    model = invnet.Flow(invnet.AffineCoupling(3, hidden=(4,), rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(0)
    x64, y64 = rng.normal(size=(8, 3)), rng.normal(size=(8, 3))
    for x, y in ((x64.astype(np.float32), y64), (x64, y64.astype(np.float32))):
        x, y = jnp.asarray(x), jnp.asarray(y)
        loss = invnet.Regression()(model, {"x": x, "y": y})
        y_pred = np.asarray(model.forward(x)[0], np.float64)
        assert loss.dtype == jnp.float64
        np.testing.assert_allclose(loss, np.mean((y_pred - np.asarray(y, np.float64)) ** 2))
        for z_loss in ("mle", "mmd"):
            objective = invnet.InverseProblem(y_dim=1, z_loss=z_loss)
            loss = objective(model, {"x": x, "y": y[:, :1]}, jax.random.key(0))
            assert loss.dtype == jnp.float64 and bool(jnp.isfinite(loss))
