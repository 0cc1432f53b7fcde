"""invnet.reversible: same outputs, gradients equal to ordinary backprop, flat memory.

Tolerances: float64 gradients agree with ordinary backprop to 1e-9 relative (recomputed
inputs differ only by rounding); float32 to 1e-4 relative for these well-conditioned
models (measured: at most 6e-6); both for parameters, inputs and the condition.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from registry import perturb

import invnet

DIM, COND_DIM = 6, 3


def _mixed(dt):
    """Blocks of different structure (unrolled path), conditional, every layer type."""
    r = nnx.Rngs(0)
    model = invnet.Sequential(
        invnet.Sequential(invnet.LULinear(DIM, param_dtype=dt, rngs=r), invnet.LeakyReLU(0.7)),
        invnet.AffineCoupling(DIM, hidden=(8,), cond_dim=COND_DIM, param_dtype=dt, rngs=r),
        invnet.Permute(DIM, rngs=r),
        invnet.ActNorm(DIM, param_dtype=dt),
        invnet.AdditiveCoupling(DIM, hidden=(8,), param_dtype=dt, rngs=r),
    )
    for _, node in nnx.iter_graph(model):
        if isinstance(node, invnet.ActNorm):
            node.initialized[...] = jnp.asarray(True)
    return perturb(model, 0.1)


def _homogeneous(dt, depth=3):
    r = nnx.Rngs(0)
    blocks = [
        invnet.Sequential(
            invnet.AffineCoupling(DIM, hidden=(8,), cond_dim=COND_DIM, param_dtype=dt, rngs=r),
            invnet.Permute(DIM, rngs=r),
        )
        for _ in range(depth)
    ]
    return perturb(invnet.Sequential(*blocks), 0.1)


def _loss(direction):
    def loss(module, x, cond):
        out, log_det = getattr(module, direction)(x, cond=cond)
        return jnp.sum(jnp.sin(out)) + jnp.sum(log_det**2)

    return loss


def _grads(module, x, cond, direction):
    loss = _loss(direction)
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)

    @jax.jit
    def run(params, rest, x, cond):
        def f(p, x, c):
            # fresh variables in this trace: ActNorm's in-trace init guard writes to its
            # `initialized` buffer, which nnx refuses across trace levels
            return loss(nnx.merge(graphdef, p, jax.tree.map(lambda a: a, rest)), x, c)

        return jax.value_and_grad(f, argnums=(0, 1, 2))(params, x, cond)

    return run(params, rest, x, cond)


def _max_rel(a, b):
    return max(
        float(jnp.max(jnp.abs(u - v)) / jnp.maximum(jnp.max(jnp.abs(u)), 1e-30))
        for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


_ext = pytest.mark.extended  # the other combinations run in CI's extended command
CASES = [  # (dtype, tolerance, model, scan, direction)
    ("float64", 1e-9, "mixed", False, "forward"),
    pytest.param("float64", 1e-9, "mixed", False, "inverse", marks=_ext),
    pytest.param("float64", 1e-9, "homogeneous", True, "forward", marks=_ext),
    pytest.param("float64", 1e-9, "homogeneous", True, "inverse", marks=_ext),
    pytest.param("float32", 1e-4, "mixed", False, "forward", marks=_ext),
    ("float32", 1e-4, "homogeneous", True, "inverse"),
]


@pytest.mark.parametrize("dtype, tol, kind, scan, direction", CASES)
def test_gradients_equal_ordinary_backprop(dtype, tol, kind, scan, direction):
    with jax.enable_x64(dtype == "float64"):
        dt = jnp.dtype(dtype)
        model = (_mixed if kind == "mixed" else _homogeneous)(dt)
        rev = invnet.reversible(model, scan=scan)
        x = jax.random.normal(jax.random.key(2), (4, DIM), dt)
        cond = jax.random.normal(jax.random.key(3), (4, COND_DIM), dt)
        value, (g_params, g_x, g_cond) = _grads(model, x, cond, direction)
        value_r, (g_params_r, g_x_r, g_cond_r) = _grads(rev, x, cond, direction)
        n_params = len(jax.tree.leaves(g_params))
        assert n_params == len(jax.tree.leaves(g_params_r)) and n_params > 5
        assert abs(float(value - value_r)) <= tol * (1 + abs(float(value)))
        assert _max_rel(g_params, g_params_r) <= tol
        assert _max_rel(g_x, g_x_r) <= tol
        assert _max_rel(g_cond, g_cond_r) <= tol
        assert all(float(jnp.max(jnp.abs(g))) > 0 for g in jax.tree.leaves(g_params_r))


def test_same_outputs_and_eager_use():
    model = _homogeneous(jnp.float32, depth=2)
    rev = invnet.reversible(model)
    x = jax.random.normal(jax.random.key(2), (4, DIM))
    cond = jnp.ones((COND_DIM,))
    y, log_det = rev.forward(x, cond=cond)
    y_m, log_det_m = model.forward(x, cond=cond)
    assert jnp.array_equal(y, y_m) and jnp.array_equal(log_det, log_det_m)
    x_back, inv_log_det = rev.inverse(y, cond=cond)
    assert jnp.allclose(x_back, x, atol=1e-5) and jnp.allclose(inv_log_det, -log_det, atol=1e-5)
    grads = nnx.grad(lambda m: jnp.sum(m.forward(x, cond=cond)[0] ** 2))(rev)
    assert len(jax.tree.leaves(grads)) == len(jax.tree.leaves(nnx.state(model, nnx.Param)))


def test_refusals():
    with pytest.raises(ValueError, match="data_init"):
        invnet.reversible(invnet.ActNorm(3)).forward(jnp.ones((2, 3)))
    mixed = invnet.Sequential(invnet.LeakyReLU(0.5), invnet.Permute(3, mode="reverse"))
    with pytest.raises(ValueError, match="share one structure"):
        invnet.reversible(mixed, scan=True).forward(jnp.ones((2, 3)))
    with pytest.raises(TypeError, match="Bijector"):
        invnet.reversible(nnx.Linear(2, 2, rngs=nnx.Rngs(0)))


def _temp_bytes(module, x):
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)

    def loss(p):
        y, log_det = nnx.merge(graphdef, p, rest).forward(x)
        return jnp.sum(y**2) - jnp.sum(log_det)

    compiled = jax.jit(jax.grad(loss)).lower(params).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_activation_memory_is_flat_in_depth():
    """XLA's compiled memory analysis: ordinary backprop's temp memory grows with depth,
    the reversible step's does not (depth 2 -> 8, at most 1.2x)."""
    x = jax.random.normal(jax.random.key(0), (256, 4), jnp.float32)

    def model(depth):
        r = nnx.Rngs(0)
        return invnet.Sequential(
            *[
                invnet.Sequential(
                    invnet.AffineCoupling(4, hidden=(64,), rngs=r), invnet.Permute(4, rngs=r)
                )
                for _ in range(depth)
            ]
        )

    shallow, deep = model(2), model(8)
    ordinary = _temp_bytes(shallow, x), _temp_bytes(deep, x)
    rev = _temp_bytes(invnet.reversible(shallow), x), _temp_bytes(invnet.reversible(deep), x)
    assert ordinary[1] > 2.5 * ordinary[0]  # the measurement does see stored activations
    assert rev[1] <= 1.2 * rev[0]
