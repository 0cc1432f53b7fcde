"""Glow's invertible 1x1 convolution: an LU-parameterised channel mixing of every pixel."""

from __future__ import annotations

import math
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from invnet.core import Shape
from invnet.layers.linear import LULinear

__all__ = ["Conv1x1"]


class Conv1x1(LULinear):
    r"""Invertible 1x1 convolution on channels-last images ``(H, W, C)`` (Glow).

    Every pixel's channel vector goes through the same invertible matrix ``W = P L U``
    (exactly `invnet.LULinear`'s parameterisation, applied over the channel axis): ``P`` a
    fixed permutation, ``L`` unit lower triangular, ``U`` upper triangular with diagonal
    ``sign * exp(log_scale)``, so ``W`` can never become singular.

    * Map: ``y[h, w] = W x[h, w] + b`` for every pixel; cost O(H W C^2).
    * Log-det: ``H * W * sum(log_scale)``, O(C), the same for every sample.
    * Inverse: ``x = U^{-1} L^{-1} P^T (y - b)`` per pixel: two C x C triangular solves
      form the inverse matrix once (as `invnet.LULinear` does for batches of >= C rows),
      then one GEMM over the pixels.
      Called on concrete arrays (and in `invnet.freeze`) the inverse applies ``W^{-1}``
      precomputed in float64 from the factors once per parameter version
      (`LULinear.prepare`), so it is one GEMM, like the forward.
    * Init: as `invnet.LULinear` (``init="random"``, ``"orthogonal"`` or ``"identity"``);
      ``Conv1x1.from_matrix(W, b)`` takes a trained ``C x C`` matrix.
    * Takes any image size; the channel count is fixed. `Bijector.error_bound` is
      ``cond(W)``, as for `invnet.LULinear`.

    Reference: Kingma & Dhariwal, "Glow: Generative Flow with Invertible 1x1
    Convolutions", NeurIPS 2018.

    Example:
        >>> import jax, jax.numpy as jnp, invnet
        >>> from flax import nnx
        >>> conv = invnet.Conv1x1(3, rngs=nnx.Rngs(0))
        >>> x = jax.random.normal(jax.random.key(0), (2, 4, 4, 3))
        >>> y, log_det = conv.forward(x)
        >>> x_back, _ = conv.inverse(y)
        >>> y.shape, log_det.shape, bool(jnp.allclose(x_back, x, atol=1e-5))
        ((2, 4, 4, 3), (2,), True)
    """

    def __init__(
        self,
        channels: int,
        *,
        bias: bool = True,
        init: str = "random",
        param_dtype: Any = jnp.float32,
        precision: str = "highest",
        rngs: nnx.Rngs,
    ):
        if not isinstance(channels, int | np.integer) or channels < 1:
            raise ValueError(f"Conv1x1: channels must be a positive integer, got {channels!r}")
        super().__init__(
            int(channels),
            bias=bias,
            init=init,
            param_dtype=param_dtype,
            precision=precision,
            rngs=rngs,
        )
        self.event_ndim = 3

    @property
    def channels(self) -> int:
        return self.dim

    @classmethod
    def min_stored_values(cls, config: dict[str, Any]) -> int:
        """At least the ``C x C`` strict lower factor (see `LULinear.min_stored_values`)."""
        return int(config["channels"]) ** 2

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        return {"channels": config.pop("dim"), **config}

    def event_pattern(self) -> Shape:
        return (None, None, self.dim)

    def _log_det(self, x):
        pixels = math.prod(x.shape[-3:-1])
        total = pixels * jnp.sum(self.log_scale[...].astype(x.dtype))
        return jnp.broadcast_to(total, x.shape[:-3])
