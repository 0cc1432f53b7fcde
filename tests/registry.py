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


# Variants of a layer whose plain case already runs in the default command: their contract
# checks run with -m extended (CI), which keeps the default command short.
VARIANTS = {
    "LULinear-identity-nobias",
    "LULinear.from_matrix",
    "LeakyReLU-learnable",
    "AffineCoupling-mask",
    "AdditiveCoupling-cond",
    "Permute-reverse",
    "Sequential-nested",
    "Sequential-image-to-vector",
    "Householder-2",
    "SplineCoupling-cond-mask",
    "MaskedAutoregressive-spline-cond",
    "MaskedAutoregressive-jacobi",
    "Conv1x1-identity-nobias",
    "Conv1x1.from_matrix",
    "Squeeze-4",
    "ConvAffineCoupling-cond",
    "ConvAdditiveCoupling-cond",
    "Dequantize-image",
    "TransformerAutoregressive-image",
    "TransformerAutoregressive-image-cond-reverse-jacobi",
    "TransformerAutoregressive-vector-cond-spline",
}


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


def _squash(layer_type):
    # R -> interval -> R: the contract test inverts arbitrary normal outputs, which have no
    # preimage under Tanh/Sigmoid alone; their domain tests are in tests/test_convert.py
    return lambda dt, rngs: invnet.Sequential(layer_type(), invnet.Inverse(layer_type()))


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
    Case("Tanh", _squash(invnet.Tanh), tol32=1e-4),
    Case("Sigmoid", _squash(invnet.Sigmoid), tol32=1e-4),
    Case(
        "SplineCoupling",
        lambda dt, rngs: invnet.SplineCoupling(
            DIM, bins=4, bound=2.0, hidden=(8,), param_dtype=dt, rngs=rngs
        ),
        tol32=1e-4,
    ),
    Case(
        "SplineCoupling-cond-mask",
        lambda dt, rngs: invnet.SplineCoupling(
            DIM,
            bins=3,
            hidden=(8,),
            cond_dim=COND_DIM,
            mask=[False, True, False, True, True],
            activation="tanh",
            param_dtype=dt,
            rngs=rngs,
        ),
        cond_dim=COND_DIM,
        tol32=1e-4,
    ),
    Case(
        "MaskedAutoregressive-affine",
        lambda dt, rngs: invnet.MaskedAutoregressive(DIM, hidden=(8,), param_dtype=dt, rngs=rngs),
        tol32=1e-4,
    ),
    Case(
        "MaskedAutoregressive-spline-cond",
        lambda dt, rngs: invnet.MaskedAutoregressive(
            DIM,
            transformer="spline",
            bins=3,
            hidden=(8,),
            cond_dim=COND_DIM,
            param_dtype=dt,
            rngs=rngs,
        ),
        cond_dim=COND_DIM,
        tol32=1e-4,
    ),
    Case("Householder", lambda dt, rngs: invnet.Householder(DIM, param_dtype=dt, rngs=rngs)),
    Case(
        "Householder-2",
        lambda dt, rngs: invnet.Householder(DIM, reflections=2, param_dtype=dt, rngs=rngs),
    ),
]


def build(case: Case, dtype) -> invnet.Bijector:
    model = case.build(jnp.dtype(dtype), nnx.Rngs(0))
    if any(node.not_ready() for node in invnet.core.nodes(model)):  # init before perturbing
        batch = jax.random.normal(jax.random.key(3), (64, *case.event_shape), dtype)
        invnet.data_init(model, batch)
    return perturb(model, 0.3, seed=1)


# ---------------------------------------------------------------- image layers (issue 10)
IMAGE_1 = (8, 8, 1)


def _conv1x1_from_matrix(dt, rngs):
    w = np.random.default_rng(0).normal(size=(2, 2)) + 2 * np.eye(2)
    return invnet.Conv1x1.from_matrix(w, np.arange(2, dtype=float), param_dtype=dt)


def _multiscale(dt, rngs):
    """A two-level multi-scale model: (4, 4, 2) -> (2, 2, 8) -> factor out 4 channels."""
    rest = invnet.Sequential(
        invnet.ActNorm(4, event_ndim=3, param_dtype=dt),
        invnet.Conv1x1(4, param_dtype=dt, rngs=rngs),
        invnet.ConvAffineCoupling(4, hidden=4, param_dtype=dt, rngs=rngs),
        invnet.Reshape((2, 2, 4), (16,)),
    )
    return invnet.Sequential(
        invnet.Squeeze(),
        invnet.ConvAffineCoupling(8, hidden=4, param_dtype=dt, rngs=rngs),
        invnet.FactorOut(4, rest, event_shape=(2, 2, 8)),
    )


