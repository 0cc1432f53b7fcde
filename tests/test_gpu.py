"""GPU-only checks (``pytest -m gpu`` on a machine with a CUDA jax).

On NVIDIA GPUs JAX's default float32 matmul is TF32-like; invnet layers run their products
at precision="highest", so float32 round trips must stay near eps32 x conditioning there.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import invnet

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _needs_gpu():
    if jax.default_backend() != "gpu":
        pytest.fail("the gpu-marked tests need a GPU backend (run them with -m gpu on a GPU)")


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


def _round_trip_error(model, x):
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
            out.kernel[...] = 0.01 * jax.random.normal(jax.random.key(1), out.kernel.shape)
    x = jax.random.normal(jax.random.key(2), (4096, dim), jnp.float32)
    err_exact = _round_trip_error(model, x)
    invnet.set_precision(model, "default")
    err_fast = _round_trip_error(model, x)
    print(f"D={dim}: precision=highest rel err {err_exact:.2e}; platform default {err_fast:.2e}")
    assert err_exact < 2e-5
    assert err_exact < err_fast  # the platform default really is less exact on this GPU
