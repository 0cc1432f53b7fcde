"""Invertible elementwise activations."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from invnet.core import Elementwise

__all__ = ["LeakyReLU"]


class LeakyReLU(Elementwise):
    r"""Leaky ReLU with slope ``a`` in (0, 1]: ``y = x`` for ``x >= 0``, ``y = a x`` otherwise.

    Unlike ReLU (slope 0), no information is lost: the negative half is scaled, not erased.

    * Log-det: ``log a`` times the number of negative entries of ``x``, O(D).
    * Inverse: ``x = y`` for ``y >= 0``, ``x = y / a`` otherwise (same cost as forward).
      Round-trip error grows like ``1 / a``: keep the slope well away from 0.
    * ``learnable=True`` trains the slope through ``a = sigmoid(theta)``, which keeps it in
      (0, 1) for every value of ``theta``; the initial slope must then be < 1.
    * A slope <= 0 or > 1 is refused: 0 is ReLU (not invertible), negative slopes are not
      monotone, slopes > 1 make it an expanding map better expressed by ``Inverse``.

    Works on any event size (``dim`` is ``None``); the log-det sums over the last
    ``event_ndim`` axes, which a `invnet.Sequential` sets from the neighbouring layers when it
    is left at ``None`` (so it works between image layers too).

    Example:
        >>> import jax.numpy as jnp, invnet
        >>> act = invnet.LeakyReLU(0.5)
        >>> y, log_det = act.forward(jnp.array([-2.0, 3.0]))
        >>> y, act.inverse(y)[0]
        (Array([-1.,  3.], dtype=float32), Array([-2.,  3.], dtype=float32))
    """

    def __init__(
        self,
        negative_slope: float = 0.01,
        *,
        learnable: bool = False,
        event_ndim: int | None = None,
        param_dtype: Any = jnp.float32,
    ):
        slope = float(negative_slope)
        if not (math.isfinite(slope) and 0.0 < slope <= 1.0):
            why = (
                "a slope of 0 is ReLU, which maps every negative input to 0 and cannot be inverted"
                if slope == 0
                else "the slope must lie in (0, 1] for the map to be invertible and monotone"
            )
            raise ValueError(f"LeakyReLU: negative_slope={negative_slope!r} refused: {why}")
        if learnable and slope == 1.0:
            raise ValueError(
                "LeakyReLU: a learnable slope lives in the open interval (0, 1); start below 1"
            )
        self._init_event(event_ndim)
        self.negative_slope = slope
        self.learnable = bool(learnable)
        self.param_dtype = jnp.dtype(param_dtype)
        if learnable:
            self.theta = nnx.Param(jnp.asarray(math.log(slope / (1 - slope)), self.param_dtype))

    def get_config(self) -> dict[str, Any]:
        return {
            "negative_slope": self.negative_slope,
            "learnable": self.learnable,
            "param_dtype": self.param_dtype.name,
            **self._event_config(),
        }

    def error_bound(self) -> tuple[float, str]:
        return 1.0 / float(self.slope()), "1/slope"

    def slope(self, dtype=None) -> jax.Array:
        """The current slope ``a`` (learned or fixed)."""
        dt = dtype or self.param_dtype
        if self.learnable:
            return jax.nn.sigmoid(self.theta[...].astype(dt))
        return jnp.asarray(self.negative_slope, dt)

    def _forward(self, x, cond):
        a = self.slope(x.dtype)
        neg = x < 0
        y = jnp.where(neg, a * x, x)
        return y, self._sum_event(jnp.where(neg, jnp.log(a), 0.0)).astype(x.dtype)

    def _inverse(self, y, cond):
        a = self.slope(y.dtype)
        neg = y < 0
        x = jnp.where(neg, y / a, y)
        return x, -self._sum_event(jnp.where(neg, jnp.log(a), 0.0)).astype(y.dtype)
