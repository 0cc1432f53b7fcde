"""Pre-processing of pixel data as bijections: scaling dequantised pixels to the unit
interval (`Dequantize`) and the logit transform (`Logit`, RealNVP and Glow)."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from invnet.bases import Elementwise

__all__ = ["Dequantize", "Logit"]


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
        >>> [round(float(v), 4) for v in y]
        [-2.9444, 0.0, 2.9444]
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


class Dequantize(Elementwise):
    r"""Dequantised pixels to the unit interval: ``y = x / levels``, with its log-det.

    Discrete pixels ``k in {0, ..., levels - 1}`` have no density; adding uniform noise
    (`invnet.dequantize`: ``x = k + u``, ``u ~ U[0, 1)``) gives continuous data whose
    density bounds the pixels' probability from below (Theis et al. 2016). Put this layer
    first in a flow trained on such ``x``: the flow's ``log_prob(x)`` is then the density
    of the dequantised pixels themselves, so ``-log_prob(x) / (D ln 2)`` is directly an
    upper bound on the bits per dimension (`invnet.bits_per_dim` with ``scale=1``).

    * Map: ``y = x / levels`` elementwise; inverse ``x = levels * y``; O(D) both ways.
    * Log-det: ``-D log(levels)`` (D = the event's size), a constant.
    * Domain: any real ``x`` (the map is linear); data in ``[0, levels]`` lands in
      ``[0, 1]``, where `invnet.Logit` takes over.
    * Works on events of any rank (taken from the neighbouring layers in a
      `invnet.Sequential`, or give ``event_ndim=3`` for images).

    Example:
        >>> import jax.numpy as jnp, invnet
        >>> layer = invnet.Dequantize(256)
        >>> y, log_det = layer.forward(jnp.array([[0.5, 128.0, 255.5]]))
        >>> [float(v) for v in y[0]]                     # (k + u) / 256, exactly
        [0.001953125, 0.5, 0.998046875]
        >>> round(float(log_det[0]), 4)  # -3 log 256
        -16.6355
    """

    def __init__(self, levels: int = 256, *, event_ndim: int | None = None):
        if (
            isinstance(levels, bool)
            or not isinstance(levels, int | float | np.integer | np.floating)
            or not (math.isfinite(levels) and levels >= 2)
        ):
            raise ValueError(
                f"Dequantize: levels must be a number >= 2 (the pixel values 0..levels-1), "
                f"got {levels!r}"
            )
        self._init_event(event_ndim)
        self.levels = int(levels) if float(levels).is_integer() else float(levels)

    def get_config(self) -> dict[str, Any]:
        return {"levels": self.levels, **self._event_config()}

    def error_bound(self) -> tuple[float, str]:
        return 1.0, "a scaling: relative error is kept"

    def _constant_log_det(self, a, sign: float):
        batch = a.shape[: a.ndim - self.event_ndim]
        size = math.prod(a.shape[a.ndim - self.event_ndim :])
        return jnp.full(batch, sign * size * math.log(self.levels), a.dtype)

    def _forward(self, x, cond):
        return x / jnp.asarray(self.levels, x.dtype), self._constant_log_det(x, -1.0)

    def _inverse(self, y, cond):
        return y * jnp.asarray(self.levels, y.dtype), self._constant_log_det(y, 1.0)
