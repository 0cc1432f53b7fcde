"""Multi-scale flows: part of the channels leave the flow, the rest go one level deeper."""

from __future__ import annotations

import math
from typing import Any

import jax.numpy as jnp
import numpy as np

from invnet.core import Bijector, Shape, fmt, unify_shapes
from invnet.walk import Move, layers, nodes

__all__ = ["FactorOut"]


def _image_shape(value) -> tuple[int, int, int]:
    try:
        shape = tuple(value)
    except TypeError:
        shape = ()
    if len(shape) != 3 or any(not isinstance(s, int | np.integer) or s < 1 for s in shape):
        raise ValueError(
            f"FactorOut: event_shape must be (H, W, C) positive integers, got {value!r}"
        )
    return tuple(int(s) for s in shape)


class FactorOut(Bijector):
    r"""Factor out channels (RealNVP / Glow multi-scale): ``(H, W, C) -> (H*W*C,)``.

    With ``k = latent_channels`` and ``rest`` a bijector of images ``(H, W, C - k)``:

    * Map: ``z = x[..., :k]`` goes straight to the latent; ``r = rest(x[..., k:])``; the
      output is the flat vector ``concat(flatten(z), flatten(r))`` (row-major), so a whole
      multi-scale model is one bijection from images to vectors of the same size.
    * Log-det: ``rest``'s log-det (the factored channels are only relabelled).
    * Inverse: split the vector after ``H*W*k`` entries, reshape both parts back, run
      ``rest.inverse`` on the second: exact, the cost of ``rest``'s inverse.
    * ``cond`` is passed to ``rest`` when it is conditional (``cond_dim`` is its).
    * ``event_shape`` ``(H, W, C)`` fixes the image size (convolutional layers take any
      size, but the output vector's length must be known).

    A multi-branch layer: its `Bijector.branches` (a split of the channels, ``rest`` on the
    second part, a join into the flat vector) let the model walk (`invnet.walk.steps`) open
    it, so `invnet.verify` checks and reports every layer inside with its path (e.g.
    ``model[3].rest[0]``), and `invnet.freeze`, `invnet.set_precision`, `invnet.data_init`
    and `invnet.save` / `invnet.load` reach them. Its `Bijector.error_bound` is the product
    of ``rest``'s layers' bounds.

    Reference: Dinh et al., "Density estimation using Real NVP", ICLR 2017 (multi-scale
    architecture); Kingma & Dhariwal, "Glow", NeurIPS 2018.

    Example:
        >>> import jax.numpy as jnp, invnet
        >>> from flax import nnx
        >>> rest = invnet.Conv1x1(2, rngs=nnx.Rngs(0))
        >>> split = invnet.FactorOut(2, rest, event_shape=(4, 4, 4))
        >>> z, log_det = split.forward(jnp.ones((3, 4, 4, 4)))
        >>> z.shape, log_det.shape
        ((3, 64), (3,))
    """

    event_ndim = 3

    def __init__(self, latent_channels: int, rest: Bijector, *, event_shape):
        if not isinstance(rest, Bijector):
            raise TypeError(
                f"FactorOut: rest must be an invnet Bijector, got {type(rest).__name__}"
            )
        self.event_shape = _image_shape(event_shape)
        h, w, c = self.event_shape
        k = latent_channels
        if not isinstance(k, int | np.integer) or not 1 <= k < c:
            raise ValueError(
                f"FactorOut: latent_channels must be an integer in [1, {c - 1}] for images "
                f"with {c} channels, got {k!r} (at least one channel must stay on each side)"
            )
        self.latent_channels = int(k)
        self.rest_shape = (h, w, c - self.latent_channels)
        pattern = rest.event_pattern()
        if len(pattern) == 3 or rest.flexible_rank():
            rest._adopt_event_ndim(3)
            pattern = rest.event_pattern()
        if unify_shapes(pattern, self.rest_shape) is None:
            raise ValueError(
                f"FactorOut: rest takes events {fmt(pattern)} but receives the remaining "
                f"channels {fmt(self.rest_shape)}"
            )
        out = rest.output_shape(self.rest_shape)
        if any(s is None for s in out) or math.prod(out) != math.prod(self.rest_shape):
            raise ValueError(f"FactorOut: rest maps {fmt(self.rest_shape)} to {fmt(out)}")
        self.rest = rest
        self.rest_out = tuple(int(s) for s in out)
        self.cond_dim = rest.cond_dim
        self.precision = rest.precision

    def get_config(self) -> dict[str, Any]:
        return {"latent_channels": self.latent_channels, "event_shape": list(self.event_shape)}

    @classmethod
    def from_config(cls, config, children, *, rngs):
        return cls(config["latent_channels"], children[0], event_shape=config["event_shape"])

    def branches(self):
        return (
            Move(self._split, self._unsplit),
            [(".rest", self.rest, 1)],
            Move(self._join, self._unjoin),
        )

    # ----------------------------------------------------------------------- events
    def event_pattern(self) -> Shape:
        return self.event_shape

    def output_shape(self, shape: Shape) -> Shape:
        if unify_shapes(tuple(shape), self.event_shape) is None:
            raise ValueError(f"FactorOut takes events {fmt(self.event_shape)}, got {fmt(shape)}")
        return (math.prod(self.event_shape),)

    def input_shape(self, shape: Shape) -> Shape:
        size = math.prod(self.event_shape)
        if unify_shapes(tuple(shape), (size,)) is None:
            raise ValueError(f"FactorOut produces events ({size},), got {fmt(shape)}")
        return self.event_shape

    def error_bound(self) -> tuple[float, str]:
        bound = math.prod(step.layer.error_bound()[0] for step in layers(self.rest))
        return float(bound), "product of the bounds of the layers inside"

    def not_ready(self) -> str | None:
        for node in nodes(self.rest):
            problem = node.not_ready()
            if problem is not None:
                return problem
        return None

    # ------------------------------------------------------------------------ maps
    def _split(self, x):
        """An image into ``(factored channels, remaining channels)``."""
        return x[..., : self.latent_channels], x[..., self.latent_channels :]

    def _unsplit(self, parts):
        return jnp.concatenate(parts, axis=-1)

    def _join(self, parts):
        """``(z, rest's output)`` into the flat output vector (row-major, z first)."""
        z, r = parts
        batch = z.shape[: z.ndim - 3]
        # explicit sizes, not -1: an empty batch has no size to infer
        flat = [a.reshape(*batch, math.prod(a.shape[len(batch) :])) for a in (z, r)]
        return jnp.concatenate(flat, axis=-1)

    def _unjoin(self, y):
        batch = y.shape[:-1]
        h, w, _ = self.event_shape
        cut = h * w * self.latent_channels
        z = y[..., :cut].reshape(*batch, h, w, self.latent_channels)
        return z, y[..., cut:].reshape(*batch, *self.rest_out)

    def _forward(self, x, cond):
        z, r = self._split(x)
        r, log_det = self.rest.forward(r, cond=cond)
        return self._join((z, r)), log_det

    def _inverse(self, y, cond):
        z, r = self._unjoin(y)
        x_rest, log_det = self.rest.inverse(r, cond=cond)
        return self._unsplit((z, x_rest)), log_det
