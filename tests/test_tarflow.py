"""Transformer autoregressive flows (TarFlow) and the certified parallel (jacobi) inverse.

All in float64 with tight tolerances (1e-12 relative) unless stated; tiny shapes (a 4x4x1
image cut into 2x2 patches: 4 tokens; a vector of 6 in tokens of 2: 3 tokens).
"""

from __future__ import annotations

import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from registry import perturb

import invnet

F64 = jnp.float64
IMAGE = (4, 4, 1)


def _block(shape=IMAGE, patch=2, cond_dim=0, **kwargs):
    layer = invnet.TransformerAutoregressive(
        shape, patch=patch, depth=2, width=8, heads=2, mlp_ratio=2, cond_dim=cond_dim,
        param_dtype=F64, rngs=nnx.Rngs(0), **kwargs,
    )  # fmt: skip
    return perturb(layer, 0.5, seed=2)  # far from the identity: later tokens depend on earlier


def _data(shape=IMAGE, n=8, cond_dim=0, seed=0):
    kx, kc = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(kx, (n, *shape), F64)
    return x, (jax.random.normal(kc, (n, cond_dim), F64) if cond_dim else None)


def _max(a):
    return float(jnp.max(jnp.abs(a)))


_ext = pytest.mark.extended  # the other cases run in CI's extended command


@pytest.mark.parametrize(
    "shape, patch, cond_dim, reverse",
    [  # the default contract case checks the vector sequential inverse to 1e-12
        pytest.param(IMAGE, 2, 3, True, marks=_ext),
        pytest.param(IMAGE, 2, 0, False, marks=_ext),
        pytest.param((6,), 2, 0, True, marks=_ext),
        pytest.param((6,), 1, 2, False, marks=_ext),
    ],
)
def test_sequential_inverse_is_exact(shape, patch, cond_dim, reverse):
    layer = _block(shape, patch, cond_dim, reverse=reverse)
    x, cond = _data(shape, cond_dim=cond_dim)
    y, log_det = layer.forward(x, cond=cond)
    assert _max(y - x) > 1e-2  # the perturbed block is far from the identity
    x_back, inv_log_det = layer.inverse(y, cond=cond)
    assert _max(x_back - x) < 1e-12 * max(_max(x), _max(y))
    assert _max(log_det + inv_log_det) < 1e-12


def test_later_tokens_depend_only_on_earlier_ones():
    """Causality: changing token t changes y only at tokens >= t (t = 2 of 4 here)."""
    layer = _block()
    x, _ = _data(n=1)
    tokens = layer.to_tokens(x)
    bumped = layer.from_tokens(tokens.at[:, 2].add(1.0))
    dy = layer.to_tokens(layer.forward(bumped)[0] - layer.forward(x)[0])
    assert _max(dy[:, :2]) == 0.0 and _max(dy[:, 2:]) > 0.0


@pytest.mark.parametrize("cond_dim", [3, pytest.param(0, marks=_ext)])
def test_jacobi_with_the_full_cap_equals_sequential(cond_dim):
    layer = _block(cond_dim=cond_dim)
    x, cond = _data(cond_dim=cond_dim)
    y, _ = layer.forward(x, cond=cond)
    x_seq, ld_seq, cert_seq = layer.inverse_with_certificate(y, cond=cond, method="sequential")
    x_jac, ld_jac, cert = layer.inverse_with_certificate(y, cond=cond, method="jacobi")
    assert _max(x_jac - x_seq) < 1e-12 and _max(ld_jac - ld_seq) < 1e-12
    assert bool(cert.converged.all()) and int(cert.sweeps.max()) <= layer.n_tokens()
    assert _max(cert.residual) < 1e-12 and bool(cert_seq.converged.all())
    assert cert.sweeps.shape == (8,) and cert.residual.dtype == F64


def test_too_low_a_cap_is_reported_unconverged_and_nan():
    layer = _block(inverse_method="jacobi", max_sweeps=1)
    x, _ = _data()
    y, _ = layer.forward(x)
    x_hat, log_det, cert = layer.inverse_with_certificate(y)
    assert not bool(cert.converged.any())
    assert bool(jnp.all(cert.sweeps == 1)) and bool(jnp.all(cert.change > 0))
    assert bool(jnp.all(jnp.isnan(x_hat))) and bool(jnp.all(jnp.isnan(log_det)))
    with pytest.warns(invnet.NonFiniteWarning, match="did not converge"):
        x_plain, ld_plain = layer.inverse(y)  # the ordinary inverse: NaN, never a wrong x
    assert bool(jnp.all(jnp.isnan(x_plain))) and bool(jnp.all(jnp.isnan(ld_plain)))


@pytest.mark.extended  # ~30 s (the default run keeps the certificate test)
def test_verify_fails_naming_the_unconverged_layer():
    model = invnet.Sequential(_block(), _block(reverse=True, inverse_method="jacobi", max_sweeps=2))
    x, _ = _data(n=16)
    report = invnet.verify(model, x)
    assert not report.ok
    assert any("model[1]" in f and "did not converge" in f for f in report.failures)
    assert report.certificates["model[1]"]["unconverged"] == 16
    assert "jacobi inverse of model[1]" in report.table()
    model[1].max_sweeps = None  # the full cap: exact, verify passes and reports it
    good = invnet.verify(model, x)
    assert good.ok, good.failures
    assert good.certificates["model[1]"]["unconverged"] == 0
    assert good.certificates["model[0]"]["method"] == "sequential"


