"""One registry of every public layer (plus nested containers) for the contract test.

Each case builds a layer of a given parameter dtype, with its parameters moved away from
their (often identity) initialisation so the checks prove something.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import invnet

DIM = 5
COND_DIM = 3


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[jnp.dtype, nnx.Rngs], invnet.Bijector]
    cond_dim: int = 0
    # float32 round-trip bound: ~eps32 x amplification of the perturbed layer, stated per case
    tol32: float = 1e-5
    # the input event: (DIM,) for vector layers, (H, W, C) for image layers
    event_shape: tuple[int, ...] = (DIM,)


def perturb(model: nnx.Module, scale: float = 0.3, seed: int = 1) -> nnx.Module:
    """Add scale * N(0, 1) to every trainable parameter, in place, so the checks prove
    something (numpy noise: no per-shape jax compiles). Shared by every test module."""
    rng = np.random.default_rng(seed)
    params = nnx.state(model, nnx.Param)
    noise = lambda p: jnp.asarray(scale * rng.standard_normal(p.shape), p.dtype)  # noqa: E731
    nnx.update(model, jax.tree.map(lambda p: p + noise(p), params))
    return model


def _lu(dt, rngs):
    return invnet.LULinear(DIM, param_dtype=dt, rngs=rngs)


def _lu_plain(dt, rngs):
    return invnet.LULinear(DIM, bias=False, init="identity", param_dtype=dt, rngs=rngs)


def _lu_from_matrix(dt, rngs):
    w = np.random.default_rng(0).normal(size=(DIM, DIM)) + 2 * np.eye(DIM)
    return invnet.LULinear.from_matrix(w, np.arange(DIM, dtype=float), param_dtype=dt)


def _actnorm(dt, rngs):
    layer = invnet.ActNorm(DIM, param_dtype=dt)
    x = 2.0 + 3.0 * jax.random.normal(jax.random.key(7), (64, DIM), dt)
    layer.data_init(x)
    return layer


def _nested(dt, rngs):
    inner = invnet.Sequential(
        invnet.AffineCoupling(DIM, hidden=(8,), param_dtype=dt, rngs=rngs),
        invnet.Permute(DIM, rngs=rngs),
    )
    return invnet.Sequential(
        invnet.LULinear(DIM, param_dtype=dt, rngs=rngs),
        invnet.LeakyReLU(0.5),
        inner,
        invnet.Inverse(invnet.LULinear(DIM, param_dtype=dt, rngs=rngs)),
        invnet.ActNorm(DIM, param_dtype=dt),
    )


def _conditional_stack(dt, rngs):
    return invnet.Sequential(
        invnet.AffineCoupling(DIM, hidden=(8,), cond_dim=COND_DIM, param_dtype=dt, rngs=rngs),
        invnet.Permute(DIM, mode="reverse"),
        invnet.AdditiveCoupling(DIM, hidden=(8,), cond_dim=COND_DIM, param_dtype=dt, rngs=rngs),
        invnet.LULinear(DIM, param_dtype=dt, rngs=rngs),
    )


def _flow(dt, rngs):
    return invnet.Flow(
        invnet.Sequential(
            invnet.LULinear(DIM, param_dtype=dt, rngs=rngs),
            invnet.AffineCoupling(DIM, hidden=(8,), param_dtype=dt, rngs=rngs),
        )
    )


IMAGE = (4, 4, 2)


def _image_stack(dt, rngs):
    """A rank-3 event that changes shape: image -> vector."""
    return invnet.Sequential(
        invnet.ActNorm(IMAGE[-1], event_ndim=3, param_dtype=dt),
        invnet.LeakyReLU(0.5),
        invnet.Reshape(IMAGE, (32,)),
        invnet.LULinear(32, param_dtype=dt, rngs=rngs),
    )


CASES: list[Case] = [
    Case("LULinear", _lu),
    Case("LULinear-identity-nobias", _lu_plain),
    Case("LULinear.from_matrix", _lu_from_matrix),
    Case("LeakyReLU", lambda dt, rngs: invnet.LeakyReLU(0.3, param_dtype=dt)),
    Case(
        "LeakyReLU-learnable",
        lambda dt, rngs: invnet.LeakyReLU(0.3, learnable=True, param_dtype=dt),
    ),
    Case(
        "AffineCoupling",
        lambda dt, rngs: invnet.AffineCoupling(DIM, hidden=(8, 8), param_dtype=dt, rngs=rngs),
    ),
    Case(
        "AffineCoupling-mask",
        lambda dt, rngs: invnet.AffineCoupling(
            DIM,
            hidden=(8,),
            mask=[True, False, True, False, False],
            activation="tanh",
            param_dtype=dt,
            rngs=rngs,
        ),
    ),
    Case(
        "AffineCoupling-cond",
        lambda dt, rngs: invnet.AffineCoupling(
            DIM, hidden=(8,), cond_dim=COND_DIM, param_dtype=dt, rngs=rngs
        ),
        cond_dim=COND_DIM,
    ),
    Case(
        "AdditiveCoupling",
        lambda dt, rngs: invnet.AdditiveCoupling(DIM, hidden=(8,), param_dtype=dt, rngs=rngs),
    ),
    Case(
        "AdditiveCoupling-cond",
        lambda dt, rngs: invnet.AdditiveCoupling(
            DIM, hidden=(8,), cond_dim=COND_DIM, param_dtype=dt, rngs=rngs
        ),
        cond_dim=COND_DIM,
    ),
    Case("Permute", lambda dt, rngs: invnet.Permute(DIM, rngs=rngs)),
    Case("Permute-reverse", lambda dt, rngs: invnet.Permute(DIM, mode="reverse")),
    Case("ActNorm", _actnorm),
    Case(
        "Inverse",
        lambda dt, rngs: invnet.Inverse(
            invnet.AffineCoupling(DIM, hidden=(8,), param_dtype=dt, rngs=rngs)
        ),
    ),
    Case("Sequential-nested", _nested, tol32=1e-4),
    Case("Sequential-cond", _conditional_stack, cond_dim=COND_DIM, tol32=1e-4),
    Case("Flow", _flow),
    Case("Reshape", lambda dt, rngs: invnet.Reshape(IMAGE, (8, 4)), event_shape=IMAGE),
    Case("Sequential-image-to-vector", _image_stack, event_shape=IMAGE, tol32=1e-4),
    Case(
        "Reversible",
        lambda dt, rngs: invnet.reversible(_conditional_stack(dt, rngs)),
        cond_dim=COND_DIM,
        tol32=1e-4,
    ),
]


def build(case: Case, dtype) -> invnet.Bijector:
    model = case.build(jnp.dtype(dtype), nnx.Rngs(0))
    if any(node.not_ready() for node in invnet.core.nodes(model)):  # init before perturbing
        batch = jax.random.normal(jax.random.key(3), (64, *case.event_shape), dtype)
        invnet.data_init(model, batch)
    return perturb(model, 0.3, seed=1)
