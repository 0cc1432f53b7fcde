"""GPU checks (``python -m pytest -o addopts="" -m gpu tests/test_gpu.py`` on a CUDA machine).

Round trips of a compiled, well-conditioned float32 LULinear (identity init, perturbed)
at D=4096 in each precision mode. Bounds: "highest", "bf16x6" and "tf32x3" aim at float32
accuracy (the issue's target for a multi-pass mode: <= 2e-6 relative at D=4096 on an
H100; the test allows 1e-5 because 2e-6 has not yet been measured on this code);
"bf16x3" ~ 3 bf16 passes, allowed 1e-3; "default" (TF32-like, ~5e-4 measured by the issue)
is only required to be finite and worse than "highest" is not asserted. The eager layer's
triangular solves at "highest" are checked too.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from registry import perturb

import invnet

pytestmark = pytest.mark.gpu

BOUNDS = {"highest": 1e-5, "bf16x6": 1e-5, "tf32x3": 1e-5, "bf16x3": 1e-3, "default": None}


def _layer(dim):
    # identity init + 0.3 / sqrt(D) per factor entry: condition number ~2.4 at D=1024..4096;
    # on CPU (true float32) its round trip is 1.8e-06 compiled and 1.4e-06 with solves
    return perturb(invnet.LULinear(dim, init="identity", rngs=nnx.Rngs(0)), 0.3 / dim**0.5)


def _rel(a, b):
    return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


def test_backend_is_gpu():
    assert jax.default_backend() == "gpu", (
        f"the gpu tests need a CUDA jax; the backend here is {jax.default_backend()!r}"
    )


@pytest.mark.parametrize("mode", list(BOUNDS))
def test_compiled_round_trip_per_precision(mode):
    assert jax.default_backend() == "gpu"
    dim = 4096
    layer = invnet.set_precision(_layer(dim), mode)
    x = jax.random.normal(jax.random.key(2), (8192, dim))
    fast = invnet.freeze(layer)
    y, log_det = fast.forward(x)
    x_back, inv_log_det = fast.inverse(y)
    err = _rel(x_back, x)
    assert np.isfinite(err)
    assert jnp.allclose(log_det, -inv_log_det)
    if BOUNDS[mode] is not None:
        assert err <= BOUNDS[mode], f"{mode}: round-trip relative error {err:.2e}"


def test_eager_layer_round_trip_at_highest():
    assert jax.default_backend() == "gpu"
    layer = _layer(1024)
    x = jax.random.normal(jax.random.key(2), (4096, 1024))
    y, _ = layer.forward(x)
    assert _rel(layer.inverse(y)[0], x) <= 1e-5


def test_reversible_gradients_on_gpu():
    assert jax.default_backend() == "gpu"
    r = nnx.Rngs(0)
    blocks = [
        invnet.Sequential(
            invnet.AffineCoupling(16, hidden=(32,), rngs=r), invnet.Permute(16, rngs=r)
        )
        for _ in range(4)
    ]
    model = perturb(invnet.Sequential(*blocks), 0.05)
    x = jax.random.normal(jax.random.key(0), (64, 16))

    def loss(m):
        y, log_det = m.forward(x)
        return jnp.sum(y**2) - jnp.sum(log_det)

    g1 = jax.tree.leaves(nnx.grad(loss)(model))
    g2 = jax.tree.leaves(nnx.grad(loss)(invnet.reversible(model)))
    assert (
        max(
            _rel(b, a) if float(jnp.max(jnp.abs(a))) > 0 else 0.0
            for a, b in zip(g1, g2, strict=True)
        )
        <= 1e-4
    )


# a deep LU + LeakyReLU + coupling model, jitted without invnet.freeze
def _deep_model(dim, rngs):
    layers = []
    for _ in range(4):
        layers += [
            invnet.LULinear(dim, rngs=rngs),
            invnet.LeakyReLU(0.5),
            invnet.AffineCoupling(dim, hidden=(256,), rngs=rngs),
            invnet.Permute(dim, rngs=rngs),
        ]
    return invnet.Sequential(*layers)


def _jit_round_trip_error(model, x):
    graphdef, state = nnx.split(model)
    fwd = jax.jit(lambda s, v: nnx.merge(graphdef, s).forward(v))
    inv = jax.jit(lambda s, v: nnx.merge(graphdef, s).inverse(v))
    y, _ = fwd(state, x)
    x_back, _ = inv(state, y)
    return float(jnp.max(jnp.abs(x_back - x)) / jnp.max(jnp.abs(x)))


@pytest.mark.parametrize("dim", [64, 1024])
def test_float32_round_trip_is_exact_at_default_precision_setting(dim):
    model = _deep_model(dim, nnx.Rngs(0))
    # move the couplings off their identity init; the LU layers keep their orthogonal init
    # (random perturbations of a D=1024 unit-lower factor make W exponentially ill-conditioned)
    for block in model:
        if isinstance(block, invnet.AffineCoupling):
            out = block.conditioner.out
            out.kernel[...] = 0.01 * jax.random.normal(
                jax.random.key(1), out.kernel.shape, out.kernel.dtype
            )
    x = jax.random.normal(jax.random.key(2), (4096, dim), jnp.float32)
    err_exact = _jit_round_trip_error(model, x)
    invnet.set_precision(model, "default")
    err_fast = _jit_round_trip_error(model, x)
    print(f"D={dim}: precision=highest rel err {err_exact:.2e}; platform default {err_fast:.2e}")
    assert err_exact < 2e-5
    assert err_exact < err_fast  # the platform default really is less exact on this GPU
