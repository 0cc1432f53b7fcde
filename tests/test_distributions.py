"""Contract tests for every base distribution (`invnet.distributions`): log_prob against a
direct formula (scipy.stats), sampling moments, float32/float64, gradients to the base's
parameters, and a `Flow` with the base through `fit`, `verify`, `save`/`load`."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import stats
from scipy.special import logsumexp

import invnet

D = 3


def _perturb(base, seed=0):
    """Move every trainable parameter away from its initial value (0.3 * N(0, 1) draws)."""
    params = nnx.state(base, nnx.Param)
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    pairs = zip(leaves, keys, strict=True)
    new = [p + 0.3 * jax.random.normal(k, p.shape, p.dtype) for p, k in pairs]
    nnx.update(base, jax.tree.unflatten(tree, new))
    return base


def _np(base, name):
    return np.asarray(getattr(base, name)[...], np.float64)


def _ref_diag(base, z, cond):
    return stats.norm.logpdf(z, _np(base, "loc"), np.exp(_np(base, "log_scale"))).sum(-1)


def _ref_mixture(base, z, cond):
    w = np.log(np.exp(_np(base, "logits")) / np.exp(_np(base, "logits")).sum())
    comp = stats.norm.logpdf(z[:, None, :], _np(base, "means"), np.exp(_np(base, "log_scales")))
    return logsumexp(comp.sum(-1) + w, axis=-1)


def _ref_t(base, z, cond):
    df = np.exp(_np(base, "log_df"))
    return stats.t.logpdf(z, df, _np(base, "loc"), np.exp(_np(base, "log_scale"))).sum(-1)


def _ref_class(base, z, cond):
    means = _np(base, "means")[np.asarray(cond)]
    return stats.norm.logpdf(z, means, base.scale).sum(-1)


def _ref_uniform(base, z, cond):
    lo, hi = _np(base, "low"), _np(base, "high")
    return stats.uniform.logpdf(z, lo, hi - lo).sum(-1)


@dataclass(frozen=True)
class Case:
    name: str
    build: Any  # (dtype) -> base
    reference: Any  # (base, z, cond) -> log p (numpy, float64)
    mean: Any  # (base, cond) -> the exact mean of one sample (numpy)
    var: Any  # (base, cond) -> the exact variance
    conditional: bool = False


def _mix_moments(base):
    w = np.exp(_np(base, "logits"))
    w = w / w.sum()
    mu, s2 = _np(base, "means"), np.exp(2 * _np(base, "log_scales"))
    mean = w @ mu
    return mean, w @ (s2 + mu**2) - mean**2


CASES = [
    Case("DiagonalGaussian", lambda dt: _perturb(invnet.DiagonalGaussian(D, param_dtype=dt)),
         _ref_diag, lambda b, c: _np(b, "loc"), lambda b, c: np.exp(2 * _np(b, "log_scale"))),
    Case("GaussianMixture",
         lambda dt: _perturb(invnet.GaussianMixture(D, 3, param_dtype=dt, rngs=nnx.Rngs(0))),
         _ref_mixture, lambda b, c: _mix_moments(b)[0], lambda b, c: _mix_moments(b)[1]),
    Case("StudentT",
         lambda dt: _perturb(invnet.StudentT(D, df=12.0, param_dtype=dt)), _ref_t,
         lambda b, c: _np(b, "loc"),
         lambda b, c: np.exp(2 * _np(b, "log_scale")) * (lambda v: v / (v - 2))(
             np.exp(_np(b, "log_df")))),
    Case("ClassConditionalGaussian",
         lambda dt: _perturb(invnet.ClassConditionalGaussian(
             D, 4, scale=0.7, param_dtype=dt, rngs=nnx.Rngs(0))),
         _ref_class, lambda b, c: _np(b, "means")[c], lambda b, c: np.full(D, 0.49),
         conditional=True),
    Case("Uniform", lambda dt: invnet.Uniform(D, low=[-1.0, 0.0, 2.0], high=[1.0, 0.5, 5.0],
                                              param_dtype=dt),
         _ref_uniform, lambda b, c: (_np(b, "low") + _np(b, "high")) / 2,
         lambda b, c: (_np(b, "high") - _np(b, "low")) ** 2 / 12),
]  # fmt: skip
IDS = [c.name for c in CASES]


def _points(case, base, n, dtype, seed=1):
    """Points where the density is positive (inside the box for the uniform)."""
    if case.name == "Uniform":
        return base.sample(jax.random.key(seed), n, dtype=dtype)
    return 1.5 * jax.random.normal(jax.random.key(seed), (n, D), dtype)


def test_every_public_base_has_a_case():
    public = {
        n for n in invnet.__all__
        if isinstance(getattr(invnet, n), type)
        and issubclass(getattr(invnet, n), invnet.Distribution)
    } - {"Distribution"}  # fmt: skip
    assert public == set(IDS)


# float32 for every base; float64 (to 1e-12) for the Student-t's special functions by
# default, for every base in CI's extended run
FORMULA_CASES = [
    pytest.param(c, dt, id=f"{c.name}-{name}",
                 marks=() if dt == jnp.float32 or c.name == "StudentT" else pytest.mark.extended)
    for c in CASES for dt, name in ((jnp.float32, "f32"), (jnp.float64, "f64"))
]  # fmt: skip


@pytest.mark.parametrize(("case", "dtype"), FORMULA_CASES)
def test_log_prob_matches_the_formula_and_keeps_dtype(case, dtype):
    base = case.build(dtype)
    z = _points(case, base, 64, dtype)
    cond = jnp.arange(64) % 4 if case.conditional else None
    got = base.log_prob(z, cond=cond)
    assert got.dtype == dtype and got.shape == (64,)
    want = case.reference(base, np.asarray(z, np.float64), cond)
    tol = 1e-5 if dtype == jnp.float32 else 1e-12
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=tol, atol=tol)
    if case.conditional:  # one-hot rows give the same as integer labels
        onehot = jax.nn.one_hot(cond, 4, dtype=dtype)
        np.testing.assert_allclose(base.log_prob(z, cond=onehot), got, rtol=tol, atol=tol)
    assert base.sample(jax.random.key(0), 5, cond=None, dtype=dtype).dtype == dtype


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_sample_moments(case):
    """20,000 float64 draws: mean within 5 standard errors of the exact mean, variance
    within 8% (the Student-t, df=12, has a kurtosis of 3 + 6/8: its sample variance
    spreads more)."""
    base = case.build(jnp.float64)
    n = 20_000
    cond = 2 if case.conditional else None
    z = np.asarray(base.sample(jax.random.key(3), n, cond=cond, dtype=jnp.float64))
    assert z.shape == (n, D) and np.all(np.isfinite(z))
    mean, var = case.mean(base, cond), case.var(base, cond)
    np.testing.assert_array_less(np.abs(z.mean(0) - mean), 5 * np.sqrt(var / n))
    np.testing.assert_allclose(z.var(0), var, rtol=0.08)


def test_event_of_rank_two_and_errors():
    base = invnet.DiagonalGaussian((2, 3))
    z = base.sample(jax.random.key(0), 4)
    assert z.shape == (4, 2, 3) and base.log_prob(z).shape == (4,)
    assert base.log_prob(z[0]).shape == ()
    with pytest.raises(ValueError, match=r"shape \(\.\.\., 2, 3\)"):
        base.log_prob(jnp.zeros((4, 6)))
    with pytest.raises(ValueError, match="not conditional"):
        base.log_prob(z, cond=jnp.zeros(4, jnp.int32))
    with pytest.raises(ValueError, match="event_shape"):
        invnet.DiagonalGaussian((2, 0))
    with pytest.raises(ValueError, match="low < high"):
        invnet.Uniform(2, low=1.0, high=0.0)
    with pytest.raises(ValueError, match="df"):
        invnet.StudentT(2, df=-1.0)
    assert invnet.Uniform(2).log_prob(jnp.array([0.0, 2.0])) == -jnp.inf


def test_class_conditional_marginal_and_per_class():
    base = _perturb(invnet.ClassConditionalGaussian(2, 3, rngs=nnx.Rngs(0)))
    z = jax.random.normal(jax.random.key(0), (5, 2))
    per_class = base.log_prob_per_class(z)
    assert per_class.shape == (5, 3)
    for c in range(3):
        np.testing.assert_allclose(per_class[:, c], base.log_prob(z, cond=jnp.full(5, c)))
    marginal = logsumexp(np.asarray(per_class), axis=-1) - np.log(3)
    np.testing.assert_allclose(base.log_prob(z), marginal, rtol=1e-12)


def _flow(base, dim=D, squash=False):
    rngs = nnx.Rngs(1)
    bij = invnet.Sequential(
        invnet.AffineCoupling(dim, hidden=(8,), rngs=rngs),
        invnet.Permute(dim, mode="reverse"),
        invnet.AffineCoupling(dim, hidden=(8,), rngs=rngs),
        *([invnet.Sigmoid()] if squash else []),
    )
    return invnet.Flow(bij, base)


def _flow_and_data(case):
    x = 0.3 * jax.random.normal(jax.random.key(1), (128, D), jnp.float32)
    if case.name == "Uniform":  # a bounded latent: the flow ends in a sigmoid onto (0, 1)
        base = invnet.Uniform(D, low=0.0, high=1.0)
        flow = _flow(base, squash=True)
    else:
        base = case.build(jnp.float32)
        flow = _flow(base)
    cond = jax.nn.one_hot(jnp.arange(128) % 4, 4, dtype=jnp.float32) if case.conditional else None
    return base, flow, x, cond


def _check_save_load(flow, base, x, cond, path):
    again = invnet.load(invnet.save(flow, path))
    assert type(again.base) is type(base) and again.base.get_config() == base.get_config()
    np.testing.assert_array_equal(again.log_prob(x, cond=cond), flow.log_prob(x, cond=cond))
    key, c4 = jax.random.key(5), None if cond is None else cond[:4]
    np.testing.assert_array_equal(again.sample(key, 4, cond=c4), flow.sample(key, 4, cond=c4))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_flow_with_base_saves_and_loads(case, tmp_path):
    base, flow, x, cond = _flow_and_data(case)
    _check_save_load(flow, base, x, cond, tmp_path / "flow.invnet")


def _fit_verify_save(case, tmp_path):
    base, flow, x, cond = _flow_and_data(case)
    before = jax.tree.map(jnp.copy, nnx.state(base, nnx.Param))
    history = invnet.fit(flow, x, cond=cond, epochs=4, batch_size=64, learning_rate=1e-2,
                         progress=False)  # fmt: skip
    assert np.all(np.isfinite(history.train_loss))
    assert history.train_loss[-1] < history.train_loss[0]
    after = nnx.state(base, nnx.Param)
    for b, a in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True):
        assert not np.allclose(b, a)  # fit trains the base
    assert invnet.verify(flow, x, cond=cond).ok
    _check_save_load(flow, base, x, cond, tmp_path / "trained.invnet")


def test_flow_with_class_conditional_base_fits_verifies_saves_and_loads(tmp_path):
    """The base that changes the most in a Flow (cond routed to the base, not the bijector)."""
    _fit_verify_save(CASES[IDS.index("ClassConditionalGaussian")], tmp_path)


@pytest.mark.extended
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_flow_with_each_base_fits_verifies_saves_and_loads(case, tmp_path):
    _fit_verify_save(case, tmp_path)


GRAD_CASES = [
    pytest.param(c, id=c.name, marks=() if c.name == "GaussianMixture"
                 else pytest.mark.extended)
    for c in CASES if c.name != "Uniform"  # the uniform has no trainable parameter
]  # fmt: skip


@pytest.mark.parametrize("case", GRAD_CASES)
def test_gradients_reach_every_base_parameter_float64(case):
    """Maximum likelihood and the reparameterised sample path both reach every parameter."""
    base = case.build(jnp.float64)
    flow = _flow(base)
    x = jax.random.normal(jax.random.key(0), (16, D), jnp.float64)
    cond = jax.nn.one_hot(jnp.arange(16) % 4, 4, dtype=jnp.float64) if case.conditional else None

    def nll(model):
        return invnet.MaximumLikelihood()(
            model, {"x": x, **({"cond": cond} if case.conditional else {})}
        )

    def reverse(model):  # the variational path: reverse KL to N(1, I) through the samples
        xs, lq = model.sample_and_log_prob(jax.random.key(1), 16, cond=cond, dtype=jnp.float64)
        return jnp.mean(lq + 0.5 * jnp.sum((xs - 1.0) ** 2, axis=-1))

    for loss in (nll, reverse):
        grads = nnx.jit(nnx.grad(loss))(flow)  # one compile, not op by op
        base_grads = jax.tree.leaves(grads["base"])
        assert base_grads and all(np.all(np.isfinite(g)) and np.any(g != 0) for g in base_grads)


def test_flow_refuses_a_base_of_the_wrong_size_or_cond():
    with pytest.raises(ValueError, match="elements"):
        _flow(invnet.DiagonalGaussian(D + 1))
    rngs = nnx.Rngs(0)
    cbij = invnet.AffineCoupling(D, hidden=(8,), cond_dim=2, rngs=rngs)
    with pytest.raises(ValueError, match="same cond_dim"):
        invnet.Flow(cbij, invnet.ClassConditionalGaussian(D, 3, rngs=rngs))
    flow = _flow(invnet.Uniform(D))
    with pytest.raises(ValueError, match="temperature"):
        flow.sample(0, 3, temperature=0.5)


class LaplaceForTests(invnet.Distribution):
    """A user's own base: iid Laplace with a learnable location (registered by subclassing)."""

    def __init__(self, event_shape, *, param_dtype=jnp.float32):
        self.event_shape = (event_shape,) if isinstance(event_shape, int) else tuple(event_shape)
        self.param_dtype = jnp.dtype(param_dtype)
        self.loc = nnx.Param(jnp.zeros(self.event_shape, self.param_dtype))

    def _log_prob(self, z, cond):
        return self._sum_event(-jnp.abs(z - self.loc[...].astype(z.dtype)) - math.log(2.0))

    def _sample(self, key, n, cond, dtype, temperature):
        eps = jax.random.laplace(key, (n, *self.event_shape), dtype)
        return self.loc[...].astype(dtype) + temperature * eps

    def get_config(self):
        return self._config()


def test_a_custom_base_saves_and_loads(tmp_path):
    base = _perturb(LaplaceForTests(D))
    flow = _flow(base)
    x = jax.random.normal(jax.random.key(0), (8, D), jnp.float32)
    np.testing.assert_allclose(base.log_prob(x), stats.laplace.logpdf(x, _np(base, "loc")).sum(-1),
                               rtol=1e-5)  # fmt: skip
    _check_save_load(flow, base, x, None, tmp_path / "custom.invnet")
