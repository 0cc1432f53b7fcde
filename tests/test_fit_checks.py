"""`invnet.fit` keeps its promises: no NaN parameters, clear errors, one compile per structure."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import invnet
from invnet.demo import moons


def _tiny_flow(cond_dim=0):
    return invnet.Flow(invnet.AffineCoupling(2, hidden=(8,), cond_dim=cond_dim, rngs=nnx.Rngs(0)))


def _params(model):
    return [np.asarray(a) for a in jax.tree.leaves(nnx.state(model, nnx.Param))]


def test_a_finite_gradient_with_a_nonfinite_update_is_not_applied():
    # adam with eps=0 divides 0 by 0 where a gradient is exactly zero (the coupling's hidden
    # layer, behind a zero-initialised output layer), so every update holds a NaN
    flow, x = _tiny_flow(), moons(32, seed=0)
    before = _params(flow)
    with pytest.warns(invnet.NonFiniteStepWarning, match="non-finite loss, gradient or update"):
        history = invnet.fit(flow, x, optimizer=optax.adam(1e-3, eps=0.0), epochs=1,
                             batch_size=16, progress=False)  # fmt: skip
    assert history.nonfinite_steps == history.steps == 2 and history.nonfinite_at == [0, 1]
    for a, b in zip(_params(flow), before, strict=True):
        np.testing.assert_array_equal(a, b)  # nothing applied, no NaN


def test_a_nan_learning_rate_never_reaches_the_parameters():
    flow, x = _tiny_flow(), moons(32, seed=0)
    with pytest.raises(ValueError, match="learning_rate must be a finite number"):
        invnet.fit(flow, x, learning_rate=float("nan"), epochs=1, batch_size=16, progress=False)
    before = _params(flow)
    with pytest.warns(invnet.NonFiniteStepWarning):  # a NaN rate inside the user's optimizer
        history = invnet.fit(flow, x, optimizer=optax.sgd(float("nan")), epochs=1,
                             batch_size=16, progress=False)  # fmt: skip
    assert history.nonfinite_steps == 2
    for a, b in zip(_params(flow), before, strict=True):
        np.testing.assert_array_equal(a, b)


def test_batch_size_larger_than_the_data_is_an_error():
    with pytest.raises(ValueError, match="batch_size 64 is larger than the 32 training rows"):
        invnet.fit(_tiny_flow(), moons(32, seed=0), batch_size=64, progress=False)
    with pytest.raises(ValueError, match="larger than the 24 training rows"):  # after the split
        invnet.fit(_tiny_flow(), moons(32, seed=0), batch_size=32, validation=0.25,
                   progress=False)  # fmt: skip


def test_y_of_another_shape_needs_an_explicit_objective():
    model = invnet.Sequential(invnet.LULinear(3, rngs=nnx.Rngs(0)))
    x = np.random.default_rng(0).normal(size=(32, 3)).astype(np.float32)
    # one column short: not silently an inverse problem
    with pytest.raises(ValueError, match=r"InverseProblem\(y_dim=k\).*1 <= k < 3"):
        invnet.fit(model, x, x[:, :2], batch_size=16, progress=False)
    # an explicit Regression with a narrower y would broadcast: refused too
    with pytest.raises(ValueError, match=r"needs y of x's shape, \(3,\)"):
        invnet.fit(model, x, x[:, :1], objective=invnet.Regression(), progress=False)
    with pytest.raises(ValueError, match=r"InverseProblem\(y_dim=2\) needs y of shape"):
        invnet.fit(model, x, x[:, :1], objective=invnet.InverseProblem(y_dim=2), progress=False)


def test_cond_for_an_unconditional_model_is_refused_before_training():
    flow, x = _tiny_flow(), moons(32, seed=0)
    c = np.ones((32, 3), np.float32)

    def ignores_cond(model, batch, key):  # would train an unconditional flow silently
        return -jnp.mean(model.log_prob(batch["x"]))

    for objective in (ignores_cond, None):
        with pytest.raises(ValueError, match=r"invnet.fit: cond was given.*cond_dim=3"):
            invnet.fit(flow, x, cond=c, objective=objective, batch_size=16, progress=False)
    with pytest.raises(ValueError, match=r"is conditional \(cond_dim=3\); pass cond"):
        invnet.fit(_tiny_flow(cond_dim=3), x, batch_size=16, progress=False)
    with pytest.raises(ValueError, match=r"cond has shape \(32, 3\), the model expects"):
        invnet.fit(_tiny_flow(cond_dim=2), x, cond=c, batch_size=16, progress=False)


def test_a_second_fit_of_the_same_structure_reuses_the_compiled_epoch():
    traces = []

    def objective(model, batch, key):  # runs in Python only while jax traces it
        traces.append(batch["x"].shape)
        return -jnp.mean(model.log_prob(batch["x"]))

    x, x_val = moons(64, seed=0), moons(16, seed=1)
    kw = dict(objective=objective, validation={"x": x_val}, epochs=1, batch_size=16, progress=False)
    invnet.fit(_tiny_flow(), x, **kw)
    first = len(traces)
    assert first > 0
    # another model of the same structure, another key, other values: nothing retraced
    invnet.fit(invnet.Flow(invnet.AffineCoupling(2, hidden=(8,), rngs=nnx.Rngs(5))),
               x + 1.0, key=3, **kw)  # fmt: skip
    assert len(traces) == first
    # another batch size or another structure does trace again
    invnet.fit(_tiny_flow(), x, **{**kw, "batch_size": 32})
    assert len(traces) > first
    again = len(traces)
    wider = invnet.Flow(invnet.AffineCoupling(2, hidden=(4,), rngs=nnx.Rngs(0)))
    invnet.fit(wider, x, **kw)
    assert len(traces) > again


def test_grouped_options_and_the_old_names_train_the_same(tmp_path):
    x = moons(64, seed=0)
    common = dict(epochs=6, batch_size=16, learning_rate=1e-2, progress=False)
    new_flow = _tiny_flow()
    new = invnet.fit(
        new_flow,
        x,
        validation=0.25,
        early_stopping=invnet.EarlyStopping(patience=2, min_delta=1e-4),
        checkpoints=invnet.Checkpoints(tmp_path / "new", every=3),
        **common,
    )
    old_flow = _tiny_flow()
    with pytest.warns(DeprecationWarning, match=r"patience= is now early_stopping=<patience>"):
        old = invnet.fit(
            old_flow,
            x,
            val_fraction=0.25,
            patience=2,
            min_delta=1e-4,
            checkpoint_dir=tmp_path / "old",
            checkpoint_every=3,
            **common,
        )
    assert new.train_loss == old.train_loss and new.val_loss == old.val_loss
    assert [p.rsplit("/", 1)[-1] for p in new.checkpoints] == [
        p.rsplit("/", 1)[-1] for p in old.checkpoints]  # fmt: skip
    for a, b in zip(_params(new_flow), _params(old_flow), strict=True):
        np.testing.assert_array_equal(a, b)
    short = invnet.fit(_tiny_flow(), x, validation=0.25, early_stopping=2,
                       checkpoints=tmp_path / "short", **common)  # fmt: skip
    assert short.val_loss == new.val_loss
    assert short.checkpoints == [str(tmp_path / "short" / "last.invnet")]


@pytest.mark.parametrize(
    "kw, error, match",
    [
        (dict(validation=1.5), ValueError, r"validation=1.5: a fraction must be in \[0, 1\)"),
        (dict(validation="x"), TypeError, "validation must be a fraction"),
        (dict(early_stopping=0), ValueError, "patience must be an int >= 1"),
        (dict(early_stopping=2.5), TypeError, "patience must be an int"),
        (dict(checkpoints=3), TypeError, "directory must be a path"),
        (dict(patience_epochs=3), TypeError, "unexpected keyword argument.*patience_epochs"),
    ],
)
def test_grouped_options_refuse_what_they_cannot_mean(kw, error, match):
    with pytest.raises(error, match=match):
        invnet.fit(_tiny_flow(), moons(32, seed=0), epochs=1, batch_size=16, progress=False, **kw)
