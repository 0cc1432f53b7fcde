"""Pre-processing of pixel data as a bijection: the logit transform (RealNVP, Glow)."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from invnet.core import Elementwise

__all__ = ["Logit"]


class Logit(Elementwise):
    r"""Logit pre-processing of pixels in ``[0, 1]``: ``y = logit(alpha + (1 - 2 alpha) x)``.

    Maps dequantised pixels (uniform noise added, divided by the number of levels) from
    the unit interval to the whole real line, where Gaussian-based flows are at home;
    ``alpha`` keeps the endpoints 0 and 1 away from ``logit``'s poles.

    * Map: ``p = alpha + (1 - 2 alpha) x``, ``y = log p - log(1 - p)``, elementwise.
    * Log-det: ``sum(log(1 - 2 alpha) - log p - log(1 - p))`` over the event, O(D).
    * Inverse: ``x = (sigmoid(y) - alpha) / (1 - 2 alpha)``, same cost.
    * Domain: ``x`` in ``(-alpha / (1 - 2 alpha), (1 - alpha) / (1 - 2 alpha))``, which
      contains ``[0, 1]``; outside it the forward gives NaN (never a silent clip). The
      inverse takes any real ``y``. ``alpha`` must lie in ``[0, 0.5)``.
    * Works on events of any rank (images: the rank is taken from the neighbouring layers
      in a `invnet.Sequential`, or give ``event_ndim=3``).

    Reference: Dinh et al., "Density estimation using Real NVP", ICLR 2017 (section 4.1).

    Example:
        >>> import jax.numpy as jnp, invnet
        >>> layer = invnet.Logit(0.05)
        >>> y, log_det = layer.forward(jnp.array([0.0, 0.5, 1.0]))
        >>> y
        Array([-2.944439,  0.      ,  2.944439], dtype=float32)
        >>> bool(jnp.allclose(layer.inverse(y)[0], jnp.array([0.0, 0.5, 1.0]), atol=1e-6))
        True
    """

    def __init__(self, alpha: float = 0.05, *, event_ndim: int | None = None):
        alpha = float(alpha)
        if not (math.isfinite(alpha) and 0.0 <= alpha < 0.5):
            raise ValueError(
                f"Logit: alpha must lie in [0, 0.5) (the fraction kept away from 0 and 1), "
                f"got {alpha!r}"
            )
        self._init_event(event_ndim)
        self.alpha = alpha

    def get_config(self) -> dict[str, Any]:
        return {"alpha": self.alpha, **self._event_config()}

    def error_bound(self) -> tuple[float, str]:
        # d logit(p) / dp = 1 / (p (1-p)) is largest at p = alpha: the inverse squashes by it
        a = max(self.alpha, 1e-3)
        return 1.0 / (a * (1.0 - a)), "1/(alpha(1-alpha)), alpha >= 1e-3"

    def _log_det_terms(self, p):
        scale = math.log1p(-2.0 * self.alpha)
        return self._sum_event(scale - jnp.log(p) - jnp.log1p(-p))

    def _forward(self, x, cond):
        p = self.alpha + (1.0 - 2.0 * self.alpha) * x
        y = jnp.log(p) - jnp.log1p(-p)
        return y, self._log_det_terms(p)

    def _inverse(self, y, cond):
        p = jax.nn.sigmoid(y)
        x = (p - self.alpha) / (1.0 - 2.0 * self.alpha)
        # log p + log(1 - p) from y directly (stable for large |y|): -softplus(-y) - softplus(y)
        terms = math.log1p(-2.0 * self.alpha) + jax.nn.softplus(-y) + jax.nn.softplus(y)
        return x, -self._sum_event(terms)
