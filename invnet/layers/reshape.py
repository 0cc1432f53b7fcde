"""Reshaping the event: the bijection between, e.g., an image and a flat vector."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from invnet.core import Bijector, Shape, fmt, unify_shapes

__all__ = ["Reshape"]


def _shape(value, what: str) -> tuple[int, ...]:
    bad = ValueError(f"Reshape: {what} must be a tuple of positive integers, got {value!r}")
    try:
        shape = tuple(value)
    except TypeError:
        raise bad from None
    if not shape or any(not isinstance(s, int | np.integer) or s < 1 for s in shape):
        raise bad
    return tuple(int(s) for s in shape)


class Reshape(Bijector):
    """Reshape the event from ``in_shape`` to ``out_shape`` (same number of elements).

    * Map: ``y = x.reshape(*batch, *out_shape)`` (row-major, as numpy); e.g. a
      channels-last image ``(H, W, C)`` to a vector ``(H*W*C,)``, so one model can go from
      image layers to vector layers (an invertible classifier's head).
    * Log-det: 0 (the elements are only relabelled); inverse: the reverse reshape. No
      arithmetic, so round trips are exact.

    Example:
        >>> import jax.numpy as jnp, invnet
        >>> flat = invnet.Reshape((2, 2, 1), (4,))
        >>> y, log_det = flat.forward(jnp.arange(8.0).reshape(2, 2, 2, 1))
        >>> y.shape, log_det.shape
        ((2, 4), (2,))
    """

    def __init__(self, in_shape, out_shape):
        self.in_shape = _shape(in_shape, "in_shape")
        self.out_shape = _shape(out_shape, "out_shape")
        if math.prod(self.in_shape) != math.prod(self.out_shape):
            raise ValueError(
                f"Reshape: {self.in_shape} has {math.prod(self.in_shape)} elements but "
                f"{self.out_shape} has {math.prod(self.out_shape)}; a bijection keeps the size"
            )
        self.event_ndim = len(self.in_shape)
        self.dim = self.in_shape[0] if self.event_ndim == 1 else None

    def get_config(self) -> dict[str, Any]:
        return {"in_shape": list(self.in_shape), "out_shape": list(self.out_shape)}

    def event_pattern(self) -> Shape:
        return self.in_shape

    def output_shape(self, shape: Shape) -> Shape:
        if unify_shapes(tuple(shape), self.in_shape) is None:
            raise ValueError(f"Reshape takes events {fmt(self.in_shape)}, got {fmt(shape)}")
        return self.out_shape

    def input_shape(self, shape: Shape) -> Shape:
        if unify_shapes(tuple(shape), self.out_shape) is None:
            raise ValueError(f"Reshape produces events {fmt(self.out_shape)}, got {fmt(shape)}")
        return self.in_shape

    def error_bound(self) -> tuple[float, str]:
        return 1.0, "relabelling"

    def _forward(self, x, cond):
        batch = self.batch_shape(x)
        return x.reshape(*batch, *self.out_shape), self._zero_log_det(x)

    def _inverse(self, y, cond):
        batch = self.batch_shape(y, inverse=True)
        return y.reshape(*batch, *self.in_shape), self._zero_log_det(y, inverse=True)
