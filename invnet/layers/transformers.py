"""Elementwise transformers: the invertible scalar maps ``tau(x; theta)`` that coupling and
autoregressive layers apply to each element, given parameters ``theta`` from a conditioner.

Each transformer is a small frozen (hashable) description with three pure methods:

    n_params                       raw parameters per element
    forward(x, raw) -> (y, log tau'(x))        elementwise; raw has shape x.shape + (n_params,)
                                               (Affine, Additive: or a tuple of
                                               n_params arrays shaped like x)
    inverse(y, raw) -> (x, log (tau^-1)'(y))   the exact inverse; its log-derivative is minus
                                               the forward one at the matching point

* `Affine`: ``y = x exp(s) + t`` with the soft clamp ``s = clamp tanh(s_raw / clamp)``
  (RealNVP/Glow with FrEIA's clamp): each scale stays in ``exp(+-clamp)``, so a round trip
  amplifies rounding by at most ``exp(2 clamp)``. Raw ``(s_raw, t)``; zeros give the identity.
* `Additive`: ``y = x + t`` (NICE), log-derivative 0, volume preserving. Raw ``(t,)``.
* `Spline`: the monotone rational-quadratic spline of `invnet.layers.rq_spline`
  (``rq_spline_params`` / ``rq_spline_forward`` / ``rq_spline_inverse``, imported, not
  rewritten): identity outside ``[-bound, bound]``; ``3 bins - 1`` raw numbers, zeros give
  the identity.

`make_transformer` builds one from the names the layers take (``"affine"``, ``"additive"``,
``"spline"``). All work in the dtype of ``x``; ``raw`` must already have it.

Example:
    >>> import jax.numpy as jnp
    >>> from invnet.layers.transformers import make_transformer
    >>> tau = make_transformer("affine", clamp=2.0)
    >>> raw = jnp.array([[0.5, 1.0], [-0.3, 0.0]])
    >>> y, ld = tau.forward(jnp.array([1.0, 2.0]), raw)
    >>> x, ild = tau.inverse(y, raw)
    >>> bool(jnp.allclose(x, jnp.array([1.0, 2.0]))), bool(jnp.allclose(ld + ild, 0.0))
    (True, True)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp

from invnet.layers.rq_spline import (
    SPLINE_BOUND,
    n_spline_params,
    rq_spline_forward,
    rq_spline_inverse,
    rq_spline_params,
)

__all__ = [
    "Affine",
    "Additive",
    "Spline",
    "make_transformer",
    "TRANSFORMER_NAMES",
    "Transformed",
]

TRANSFORMER_NAMES = ("affine", "additive", "spline")


def _part(raw, i: int) -> jax.Array:
    """Raw parameter ``i`` of every element: ``raw[..., i]``, or ``raw[i]`` where the caller
    passes the parameters as a tuple of arrays (`Transformed` does for the param-major
    conditioner outputs of the affine and additive couplings: slices of the output's
    channels, with no transpose to build and differentiate)."""
    return raw[i] if isinstance(raw, tuple) else raw[..., i]


@dataclass(frozen=True)
class Affine:
    """``y = x exp(s) + t``, ``s = clamp tanh(s_raw / clamp)``; raw ``(s_raw, t)``."""

    clamp: float = 2.0
    n_params = 2
    takes_parts = True  # raw may be the tuple (s_raw, t)

    def log_scale(self, raw: jax.Array | tuple) -> jax.Array:
        return self.clamp * jnp.tanh(_part(raw, 0) / self.clamp)

    def forward(self, x, raw):
        s = self.log_scale(raw)
        return x * jnp.exp(s) + _part(raw, 1), s

    def inverse(self, y, raw):
        s = self.log_scale(raw)
        return (y - _part(raw, 1)) * jnp.exp(-s), -s

    def error_bound(self) -> tuple[float, str]:
        return math.exp(2.0 * self.clamp), "exp(2*clamp)"


@dataclass(frozen=True)
class Additive:
    """``y = x + t``; raw ``(t,)``; log-derivative 0."""

    n_params = 1
    takes_parts = True  # raw may be the tuple (t,)

    def forward(self, x, raw):
        return x + _part(raw, 0), jnp.zeros_like(x)

    def inverse(self, y, raw):
        return y - _part(raw, 0), jnp.zeros_like(y)

    def error_bound(self) -> tuple[float, str]:
        return 1.0, "additive: 1"


@dataclass(frozen=True)
class Spline:
    """Rational-quadratic spline on ``[-bound, bound]`` with ``bins`` bins, identity tails;
    raw ``3 bins - 1`` numbers (see `invnet.layers.rq_spline.rq_spline_params`)."""

    bins: int = 8
    bound: float = 3.0
    min_width: float = 1e-3
    min_height: float = 1e-3
    min_derivative: float = 1e-3

    @property
    def n_params(self) -> int:
        return n_spline_params(self.bins)

    def _params(self, raw):
        return rq_spline_params(
            raw,
            bound=self.bound,
            min_width=self.min_width,
            min_height=self.min_height,
            min_derivative=self.min_derivative,
        )

    def forward(self, x, raw):
        return rq_spline_forward(x, self._params(raw))

    def inverse(self, y, raw):
        return rq_spline_inverse(y, self._params(raw))

    def error_bound(self) -> tuple[float, str]:
        return SPLINE_BOUND


def make_transformer(
    name: str, *, clamp: float = 2.0, bins: int = 8, bound: float = 3.0
) -> Affine | Additive | Spline:
    """The transformer called ``name`` (one of `TRANSFORMER_NAMES`) with its settings."""
    if name == "affine":
        return Affine(float(clamp))
    if name == "additive":
        return Additive()
    if name == "spline":
        return Spline(int(bins), float(bound))
    raise ValueError(f"transformer must be one of {TRANSFORMER_NAMES}, got {name!r}")


class Transformed:
    """What every coupling shares (mixed into the vector and the image couplings): split the
    input into ``(x_a, x_b)``, ask the conditioner for the raw parameters of ``x_b`` given
    ``x_a`` (and ``cond``), and apply the layer's `transformer` to ``x_b``. A coupling class
    states its split (``_split`` / ``_join``), its conditioner call (``_conditioner_out``),
    how it sums log-derivatives over its event (``_sum_changed``) and its ``transformer``.

    ``_param_major``: the conditioner's output lists each parameter for all transformed
    elements in turn (``s_1..s_n, t_1..t_n``: the affine and additive couplings) instead of
    all parameters of one element in turn (the spline couplings); saved weights keep their
    meaning either way."""

    _param_major = True

    def _conditioner_input(self, x_a):
        return x_a

    def _raw(self, x_a, cond):
        out = self._conditioner_out(self._conditioner_input(x_a), cond)
        k = self.transformer.n_params
        if self._param_major and getattr(self.transformer, "takes_parts", False):
            n = out.shape[-1] // k  # parameter i of every element: channels [i n, (i+1) n)
            return tuple(out[..., i * n : (i + 1) * n] for i in range(k))
        if self._param_major:
            raw = out.reshape(*out.shape[:-1], k, out.shape[-1] // k)
            return jnp.swapaxes(raw, -1, -2)
        return out.reshape(*out.shape[:-1], out.shape[-1] // k, k)

    def _couple(self, x, cond, inverse: bool):
        x_a, x_b = self._split(x)
        tau = self.transformer
        out, log_det = (tau.inverse if inverse else tau.forward)(x_b, self._raw(x_a, cond))
        return self._join(x_a, out), self._sum_changed(log_det)

    def _forward(self, x, cond):
        return self._couple(x, cond, inverse=False)

    def _inverse(self, y, cond):
        return self._couple(y, cond, inverse=True)

    def error_bound(self) -> tuple[float, str]:
        return self.transformer.error_bound()
