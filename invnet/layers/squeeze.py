"""Space-to-depth layers on channels-last images: the squeeze and the 2-D Haar step."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

from invnet.core import Bijector, Shape, fmt

__all__ = ["Squeeze", "HaarDownsample"]


class _SpaceToDepth(Bijector):
    """Shared shapes: ``(H, W, C) <-> (H/f, W/f, f*f*C)``, sizes checked at build/trace."""

    event_ndim = 3
    factor = 2

    def event_pattern(self) -> Shape:
        return (None, None, None)

    def output_shape(self, shape: Shape) -> Shape:
        f, name = self.factor, type(self).__name__
        h, w, c = shape
        for size, axis in ((h, "height"), (w, "width")):
            if size is not None and size % f:
                raise ValueError(
                    f"{name}: the image {axis} must be divisible by {f}, got events "
                    f"{fmt(shape)}; crop or pad the images (or squeeze fewer times)"
                )
        scale = lambda s, k: None if s is None else s * k  # noqa: E731
        return (None if h is None else h // f, None if w is None else w // f, scale(c, f * f))

    def input_shape(self, shape: Shape) -> Shape:
        f, name = self.factor, type(self).__name__
        h, w, c = shape
        if c is not None and c % (f * f):
            raise ValueError(
                f"{name}: the inverse needs a channel count divisible by {f * f}, got events "
                f"{fmt(shape)}"
            )
        scale = lambda s, k: None if s is None else s * k  # noqa: E731
        return (scale(h, f), scale(w, f), None if c is None else c // (f * f))

    def error_bound(self) -> tuple[float, str]:
        return 1.0, "orthogonal"

    def _blocks(self, x):
        """``(..., H, W, C) -> (..., H/f, W/f, f*f, C)``: the ``f x f`` pixels of each block
        in row-major order."""
        f = self.factor
        *batch, h, w, c = x.shape
        x = x.reshape(*batch, h // f, f, w // f, f, c)
        x = jnp.moveaxis(x, -4, -3)  # (..., H/f, W/f, f, f, C)
        return x.reshape(*batch, h // f, w // f, f * f, c)

    def _unblocks(self, x):
        """The inverse of `_blocks`."""
        f = self.factor
        *batch, h, w, _, c = x.shape
        x = x.reshape(*batch, h, w, f, f, c)
        x = jnp.moveaxis(x, -3, -4)  # (..., H/f, f, W/f, f, C)
        return x.reshape(*batch, h * f, w * f, c)


class Squeeze(_SpaceToDepth):
    """Space-to-depth: ``(H, W, C) -> (H/f, W/f, f*f*C)`` (RealNVP's / Glow's squeeze).

    * Map: each ``f x f`` block of pixels becomes one pixel with ``f*f*C`` channels; output
      channel ``(i*f + j)*C + c`` holds input pixel ``(f*h + i, f*w + j)``, channel ``c``.
    * Log-det: 0 (elements are only relabelled); inverse: depth-to-space. No arithmetic,
      so round trips are exact.
    * The image height and width must be divisible by ``f``: other sizes are a
      ``ValueError`` when the model is built (`invnet.Sequential` / `invnet.Flow` with a
      known shape) or when it is called.

    Reference: Dinh et al., "Density estimation using Real NVP", ICLR 2017.

    Example:
        >>> import jax.numpy as jnp, invnet
        >>> y, log_det = invnet.Squeeze().forward(jnp.zeros((5, 8, 8, 1)))
        >>> y.shape, log_det.shape
        ((5, 4, 4, 4), (5,))
    """

    def __init__(self, factor: int = 2):
        if not isinstance(factor, int | np.integer) or factor < 2:
            raise ValueError(f"Squeeze: factor must be an integer >= 2, got {factor!r}")
        self.factor = int(factor)

    def get_config(self) -> dict[str, Any]:
        return {"factor": self.factor}

    def _forward(self, x, cond):
        y = self._blocks(x)
        # explicit sizes, not -1: an empty batch has no size to infer
        return y.reshape(*y.shape[:-2], y.shape[-2] * y.shape[-1]), self._zero_log_det(x)

    def _inverse(self, y, cond):
        c = y.shape[-1] // (self.factor * self.factor)
        x = self._unblocks(y.reshape(*y.shape[:-1], self.factor * self.factor, c))
        return x, self._zero_log_det(y, inverse=True)


# The orthonormal 2-D Haar analysis matrix on a 2x2 block [a, b; c, d] in row-major order:
# rows are the average (low-pass), the horizontal, vertical and diagonal details. Symmetric
# and its own inverse (H @ H = I), so the inverse applies the same matrix.
_HAAR = 0.5 * np.array(
    [[1.0, 1.0, 1.0, 1.0], [1.0, -1.0, 1.0, -1.0], [1.0, 1.0, -1.0, -1.0], [1.0, -1.0, -1.0, 1.0]]
)


class HaarDownsample(_SpaceToDepth):
    """One level of the orthonormal 2-D Haar wavelet transform: ``(H, W, C) -> (H/2, W/2, 4C)``.

    * Map: for each 2x2 block ``[a, b; c, d]`` of every channel, the four outputs
      ``(a+b+c+d)/2`` (average), ``(a-b+c-d)/2`` (horizontal detail), ``(a+b-c-d)/2``
      (vertical detail), ``(a-b-c+d)/2`` (diagonal detail). Output channels are grouped by
      band: channels ``0..C-1`` are the low-pass image, then the three detail bands, so a
      following factor-out of the *last* channels removes details first.
    * Log-det: 0 (an orthogonal map, ``|det| = 1``).
    * Inverse: the same 4x4 matrix (symmetric and orthogonal, hence its own inverse);
      the round trip loses only a few ulps and the layer never amplifies errors.
    * Height and width must be even (else ``ValueError`` at build or call time).

    Reference: Jacobsen et al., "i-RevNet: Deep Invertible Networks", ICLR 2018; Etmann et
    al., "iUNets: Fully invertible U-Nets with learnable up- and downsampling", 2020.

    Example:
        >>> import jax.numpy as jnp, invnet
        >>> x = jnp.ones((1, 2, 2, 1))
        >>> y, log_det = invnet.HaarDownsample().forward(x)
        >>> y[0, 0, 0], float(log_det[0])
        (Array([2., 0., 0., 0.], dtype=float32), 0.0)
    """

    def get_config(self) -> dict[str, Any]:
        return {}

    def _mix(self, blocks):
        """Apply the Haar matrix over the block axis: ``(..., 4, C) -> (..., 4, C)``."""
        haar = jnp.asarray(_HAAR, blocks.dtype)
        return jnp.einsum("ij,...jc->...ic", haar, blocks)

    def _forward(self, x, cond):
        y = self._mix(self._blocks(x))
        # explicit sizes, not -1: an empty batch has no size to infer
        return y.reshape(*y.shape[:-2], y.shape[-2] * y.shape[-1]), self._zero_log_det(x)

    def _inverse(self, y, cond):
        blocks = self._mix(y.reshape(*y.shape[:-1], 4, y.shape[-1] // 4))
        return self._unblocks(blocks), self._zero_log_det(y, inverse=True)
