"""Builders: ready-made flows assembled from invnet layers (no math of their own)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
from flax import nnx

from invnet.containers import Sequential
from invnet.flows import Flow
from invnet.layers import MaskedAutoregressive, Permute, SplineCoupling

__all__ = ["spline_flow"]


def spline_flow(
    dim: int,
    *,
    layers: int = 4,
    bins: int = 8,
    bound: float = 3.0,
    hidden: Sequence[int] = (64, 64),
    cond_dim: int = 0,
    autoregressive: bool = False,
    activation: str = "relu",
    param_dtype: Any = jnp.float32,
    rngs: nnx.Rngs,
) -> Flow:
    """A neural spline flow: ``layers`` spline blocks with a random `Permute` between them,
    over a standard normal base.

    Each block is a `SplineCoupling` (``autoregressive=False``: forward and inverse one
    conditioner pass each) or a spline `MaskedAutoregressive` (``True``: a MAF, fast
    densities, sampling ``dim`` passes per block). The splines act on ``[-bound, bound]``
    and are the identity outside, so standardise the data first (most of it should fall
    inside). Every block starts as the identity.

    Reference: Durkan et al., "Neural Spline Flows", NeurIPS 2019.

    Example:
        >>> import jax, invnet
        >>> from flax import nnx
        >>> flow = invnet.spline_flow(3, layers=2, hidden=(16,), rngs=nnx.Rngs(0))
        >>> x = jax.random.normal(jax.random.key(0), (5, 3))
        >>> flow.log_prob(x).shape
        (5,)
    """
    if not isinstance(layers, int) or layers < 1:
        raise ValueError(f"spline_flow: layers must be a positive integer, got {layers!r}")
    blocks = []
    for i in range(layers):
        if i > 0:
            blocks.append(Permute(dim, rngs=rngs))
        if autoregressive:
            block = MaskedAutoregressive(
                dim, transformer="spline", bins=bins, bound=bound, hidden=hidden,
                cond_dim=cond_dim, activation=activation, param_dtype=param_dtype, rngs=rngs,
            )  # fmt: skip
        else:
            block = SplineCoupling(
                dim, bins=bins, bound=bound, hidden=hidden, cond_dim=cond_dim,
                activation=activation, param_dtype=param_dtype, rngs=rngs,
            )  # fmt: skip
        blocks.append(block)
    return Flow(Sequential(*blocks))
