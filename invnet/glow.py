"""The Glow builder: a multi-scale image flow from invnet's layers (no math of its own)."""

from __future__ import annotations

import numpy as np
from flax import nnx

from invnet.containers import Sequential
from invnet.core import Bijector
from invnet.flows import Flow
from invnet.layers import ActNorm, Conv1x1, ConvAffineCoupling, FactorOut, Reshape, Squeeze

__all__ = ["glow"]


def _level(shape, levels, steps, hidden, cond_dim, rngs) -> Bijector:
    h, w, c = shape
    if h % 2 or w % 2:
        raise ValueError(
            f"glow: a level squeezes 2x2 pixels, so the image size {h}x{w} must be divisible "
            f"by 2 at every level; use fewer levels or pad the images"
        )
    h, w, c = h // 2, w // 2, 4 * c
    layers: list[Bijector] = [Squeeze()]
    for _ in range(steps):
        layers += [
            ActNorm(c, event_ndim=3),
            Conv1x1(c, rngs=rngs),
            ConvAffineCoupling(c, hidden=hidden, cond_dim=cond_dim, rngs=rngs),
        ]
    if levels == 1:
        layers.append(Reshape((h, w, c), (h * w * c,)))
    else:
        rest = _level((h, w, c - c // 2), levels - 1, steps, hidden, cond_dim, rngs)
        layers.append(FactorOut(c // 2, rest, event_shape=(h, w, c)))
    return Sequential(*layers)


def glow(
    image_shape,
    *,
    levels: int = 2,
    steps: int = 4,
    hidden: int = 64,
    cond_dim: int = 0,
    rngs: nnx.Rngs,
) -> Flow:
    """A Glow flow on channels-last images ``(H, W, C)`` -> latent vectors ``(H*W*C,)``.

    Per level: `invnet.Squeeze`, then ``steps`` x (`invnet.ActNorm` per channel,
    `invnet.Conv1x1`, `invnet.ConvAffineCoupling` with ``hidden`` conv channels), then an
    `invnet.FactorOut` of half the channels to the latent; the last level keeps all of
    them. ``cond_dim > 0`` makes every coupling conditional (class one-hots, ...).
    Train with `invnet.fit`.

    Reference: Kingma & Dhariwal, "Glow", NeurIPS 2018.

    Example:
        >>> import invnet
        >>> from flax import nnx
        >>> flow = invnet.glow((8, 8, 1), levels=2, steps=1, hidden=8, rngs=nnx.Rngs(0))
        >>> flow.latent_shape()
        (64,)
    """
    shape = tuple(int(s) for s in image_shape)
    for name, value in (("levels", levels), ("steps", steps)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
            raise ValueError(f"glow: {name} must be an integer >= 1, got {value!r}")
    if len(shape) != 3:
        raise ValueError(f"glow: need image_shape (H, W, C), got {image_shape}")
    levels, steps = int(levels), int(steps)
    model = _level(shape, levels, steps, hidden, cond_dim, rngs)
    return Flow(model, event_shape=shape)
