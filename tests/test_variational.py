"""`invnet.fit_variational`: reverse KL and the importance-weighted bound on targets with a
known normaliser; the ESS; Ctrl-C keeps the last finished chunk; bad targets are refused."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import invnet
from invnet import variational

COV = np.array([[1.0, 0.8], [0.8, 1.0]])
PREC = np.linalg.inv(COV)
SHIFT = np.array([1.0, -2.0])
LOG_C = 3.0  # the unnormalised target is exp(LOG_C) * N(SHIFT, COV)
LOG_Z_GAUSS = LOG_C  # so its log normaliser is LOG_C


def correlated_gaussian(x):
    d = x - jnp.asarray(SHIFT, x.dtype)
    quad = jnp.einsum("ni,ij,nj->n", d, jnp.asarray(PREC, x.dtype), d)
    return LOG_C - 0.5 * quad - math.log(2 * math.pi) - 0.5 * math.log(np.linalg.det(COV))


MIX_MEANS = np.array([[-1.2, 0.0], [1.2, 0.5]])
MIX_LOG_W = np.log([0.3, 0.7])
LOG_Z_MIX = -1.5  # the mixture density times exp(-1.5)


def two_component_mixture(x):
    means = jnp.asarray(MIX_MEANS, x.dtype)
    sq = jnp.sum((x[:, None, :] - means) ** 2, axis=-1) / (2 * 0.6**2)
    comp = -sq - math.log(2 * math.pi * 0.6**2) + jnp.asarray(MIX_LOG_W, x.dtype)
    return LOG_Z_MIX + jax.scipy.special.logsumexp(comp, axis=-1)


def _flow(blocks=2, hidden=(32,), base=None):
    rngs = nnx.Rngs(0)
    layers = []
    for _ in range(blocks):
        layers += [invnet.AffineCoupling(2, hidden=hidden, rngs=rngs),
                   invnet.Permute(2, mode="reverse")]  # fmt: skip
    return invnet.Flow(invnet.Sequential(*layers), base or invnet.DiagonalGaussian(2))


def test_ess_matches_its_formula():
    lw = np.random.default_rng(0).normal(size=50) * 2.0
    w = np.exp(lw)
    want = w.sum() ** 2 / (len(w) * (w**2).sum())
    np.testing.assert_allclose(invnet.effective_sample_size(jnp.asarray(lw)), want, rtol=1e-12)
    assert float(invnet.effective_sample_size(jnp.array([0.0, -jnp.inf, jnp.nan]))) == (
        pytest.approx(1 / 3)
    )


def test_reverse_kl_on_a_correlated_gaussian_finds_log_z():
    """An affine flow can represent the target exactly: log Z to 0.03 nats, ESS > 0.9
    (observed about 0.99, CPU, float64)."""
    flow = _flow(blocks=2)
    history = invnet.fit_variational(flow, correlated_gaussian, steps=400, batch_size=128,
                                     learning_rate=2e-2, dtype=jnp.float64,
                                     progress=False)  # fmt: skip
    assert history.steps == 400 and len(history.ess) == 400 and history.stop_reason == "steps"
    assert np.mean(history.loss[-50:]) < np.mean(history.loss[:50])
    est = invnet.importance_estimate(flow, correlated_gaussian, 7, n=20_000, dtype=jnp.float64)
    assert abs(est["log_z"] - LOG_Z_GAUSS) < 0.03
    assert est["ess"] > 0.9 and est["kl"] < 0.05
    assert history.ess[-1] > 0.8  # the per-step ESS in the history agrees


@pytest.mark.extended  # 600 IWAE steps of a 4-block flow: the heaviest check here
def test_importance_weighted_bound_on_a_two_component_mixture():
    """A bimodal target; K=8 IWAE: log Z to 0.05 nats and ESS > 0.5 (observed ~0.8, CPU,
    float64). The untrained flow's ESS is far lower."""
    flow = _flow(blocks=4, hidden=(32, 32))
    before = invnet.importance_estimate(flow, two_component_mixture, 3, n=4000,
                                        dtype=jnp.float64)  # fmt: skip
    invnet.fit_variational(flow, two_component_mixture, steps=600, batch_size=64,
                           importance_samples=8, learning_rate=5e-3, dtype=jnp.float64,
                           progress=False)  # fmt: skip
    est = invnet.importance_estimate(flow, two_component_mixture, 3, n=20_000, dtype=jnp.float64)
    assert abs(est["log_z"] - LOG_Z_MIX) < 0.05
    assert est["ess"] > 0.5 and est["ess"] > 2 * before["ess"]