@pytest.mark.extended  # slow; CI runs it
@pytest.mark.parametrize("transformer", ["affine", "spline"])
def test_masked_autoregressive_jacobi(transformer):
    maf = invnet.MaskedAutoregressive(
        5, transformer=transformer, bins=3, hidden=(16,), param_dtype=F64, rngs=nnx.Rngs(0)
    )
    perturb(maf, 0.5, seed=2)
    x = jax.random.normal(jax.random.key(0), (8, 5), F64)
    y, _ = maf.forward(x)
    x_seq, ld_seq = maf.inverse(y)
    x_jac, ld_jac, cert = maf.inverse_with_certificate(y, method="jacobi")
    # T = 5 sweeps from any start give the same arithmetic as the sequential passes
    assert bool(jnp.array_equal(x_jac, x_seq)) and bool(jnp.array_equal(ld_jac, ld_seq))
    assert bool(cert.converged.all()) and _max(cert.residual) < 1e-12
    assert _max(x_seq - x) < 1e-12
    _, _, capped = maf.inverse_with_certificate(y, method="jacobi", max_sweeps=2)
    assert not bool(capped.converged.all())
    maf.inverse_method, maf.max_sweeps = "jacobi", 2
    with pytest.warns(invnet.NonFiniteWarning, match="did not converge"):
        assert bool(jnp.isnan(maf.inverse(y)[0]).any())


@pytest.mark.extended  # slow; CI runs it
def test_a_loose_tolerance_stops_early_within_it():
    """With tol > 0 a sample stops when a sweep moves it less than tol (relative); the
    stop is per sample and the result is within about tol of the exact inverse."""
    layer = _block(shape=(8, 8, 1), patch=2)  # 16 tokens
    layer.net.out.kernel[...] = layer.net.out.kernel[...] * 0.1  # a gentle, trained-like map
    x, _ = _data(shape=(8, 8, 1))
    y, _ = layer.forward(x)
    x_hat, _, cert = layer.inverse_with_certificate(y, method="jacobi", tol=1e-6)
    assert bool(cert.converged.all()) and int(cert.sweeps.max()) < 16
    assert _max(x_hat - x) < 1e-4


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="inverse_method"):
        _block(inverse_method="newton")
    with pytest.raises(ValueError, match="max_sweeps"):
        _block(max_sweeps=0)
    with pytest.raises(ValueError, match="patches"):
        invnet.TransformerAutoregressive((5, 4, 1), patch=2, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="divisible by heads"):
        invnet.TransformerAutoregressive((6,), width=10, heads=4, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="token"):
        invnet.TransformerAutoregressive((4,), patch=4, rngs=nnx.Rngs(0))


@pytest.mark.extended  # two transformer stacks through custom VJPs: slow to compile
def test_reversible_backprop_matches_ordinary_backprop():
    model = invnet.Sequential(_block(cond_dim=3), _block(cond_dim=3, reverse=True))
    rev = invnet.reversible(model)
    x, cond = _data(cond_dim=3)

    def grads(module):
        graphdef, params, rest = nnx.split(module, nnx.Param, ...)

        def loss(p, x):
            out, log_det = nnx.merge(graphdef, p, rest).forward(x, cond=cond)
            return jnp.sum(jnp.sin(out)) + jnp.sum(log_det**2)

        return jax.grad(loss, argnums=(0, 1))(params, x)

    (gp, gx), (rp, rx) = grads(model), grads(rev)
    assert _max(gx - rx) < 1e-9 * _max(gx)
    for a, b in zip(jax.tree.leaves(gp), jax.tree.leaves(rp), strict=True):
        assert _max(a - b) <= 1e-9 * max(_max(a), 1e-30)


@pytest.mark.extended  # fit, verify, compile: three compilations of the whole flow
def test_builder_goes_through_fit_verify_compile_save_load():
    flow = invnet.tarflow((4, 4, 1), patch=2, blocks=2, depth=1, width=8, heads=2,
                          rngs=nnx.Rngs(0))  # fmt: skip
    x = jax.random.normal(jax.random.key(1), (64, 4, 4, 1)) * 0.5 + 0.2
    history = invnet.fit(flow, x, objective=invnet.NoisyMaximumLikelihood(0.05), epochs=3,
                         batch_size=32, progress=False)  # fmt: skip
    assert history.train_loss[-1] < history.train_loss[0]
    report = invnet.verify(flow, x[:16])
    assert report.ok, report.failures
    fast = invnet.freeze(flow)
    y, _ = flow.forward(x[:4])
    assert _max(fast.forward(x[:4])[0] - y) < 1e-5
    assert _max(fast.inverse(y)[0] - x[:4]) < 1e-4
    with tempfile.TemporaryDirectory() as tmp:
        loaded = invnet.load(invnet.save(flow, os.path.join(tmp, "flow.invnet")))
    assert bool(jnp.array_equal(loaded.log_prob(x[:4]), flow.log_prob(x[:4])))
    assert isinstance(loaded, invnet.Flow) and loaded.bijector[1].reverse


def test_denoise_is_one_score_step():
    """At init the flow is the identity over N(0, I): grad log p(x) = -x exactly."""
    flow = invnet.tarflow((6,), patch=2, blocks=1, depth=1, width=8, heads=2,
                          rngs=nnx.Rngs(0))  # fmt: skip
    x = jax.random.normal(jax.random.key(0), (5, 6), F64)
    np.testing.assert_allclose(invnet.tarflow_denoise(flow, x, 0.1), x * (1 - 0.01), rtol=1e-12)
    assert bool(jnp.array_equal(invnet.tarflow_denoise(flow, x, 0.0), x))
    with pytest.raises(ValueError, match="noise_std"):
        invnet.NoisyMaximumLikelihood(-1.0)
