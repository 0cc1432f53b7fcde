"""The ready-made flows: layout by option, exact round trip, log-density, bad options."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import invnet
from invnet.builders import alternating_permutation


def _perturb(model, scale=0.3):
    params = nnx.state(model, nnx.Param)
    leaves = jax.tree.leaves(params)
    keys = iter(jax.random.split(jax.random.key(1), len(leaves)))
    nnx.update(model, jax.tree.map(
        lambda p: p + scale * jax.random.normal(next(keys), p.shape, p.dtype), params))  # fmt: skip


_ext = pytest.mark.extended  # the other combinations run in CI's extended command
LAYOUTS = [  # (builder, mixing, actnorm)
    (invnet.affine_flow, "alternate", False),
    (invnet.spline_flow, "lu", True),
    pytest.param(invnet.affine_flow, "permute", False, marks=_ext),
    pytest.param(invnet.affine_flow, "lu", True, marks=_ext),
    pytest.param(invnet.spline_flow, "alternate", False, marks=_ext),
    pytest.param(invnet.spline_flow, "permute", False, marks=_ext),
]


@pytest.mark.parametrize(("builder", "mixing", "actnorm"), LAYOUTS)
def test_builder_layout_and_round_trip(builder, mixing, actnorm):
    flow = builder(3, layers=2, hidden=(8,), mixing=mixing, actnorm=actnorm, rngs=nnx.Rngs(0))
    block = "AffineCoupling" if builder is invnet.affine_flow else "SplineCoupling"
    mix = {"alternate": "Permute", "permute": "Permute", "lu": "LULinear"}[mixing]
    norm = ["ActNorm"] if actnorm else []
    assert [type(b).__name__ for b in flow.bijector] == [*norm, block, mix, *norm, block]
    x = jax.random.normal(jax.random.key(0), (16, 3), jnp.float64)
    invnet.data_init(flow, x)  # ActNorm's data-dependent init (no-op without ActNorm)
    _perturb(flow.bijector)
    _perturb(flow.base)
    z, log_det = flow.forward(x)
    x_back, inv_log_det = flow.inverse(z)
    np.testing.assert_allclose(x_back, x, atol=1e-10)
    np.testing.assert_allclose(log_det + inv_log_det, 0.0, atol=1e-10)
    assert isinstance(
        flow.base, invnet.StudentT
    )  # the default base (its formula: test_distributions)
    np.testing.assert_allclose(flow.log_prob(x), flow.base.log_prob(z) + log_det, rtol=1e-10)
    gaussian = builder(3, layers=2, hidden=(8,), mixing=mixing, base="normal", rngs=nnx.Rngs(0))
    z = gaussian.forward(x)[0]
    normal = -0.5 * jnp.sum(z**2, axis=-1) - 1.5 * jnp.log(2 * jnp.pi)
    np.testing.assert_allclose(gaussian.log_prob(x), normal + gaussian.forward(x)[1], rtol=1e-10)


@pytest.mark.parametrize("builder", [invnet.affine_flow, invnet.spline_flow])
def test_builder_refuses_bad_options(builder):
    with pytest.raises(ValueError, match="layers"):
        builder(3, layers=0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="mixing must be one of"):
        builder(3, mixing="householder", rngs=nnx.Rngs(0))


@pytest.mark.parametrize("dim", [2, 3, 4, 5, 10, 31])
def test_alternating_permutation_moves_the_transformed_half_to_the_front(dim):
    """The next coupling conditions on features the previous one transformed, so no two
    couplings in a row transform the same half (a plain random permutation of 2 features is
    the identity half of the time)."""
    half = dim // 2
    for seed in range(20):
        perm = alternating_permutation(dim, jax.random.key(seed))
        assert sorted(perm.tolist()) == list(range(dim))
        assert set(perm[:half].tolist()) <= set(range(half, dim))
    assert alternating_permutation(2, jax.random.key(0)).tolist() == [1, 0]
    flow = invnet.spline_flow(dim, layers=3, hidden=(4,), mixing="alternate", rngs=nnx.Rngs(0))
    for layer in flow.bijector:
        if isinstance(layer, invnet.Permute):
            assert set(np.asarray(layer.perm[...])[:half].tolist()) <= set(range(half, dim))


@pytest.mark.parametrize(
    "builder", [invnet.affine_flow, pytest.param(invnet.spline_flow, marks=_ext)]
)
def test_builders_take_a_base(builder, tmp_path):
    x = jax.random.normal(jax.random.key(0), (4, 3), jnp.float32)
    student = builder(3, layers=2, hidden=(8,), base="student", rngs=nnx.Rngs(0))
    assert isinstance(student.base, invnet.StudentT)
    assert {k for k in nnx.state(student.base, nnx.Param)} >= {"log_df"}  # df is learnt
    normal = builder(3, layers=2, hidden=(8,), base="normal", rngs=nnx.Rngs(0))
    assert isinstance(normal.base, invnet.StandardNormal)
    z, log_det = normal.forward(x)  # same bijector (same seed); only the base differs
    expected = student.base.log_prob(z) + log_det
    np.testing.assert_allclose(student.log_prob(x), expected, rtol=1e-6)
    given = invnet.GaussianMixture(3, components=2, rngs=nnx.Rngs(1))
    assert builder(3, layers=2, hidden=(8,), base=given, rngs=nnx.Rngs(0)).base is given
    invnet.save(student, tmp_path / "s.invnet")
    assert isinstance(invnet.load(tmp_path / "s.invnet").base, invnet.StudentT)
    with pytest.raises(ValueError, match="base must be one of"):
        builder(3, base="cauchy", rngs=nnx.Rngs(0))
