"""Monotone rational-quadratic splines (Neural Spline Flows): the math, as pure functions.

`rq_spline_forward`, `rq_spline_inverse` and `rq_spline_params` (unnormalised parameters ->
knots and derivatives) serve the spline transformer of `invnet.layers.transformers`, and so
`SplineCoupling` and `MaskedAutoregressive`. Notation follows Durkan et al. (2019): bin ``k``
spans ``[x_k, x_{k+1}]`` -> ``[y_k, y_{k+1}]`` with width ``w_k``, height ``h_k``, slope
``s_k = h_k / w_k`` and knot derivatives ``d_k``, ``d_{k+1}``; with ``xi = (x - x_k) / w_k``
in [0, 1]:

    y = y_k + h_k (s_k xi^2 + d_k xi (1 - xi)) / (s_k + (d_{k+1} + d_k - 2 s_k) xi (1 - xi))

Outside ``[-bound, bound]`` the map is the identity (linear tails; the end derivatives are 1,
so the map is C^1 at the boundary).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "SplineParams",
    "n_spline_params",
    "rq_spline_params",
    "rq_spline_forward",
    "rq_spline_inverse",
    "conditioner_input",
    "check_spline_config",
    "SPLINE_BOUND",
]


class SplineParams(NamedTuple):
    """Knots and derivatives of one spline per element: ``x_knots`` and ``y_knots`` have
    ``bins + 1`` entries on the last axis, from ``-bound`` to ``bound`` exactly; ``derivs``
    has ``bins + 1`` entries, the first and last equal to 1."""

    x_knots: jax.Array
    y_knots: jax.Array
    derivs: jax.Array
    bound: float


def n_spline_params(bins: int) -> int:
    """Unnormalised parameters per element: ``bins`` widths, ``bins`` heights and
    ``bins - 1`` interior derivatives."""
    return 3 * bins - 1


def _knots(raw, bound, min_size):
    bins = raw.shape[-1]
    sizes = min_size + (1.0 - min_size * bins) * jax.nn.softmax(raw, axis=-1)
    inner = 2.0 * bound * jnp.cumsum(sizes[..., :-1], axis=-1) - bound
    ends = jnp.broadcast_to(jnp.asarray(bound, raw.dtype), (*raw.shape[:-1], 1))
    return jnp.concatenate([-ends, inner, ends], axis=-1)  # the ends are exactly +-bound


def rq_spline_params(
    raw: jax.Array,
    *,
    bound: float = 3.0,
    min_width: float = 1e-3,
    min_height: float = 1e-3,
    min_derivative: float = 1e-3,
) -> SplineParams:
    """Unnormalised ``raw`` of shape ``(..., 3 * bins - 1)`` -> `SplineParams`.

    ``raw = [widths (bins), heights (bins), derivatives (bins - 1)]``. Widths and heights are
    ``min + (1 - min * bins) * softmax(raw)`` of the interval ``2 * bound``; interior
    derivatives are ``1 + (1 - min_derivative) * elu(raw)``, so ``raw = 0`` gives derivative
    1 exactly, large raw values grow linearly, and the derivative never falls below
    ``min_derivative``. All zeros give equal bins and unit derivatives: the identity (up to
    rounding). Every parameter value gives a strictly increasing spline.
    """
    if raw.shape[-1] % 3 != 2:
        raise ValueError(f"rq_spline_params: last axis must be 3 * bins - 1, got {raw.shape[-1]}")
    bins = (raw.shape[-1] + 1) // 3
    if min_width * bins >= 1 or min_height * bins >= 1:
        raise ValueError("rq_spline_params: min_width * bins and min_height * bins must be < 1")
    x_knots = _knots(raw[..., :bins], bound, min_width)
    y_knots = _knots(raw[..., bins : 2 * bins], bound, min_height)
    inner = 1.0 + (1.0 - min_derivative) * jax.nn.elu(raw[..., 2 * bins :])
    one = jnp.ones((*raw.shape[:-1], 1), raw.dtype)
    return SplineParams(x_knots, y_knots, jnp.concatenate([one, inner, one], axis=-1), bound)


def _bin(values, knots):
    """Index k of the bin [knot_k, knot_{k+1}) holding each value: the number of interior
    knots <= value. Exact on knots (a knot starts its bin), no NaN for any input."""
    return jnp.sum(values[..., None] >= knots[..., 1:-1], axis=-1, keepdims=True)


def _gather(params: SplineParams, k):
    take = lambda a, i: jnp.take_along_axis(a, i, axis=-1)[..., 0]  # noqa: E731
    x_k, x_k1 = take(params.x_knots, k), take(params.x_knots, k + 1)
    y_k, y_k1 = take(params.y_knots, k), take(params.y_knots, k + 1)
    d_k, d_k1 = take(params.derivs, k), take(params.derivs, k + 1)
    width, height = x_k1 - x_k, y_k1 - y_k
    return x_k, y_k, width, height, height / width, d_k, d_k1


def _log_derivative(xi, slope, d_k, d_k1):
    """log dy/dx inside a bin at ``xi``."""
    one_minus = 1.0 - xi
    denom = slope + (d_k1 + d_k - 2.0 * slope) * xi * one_minus
    numer = slope**2 * (d_k1 * xi**2 + 2.0 * slope * xi * one_minus + d_k * one_minus**2)
    return jnp.log(numer) - 2.0 * jnp.log(denom)


def _inside(v, bound):
    """Inside the spline's interval [-bound, bound) (bound itself is a tail point: exact)."""
    return (v >= -bound) & (v < bound)