@pytest.mark.parametrize("k", [1, pytest.param(4, marks=pytest.mark.extended)])
def test_the_path_gradient_vanishes_where_the_flow_is_the_target(k):
    """q = p exactly (the target is a copy of the flow's own density, times e^3): the path
    gradient is zero for every batch, while the total gradient is only zero on average. For
    K > 1 it is the doubly reparameterised IWAE gradient, zero there too."""
    flow = _flow(blocks=1, hidden=(8,))
    copy = nnx.clone(flow)

    def target(x):
        return LOG_C + copy.log_prob(x)

    graphdef, params, rest = nnx.split(flow, nnx.Param, ...)

    def grads(gradient):
        def loss(p):
            model = nnx.merge(graphdef, p, rest)
            held = nnx.merge(graphdef, jax.lax.stop_gradient(p), rest)
            held = held if gradient == "path" else None
            return variational._objective(model, held, target, jax.random.key(1), 32, k,
                                          jnp.float64, None)[0]  # fmt: skip

        with jax.enable_x64(True):
            return np.concatenate([np.ravel(g) for g in jax.tree.leaves(jax.grad(loss)(params))])

    assert np.max(np.abs(grads("path"))) < 1e-6
    assert np.max(np.abs(grads("total"))) > 1e-2


def test_ctrl_c_keeps_the_last_finished_chunk(monkeypatch):
    flow = _flow(blocks=1, hidden=(8,))
    real = variational._chunk_fn
    calls, after_first = [], {}

    def interrupting(*args):
        run = real(*args)

        def wrapped(params, *rest):
            calls.append(1)
            if len(calls) == 2:
                after_first["params"] = params
                raise KeyboardInterrupt
            return run(params, *rest)

        return wrapped

    monkeypatch.setattr(variational, "_chunk_fn", interrupting)
    history = invnet.fit_variational(flow, correlated_gaussian, steps=30, chunk=10,
                                     learning_rate=1e-2, progress=False)  # fmt: skip
    assert history.stop_reason == "interrupted" and history.steps == 10
    kept = nnx.state(flow, nnx.Param)
    for a, b in zip(jax.tree.leaves(kept), jax.tree.leaves(after_first["params"]), strict=True):
        np.testing.assert_array_equal(a, b)  # the first chunk's parameters, not the initial


def test_bad_targets_and_arguments_are_refused():
    flow = _flow(blocks=1, hidden=(8,))
    with pytest.raises(ValueError, match="one value per row"):
        invnet.fit_variational(flow, lambda x: x, steps=1, progress=False)
    with pytest.raises(ValueError, match="steps"):
        invnet.fit_variational(flow, correlated_gaussian, steps=0)
    with pytest.raises(TypeError, match="function"):
        invnet.fit_variational(flow, 3.0, steps=1)
    with pytest.raises(ValueError, match="'path' or 'total'"):
        invnet.fit_variational(flow, correlated_gaussian, steps=1, gradient="score")
    for bad in (-1.0, 0.0, float("nan")):  # a negative rate climbs the loss, silently
        with pytest.raises(ValueError, match="learning_rate must be a finite number > 0"):
            invnet.fit_variational(flow, correlated_gaussian, steps=1, learning_rate=bad)
    with pytest.raises(TypeError, match="learning_rate must be a number or an optax schedule"):
        invnet.fit_variational(flow, correlated_gaussian, steps=1, learning_rate="1e-3")
    with pytest.raises(TypeError, match="learning_rate must be a number"):
        invnet.fit_variational(flow, correlated_gaussian, steps=1, learning_rate=jnp.ones(2))
    # a scalar array is a number
    invnet.fit_variational(flow, correlated_gaussian, steps=1, learning_rate=jnp.float32(1e-3),
                           progress=False)  # fmt: skip


def test_the_default_optimizer_is_adam_cosine_decayed_over_the_steps():
    """The documented default: adam from ``learning_rate`` down to 1% of it at the last step
    (the same parameters, to the bit, as that optimizer passed explicitly)."""
    import optax

    runs = []
    for optimizer in (None, optax.adam(optax.cosine_decay_schedule(2e-2, 6, alpha=0.01))):
        flow = _flow(blocks=1, hidden=(8,))
        invnet.fit_variational(flow, correlated_gaussian, steps=6, chunk=6, learning_rate=2e-2,
                               optimizer=optimizer, progress=False)  # fmt: skip
        runs.append(jax.tree.leaves(nnx.state(flow, nnx.Param)))
    for a, b in zip(*runs, strict=True):
        np.testing.assert_array_equal(a, b)


def test_nonfinite_target_steps_are_not_applied():
    """A target of -inf everywhere: no step is applied and the parameters stay finite."""
    flow = _flow(blocks=1, hidden=(8,))
    before = jax.tree.map(np.asarray, nnx.state(flow, nnx.Param))
    h = invnet.fit_variational(flow, lambda x: jnp.full(x.shape[:1], -jnp.inf, x.dtype),
                               steps=5, progress=False)  # fmt: skip
    assert h.nonfinite_steps == 5
    for a, b in zip(
        jax.tree.leaves(nnx.state(flow, nnx.Param)), jax.tree.leaves(before), strict=True
    ):
        np.testing.assert_array_equal(a, b)