def _logit_pair(dt, rngs):
    """Logit's domain is an interval, so the contract (normal inputs both ways) runs it
    behind its own inverse with a LULinear between; tests/test_images.py checks it alone
    on pixel data."""
    return invnet.Sequential(
        invnet.Inverse(invnet.Logit(0.05)),
        invnet.Logit(0.05),
        invnet.LULinear(DIM, param_dtype=dt, rngs=rngs),
        invnet.Inverse(invnet.Logit(0.1)),
        invnet.Logit(0.1),
    )


CASES += [
    Case(
        "Conv1x1", lambda dt, rngs: invnet.Conv1x1(2, param_dtype=dt, rngs=rngs), event_shape=IMAGE
    ),
    Case(
        "Conv1x1-identity-nobias",
        lambda dt, rngs: invnet.Conv1x1(3, bias=False, init="identity", param_dtype=dt, rngs=rngs),
        event_shape=(2, 2, 3),
    ),
    Case("Conv1x1.from_matrix", _conv1x1_from_matrix, event_shape=IMAGE),
    Case("Squeeze", lambda dt, rngs: invnet.Squeeze(), event_shape=IMAGE),
    Case("Squeeze-4", lambda dt, rngs: invnet.Squeeze(4), event_shape=IMAGE_1),
    Case("HaarDownsample", lambda dt, rngs: invnet.HaarDownsample(), event_shape=IMAGE),
    Case(
        "ConvAffineCoupling",
        lambda dt, rngs: invnet.ConvAffineCoupling(2, hidden=4, param_dtype=dt, rngs=rngs),
        event_shape=IMAGE,
    ),
    Case(
        "ConvAffineCoupling-cond",
        lambda dt, rngs: invnet.ConvAffineCoupling(
            3, hidden=4, cond_dim=COND_DIM, activation="tanh", param_dtype=dt, rngs=rngs
        ),
        cond_dim=COND_DIM,
        event_shape=(4, 4, 3),
    ),
    Case(
        "ConvAdditiveCoupling",
        lambda dt, rngs: invnet.ConvAdditiveCoupling(2, hidden=4, param_dtype=dt, rngs=rngs),
        event_shape=IMAGE,
    ),
    Case(
        "ConvAdditiveCoupling-cond",
        lambda dt, rngs: invnet.ConvAdditiveCoupling(
            2, hidden=4, cond_dim=COND_DIM, param_dtype=dt, rngs=rngs
        ),
        cond_dim=COND_DIM,
        event_shape=IMAGE,
    ),
    Case("FactorOut-multiscale", _multiscale, event_shape=IMAGE, tol32=1e-4),
    Case("Logit", _logit_pair, tol32=1e-4),
    Case("Dequantize", lambda dt, rngs: invnet.Dequantize(256)),
    Case(
        "Dequantize-image", lambda dt, rngs: invnet.Dequantize(16, event_ndim=3), event_shape=IMAGE
    ),
]


# ------------------------------------------------- transformer autoregressive (issue 21)
def _tarflow(event_shape, patch, cond_dim=0, **kwargs):
    return lambda dt, rngs: invnet.TransformerAutoregressive(
        event_shape, patch=patch, depth=1, width=8, heads=2, mlp_ratio=2, cond_dim=cond_dim,
        param_dtype=dt, rngs=rngs, **kwargs,
    )  # fmt: skip


CASES += [
    Case(
        "TransformerAutoregressive-image", _tarflow((4, 4, 1), 2), event_shape=(4, 4, 1), tol32=1e-4
    ),  # fmt: skip
    Case(
        "TransformerAutoregressive-image-cond-reverse-jacobi",
        _tarflow((4, 4, 1), 2, COND_DIM, reverse=True, inverse_method="jacobi"),
        cond_dim=COND_DIM,
        event_shape=(4, 4, 1),
        tol32=1e-4,
    ),  # fmt: skip
    Case("TransformerAutoregressive-vector", _tarflow((6,), 2), event_shape=(6,), tol32=1e-4),
    Case(
        "TransformerAutoregressive-vector-cond-spline",
        _tarflow((6,), 1, COND_DIM, transformer="spline", bins=3),
        cond_dim=COND_DIM,
        event_shape=(6,),
        tol32=1e-4,
    ),  # fmt: skip
    Case(
        "MaskedAutoregressive-jacobi",
        lambda dt, rngs: invnet.MaskedAutoregressive(
            DIM, hidden=(8,), inverse_method="jacobi", param_dtype=dt, rngs=rngs
        ),
        tol32=1e-4,
    ),  # fmt: skip
]
