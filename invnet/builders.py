"""Builders: ready-made flows assembled from invnet layers (no math of their own)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from invnet.containers import Sequential
from invnet.distributions import StudentT
from invnet.flows import Flow
from invnet.layers import (
    ActNorm,
    AffineCoupling,
    LULinear,
    MaskedAutoregressive,
    Permute,
    SplineCoupling,
)

__all__ = ["affine_flow", "spline_flow"]
_MIXINGS = ("alternate", "permute", "lu")


def alternating_permutation(dim: int, key) -> np.ndarray:
    """A random permutation that brings the half a coupling just transformed (the last
    ``dim - dim // 2`` features) to the front, where the next coupling reads it.

    The first ``dim // 2`` outputs are drawn from the transformed half, the rest are the
    remaining features in random order: every feature is transformed at least every other
    block (as RealNVP's alternating masks), and in 2-D this is the swap. A plain random
    permutation can leave the split unchanged (in 2-D half of them are the identity), and
    two couplings in a row then transform the same features.
    """
    half = dim // 2
    first_key, rest_key = jax.random.split(key)
    front = np.asarray(jax.random.permutation(first_key, np.arange(half, dim)))[:half]
    rest = np.setdiff1d(np.arange(dim), front)
    return np.concatenate([front, np.asarray(jax.random.permutation(rest_key, rest))])


def _mixing(kind: str, dim: int, rngs: nnx.Rngs, param_dtype: Any):
    """The layer between two blocks: a `Permute` (``"alternate"``: see
    `alternating_permutation`; ``"permute"``: any random one) or a learnable `LULinear`."""
    if kind == "alternate":
        return Permute(dim, perm=alternating_permutation(dim, rngs.params()))
    if kind == "permute":
        return Permute(dim, rngs=rngs)
    return LULinear(dim, param_dtype=param_dtype, rngs=rngs)


def _check(name: str, layers, mixing: str) -> None:
    if not isinstance(layers, int) or layers < 1:
        raise ValueError(f"{name}: layers must be a positive integer, got {layers!r}")
    if mixing not in _MIXINGS:
        raise ValueError(f"{name}: mixing must be one of {_MIXINGS}, got {mixing!r}")


BASES = ("normal", "student")


def _base(name, base, dim: int, param_dtype):
    """The flow's base: ``"normal"`` (standard normal), ``"student"`` (a learnable
    `invnet.StudentT`: location, scale and one shared ``df``, started at 10 so the flow
    begins near the Gaussian), or any `invnet.Distribution` as given."""
    if base is None or (isinstance(base, str) and base == "normal"):
        return None
    if isinstance(base, str) and base == "student":
        return StudentT(dim, df=10.0, learn_df=True, param_dtype=param_dtype)
    if isinstance(base, str):
        raise ValueError(f"{name}: base must be one of {BASES} or an invnet.Distribution, "
                         f"got {base!r}")  # fmt: skip
    return base


def _stack(dim, layers, mixing, actnorm, param_dtype, rngs, make_block, base=None) -> Flow:
    """``[mixing] [ActNorm] block`` repeated ``layers`` times (no mixing before the first)."""
    blocks = []
    for i in range(layers):
        if i > 0:
            blocks.append(_mixing(mixing, dim, rngs, param_dtype))
        if actnorm:
            blocks.append(ActNorm(dim, param_dtype=param_dtype))
        blocks.append(make_block())
    return Flow(Sequential(*blocks), base)


def affine_flow(
    dim: int,
    *,
    layers: int = 4,
    hidden: Sequence[int] = (64, 64),
    clamp: float = 2.0,
    mixing: str = "alternate",
    actnorm: bool = False,
    cond_dim: int = 0,
    activation: str = "tanh",
    base: str | Any = "student",
    param_dtype: Any = jnp.float32,
    rngs: nnx.Rngs,
) -> Flow:
    """A RealNVP-style flow: ``layers`` `AffineCoupling` blocks over a learnable Student-t
    base, with a mixing layer between blocks and, with ``actnorm=True``, an `ActNorm` before
    each.

    Mixing: ``"alternate"`` (default) a random `Permute` that brings the half just
    transformed to the front, where the next coupling reads it (`alternating_permutation`;
    the swap in 2-D); ``"permute"`` any random `Permute` (in 2-D or 3-D it can leave the
    split unchanged); ``"lu"`` a learnable `LULinear`.

    The defaults (``"alternate"`` mixing, ``tanh`` conditioners) are the ones
    `benchmarks/quality.py` picked by mean rank over its tuning data sets, against the
    previous ``"permute"`` + ``relu`` (see the model-quality page of the docs): a bounded
    activation keeps the scale and shift of points beyond the training range bounded.
    Standardise the data first. Every coupling starts as the identity.

    ``base``: ``"student"`` (default: a learnable `invnet.StudentT`, a location and scale
    per dimension and one shared degrees of freedom started at 10, so training begins near
    a Gaussian), ``"normal"`` (the fixed standard normal), or any `invnet.Distribution`.
    The Student-t base won on 8 of the 10 tuning data sets of `benchmarks/quality.py` at
    each of three split seeds against the standard normal (coupling maps with bounded
    scales cannot turn a Gaussian into a heavy tail, so the base has to carry it); with
    ``base="normal"`` the flow is the one earlier versions built.

    Reference: Dinh et al., "Density estimation using Real NVP", ICLR 2017.

    Example:
        >>> import jax, invnet
        >>> from flax import nnx
        >>> flow = invnet.affine_flow(3, layers=2, hidden=(16,), rngs=nnx.Rngs(0))
        >>> x = jax.random.normal(jax.random.key(0), (5, 3))
        >>> flow.log_prob(x).shape
        (5,)
    """
    _check("affine_flow", layers, mixing)
    base = _base("affine_flow", base, dim, param_dtype)

    def block():
        return AffineCoupling(
            dim, hidden=hidden, clamp=clamp, cond_dim=cond_dim, activation=activation,
            param_dtype=param_dtype, rngs=rngs,
        )  # fmt: skip

    return _stack(dim, layers, mixing, actnorm, param_dtype, rngs, block, base)


def spline_flow(
    dim: int,
    *,
    layers: int = 4,
    bins: int = 8,
    bound: float = 3.0,
    hidden: Sequence[int] = (64, 64),
    cond_dim: int = 0,
    autoregressive: bool = False,
    mixing: str = "permute",
    actnorm: bool = False,
    activation: str = "relu",
    base: str | Any = "student",
    param_dtype: Any = jnp.float32,
    rngs: nnx.Rngs,
) -> Flow:
    """A neural spline flow: ``layers`` spline blocks with a mixing layer between them
    (``"permute"``: a random `Permute`; ``"alternate"``: a random `Permute` that brings the
    half just transformed to the front, see `affine_flow`; ``"lu"``: a learnable
    `LULinear`) and, with ``actnorm=True``, an `ActNorm` before each block, over a learnable
    Student-t base.

    Each block is a `SplineCoupling` (``autoregressive=False``: forward and inverse one
    conditioner pass each) or a spline `MaskedAutoregressive` (``True``: a MAF, fast
    densities, sampling ``dim`` passes per block). The splines act on ``[-bound, bound]``
    and are the identity outside, so standardise the data first (most of it should fall
    inside). Every block starts as the identity. `benchmarks/quality.py` tried other
    mixings, bounds and activations on its tuning data sets and found none better by mean
    rank within its budget, so these defaults stayed (see the model-quality page of the
    docs), except the base: ``base`` as in `affine_flow` (``"student"``, the default, chosen
    there by the same protocol; ``"normal"``; or a distribution).

    Reference: Durkan et al., "Neural Spline Flows", NeurIPS 2019.

    Example:
        >>> import jax, invnet
        >>> from flax import nnx
        >>> flow = invnet.spline_flow(3, layers=2, hidden=(16,), rngs=nnx.Rngs(0))
        >>> x = jax.random.normal(jax.random.key(0), (5, 3))
        >>> flow.log_prob(x).shape
        (5,)
    """
    _check("spline_flow", layers, mixing)
    base = _base("spline_flow", base, dim, param_dtype)

    def block():
        if autoregressive:
            return MaskedAutoregressive(
                dim, transformer="spline", bins=bins, bound=bound, hidden=hidden,
                cond_dim=cond_dim, activation=activation, param_dtype=param_dtype, rngs=rngs,
            )  # fmt: skip
        return SplineCoupling(
            dim, bins=bins, bound=bound, hidden=hidden, cond_dim=cond_dim,
            activation=activation, param_dtype=param_dtype, rngs=rngs,
        )  # fmt: skip

    return _stack(dim, layers, mixing, actnorm, param_dtype, rngs, block, base)