def _unit_clamp(t):
    """``t`` limited to [0, 1], with derivative 1 at 0 and 1 themselves (``jnp.clip`` halves
    the gradient there, so the slope on a knot would come out half the true one)."""
    return jnp.where(t < 0.0, 0.0, jnp.where(t > 1.0, 1.0, t))


def rq_spline_forward(x: jax.Array, params: SplineParams) -> tuple[jax.Array, jax.Array]:
    """``(y, log dy/dx)`` elementwise; ``params`` arrays have shape ``x.shape + (bins + 1,)``.

    Points on a knot map exactly to the knot's ``y``; ``-bound`` maps to ``-bound``; points
    at or beyond ``bound`` and below ``-bound`` (tails) are returned unchanged with log-det 0.
    Tail points never enter the rational function (double ``where``), so neither the value
    nor the gradient can be NaN for any finite input.
    """
    inside = _inside(x, params.bound)
    x_in = jnp.where(inside, x, 0.0)
    x_k, y_k, width, height, slope, d_k, d_k1 = _gather(params, _bin(x_in, params.x_knots))
    xi = _unit_clamp((x_in - x_k) / width)
    one_minus = 1.0 - xi
    numer = height * (slope * xi**2 + d_k * xi * one_minus)
    denom = slope + (d_k1 + d_k - 2.0 * slope) * xi * one_minus
    y = jnp.where(inside, y_k + numer / denom, x)
    log_det = jnp.where(inside, _log_derivative(xi, slope, d_k, d_k1), 0.0)
    return y, log_det


def rq_spline_inverse(y: jax.Array, params: SplineParams) -> tuple[jax.Array, jax.Array]:
    """``(x, log dx/dy)`` elementwise: the exact inverse of `rq_spline_forward`.

    In bin ``k`` (found by counting y-knots, like the forward), ``xi`` solves
    ``a xi^2 + b xi + c = 0`` with ``a = h (s - d_k) + (y - y_k) delta``,
    ``b = h d_k - (y - y_k) delta``, ``c = -s (y - y_k)``, ``delta = d_k + d_{k+1} - 2 s``;
    the root in [0, 1] is taken in the cancellation-free form ``xi = 2c / (-b - sqrt(b^2 -
    4ac))``, with the discriminant clamped at 0 and ``xi`` clipped to [0, 1]. On a knot
    ``c = 0`` and ``xi = 0`` exactly; tails are the identity.
    """
    inside = _inside(y, params.bound)
    y_in = jnp.where(inside, y, 0.0)
    x_k, y_k, width, height, slope, d_k, d_k1 = _gather(params, _bin(y_in, params.y_knots))
    dy = y_in - y_k
    delta = d_k1 + d_k - 2.0 * slope
    a = height * (slope - d_k) + dy * delta
    b = height * d_k - dy * delta
    c = -slope * dy
    disc = jnp.maximum(b**2 - 4.0 * a * c, 0.0)
    denom = -b - jnp.sqrt(disc)  # < 0 whenever a root lies in (0, 1]
    ok = denom < 0
    xi = jnp.where(ok, 2.0 * c / jnp.where(ok, denom, -1.0), 0.0)
    xi = _unit_clamp(xi)
    x = jnp.where(inside, x_k + xi * width, y)
    log_det = jnp.where(inside, -_log_derivative(xi, slope, d_k, d_k1), 0.0)
    return x, log_det


def conditioner_input(x, bound: float) -> jax.Array:
    """What a spline's conditioner sees: ``x`` clipped to ``[-bound, bound]``.

    The splines act on ``[-bound, bound]``, where the training data lie; a conditioner fed a
    point far in the tails (which every spline passes through unchanged) would extrapolate to
    ever more extreme knots and derivatives, so flat that the next layers cannot be inverted
    in floating point (``[0.3, 1e6]`` came back off by 3 through four trained blocks, in
    float32 and float64). Clipped, a tail point gets the splines of the nearest edge of the
    data range: the same map inside it, and round trips in the tails as good as at the edge.
    """
    return jnp.clip(x, -bound, bound)


SPLINE_BOUND = (float("inf"), "data-dependent, ~(max/min of slopes and derivatives)^3")


def check_spline_config(name, bins, bound, min_width, min_height, min_derivative) -> None:
    """Refuse spline settings that would not give a strictly increasing spline."""
    if not isinstance(bins, int | np.integer) or isinstance(bins, bool) or bins < 2:
        raise ValueError(
            f"{name}: bins must be an integer >= 2, got {bins!r} (one bin with unit end "
            "derivatives can only be the identity, whatever it learns; use bins=8)"
        )
    if not (np.isfinite(bound) and bound > 0):
        raise ValueError(f"{name}: bound must be a positive finite number, got {bound!r}")
    for label, value in (("min_width", min_width), ("min_height", min_height)):
        if not (0 < value and value * bins < 1):
            raise ValueError(
                f"{name}: {label}={value!r} must be > 0 and {label} * bins < 1 (bins={bins})"
            )
    if not 0 < min_derivative < 1:
        raise ValueError(f"{name}: min_derivative must lie in (0, 1), got {min_derivative!r}")
