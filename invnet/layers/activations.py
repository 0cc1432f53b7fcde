"""Invertible elementwise activations."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from invnet.bases import Elementwise

__all__ = ["LeakyReLU", "Tanh", "Sigmoid"]

_LOG2 = math.log(2.0)


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


class _Squash(Elementwise):
    """Shared parts of the elementwise bijections of R onto an open interval."""

    def __init__(self, *, event_ndim: int | None = None):
        self._init_event(event_ndim)

    def get_config(self) -> dict[str, Any]:
        return self._event_config()


class Tanh(_Squash):
    r"""``y = tanh(x)``, elementwise: a bijection of R onto the open interval (-1, 1).

    * Log-det: ``sum log(1 - tanh(x)^2)``, computed as ``2 (log 2 - x - softplus(-2x))``,
      which stays accurate where ``1 - tanh(x)^2`` underflows (|x| > 9 in float32). O(D).
    * Inverse: ``x = atanh(y)``, log-det ``-sum(log1p(-y) + log1p(y))``. Same cost as forward.
    * Domain of the inverse: only ``-1 < y < 1`` has a preimage. ``y = +-1`` gives ``+-inf``
      and ``|y| > 1`` gives NaN (nothing is clipped or raised, so a jitted model stays
      jittable); `invnet.verify` counts and names such samples. In float32, ``tanh(x)``
      rounds to exactly +-1 for ``|x| > 9.01``, so the inverse of such outputs is inf: the
      information is gone in the forward pass, not in the inverse.
    * Error amplification of a round trip ``x -> y -> x``: ``|y| / ((1 - y^2) |x|)``,
      i.e. about ``exp(2|x|) / (4|x|)``: 1 near 0 but unbounded as ``|y| -> 1``;
      `error_bound` therefore returns ``inf``.
    * No parameters; any event size, event rank as `LeakyReLU` (``event_ndim``).

    This is the activation of a trained ``Linear + Tanh`` network, which `invnet.from_dense`
    turns into an invertible model.

    Example:
        >>> import jax.numpy as jnp, invnet
        >>> act = invnet.Tanh()
        >>> y, log_det = act.forward(jnp.array([0.0, 1.0]))
        >>> x, _ = act.inverse(y)
        >>> [round(float(v), 5) for v in x], round(float(log_det), 3)
        ([0.0, 1.0], -0.868)
        >>> import warnings
        >>> with warnings.catch_warnings(record=True) as caught:   # no finite preimage:
        ...     warnings.simplefilter("always")                     # inf and NaN, said
        ...     x_out = act.inverse(jnp.array([1.0, 2.0]))[0]
        >>> x_out, caught[0].category.__name__
        (Array([inf, nan], dtype=float32), 'NonFiniteWarning')
    """

    def _forward(self, x, cond):
        log_det = 2.0 * (_LOG2 - x - jax.nn.softplus(-2.0 * x))
        return jnp.tanh(x), self._sum_event(log_det)

    def _inverse(self, y, cond):
        log_det = -(jnp.log1p(-y) + jnp.log1p(y))
        return jnp.arctanh(y), self._sum_event(log_det)

    def error_bound(self) -> tuple[float, str]:
        """``inf``: the round trip amplifies errors by ``~exp(2|x|)/(4|x|)``, unbounded."""
        return math.inf, "unbounded near y=+-1 (~exp(2|x|)/(4|x|) at x)"


class Sigmoid(_Squash):
    r"""``y = sigmoid(x) = 1 / (1 + exp(-x))``, elementwise: a bijection of R onto (0, 1).

    * Log-det: ``sum log(y (1 - y)) = -sum(softplus(-x) + softplus(x))``, accurate for any
      ``x`` (no ``log`` of a rounded ``1 - y``). O(D).
    * Inverse: ``x = logit(y) = log(y) - log1p(-y)``, log-det ``-sum(log(y) + log1p(-y))``.
      Same cost as forward.
    * Domain of the inverse: only ``0 < y < 1`` has a preimage. ``y = 0`` gives ``-inf``,
      ``y = 1`` gives ``+inf``, and ``y`` outside ``[0, 1]`` gives NaN; `invnet.verify`
      counts and names such samples. In float32, ``sigmoid(x)`` rounds to exactly 1 for
      ``x > 16.6``: the inverse of such outputs is ``inf``.
    * Error amplification of a round trip: ``1 / ((1 - y) |x|)``, about ``exp(x) / x`` for
      large positive ``x``: unbounded; `error_bound` returns ``inf``.
    * No parameters; any event size, event rank as `LeakyReLU` (``event_ndim``).

    Example:
        >>> import jax.numpy as jnp, invnet
        >>> act = invnet.Sigmoid()
        >>> y, log_det = act.forward(jnp.array([0.0, 2.0]))
        >>> [round(float(v), 5) for v in act.inverse(y)[0]]
        [0.0, 2.0]
        >>> import warnings
        >>> with warnings.catch_warnings(record=True) as caught:   # outside (0, 1): said
        ...     warnings.simplefilter("always")
        ...     x_out = act.inverse(jnp.array([0.0, 1.0, 1.5]))[0]
        >>> x_out, caught[0].category.__name__
        (Array([-inf,  inf,  nan], dtype=float32), 'NonFiniteWarning')
    """

    def _forward(self, x, cond):
        log_det = -(jax.nn.softplus(-x) + jax.nn.softplus(x))
        return jax.nn.sigmoid(x), self._sum_event(log_det)

    def _inverse(self, y, cond):
        log_y, log_1my = jnp.log(y), jnp.log1p(-y)
        return log_y - log_1my, -self._sum_event(log_y + log_1my)

    def error_bound(self) -> tuple[float, str]:
        """``inf``: the round trip amplifies errors by ``~exp(x)/x`` for large ``x``."""
        return math.inf, "unbounded near y=1 (~exp(x)/x at x)"
