"""Discrete pixel data: uniform dequantisation and bits per dimension.

A flow is a density on continuous data; pixels are integers ``0 .. levels-1``. Adding
``u ~ U[0, 1)`` to each pixel (`dequantize`) gives continuous data ``k + u`` whose
density ``p`` bounds the pixels' probability from below, ``log P(k) >= E_u log p(k + u)``
(Theis, van den Oord and Bethge 2016), so ``-E_u log2 p(k + u) / D`` is an upper bound
on the bits per dimension, the figure image flows report (`bits_per_dim`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["dequantize", "bits_per_dim"]


def _as_key(key) -> jax.Array:
    if isinstance(key, int | np.integer) and not isinstance(key, bool):
        return jax.random.key(int(key))
    if isinstance(key, jax.Array) and (
        jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
        or (key.dtype == jnp.uint32 and key.shape == (2,))
    ):
        return key
    raise TypeError(f"key must be a jax PRNG key or an int seed, got {type(key).__name__}")


def _check_pixels(pixels, levels: int | None) -> jax.Array:
    """Pixels as a float array; integer-valued and in ``[0, levels)`` when concrete."""
    a = jnp.asarray(pixels)
    if not (jnp.issubdtype(a.dtype, jnp.integer) or jnp.issubdtype(a.dtype, jnp.floating)):
        raise TypeError(f"pixels must be an integer or float array, got dtype {a.dtype}")
    if not isinstance(a, jax.core.Tracer) and a.size:
        host = np.asarray(a)
        if not np.all(np.isfinite(host)) or np.any(host != np.round(host)):
            raise ValueError(
                "pixels must be whole numbers (the discrete levels 0, 1, ...); these hold "
                "fractions or non-finite values. Are they already dequantised or scaled?"
            )
        low, high = host.min(), host.max()
        if low < 0 or (levels is not None and high >= levels):
            within = f"0..{levels - 1}" if levels is not None else ">= 0"
            raise ValueError(f"pixels must lie in {within}; these span {low}..{high}")
    if jnp.issubdtype(a.dtype, jnp.floating):
        return a
    return a.astype(jnp.float32)


def dequantize(key, pixels, *, levels: int | None = None, dtype=None) -> jax.Array:
    r"""Uniform dequantisation: ``pixels + u`` with ``u ~ U[0, 1)`` drawn per element.

    Args:
        key: a PRNG key or an int seed.
        pixels: whole numbers ``>= 0`` (any shape, integer or float dtype); with
            ``levels``, they must also be ``< levels``. Checked when concrete.
        levels: the number of pixel levels (256 for 8-bit images), for the range check.
        dtype: of the result; default the pixels' float dtype, else float32.

    Returns:
        Continuous data in ``[0, levels)``, the input of a flow that starts with
        `invnet.Dequantize` (scale to the unit interval) and `invnet.Logit`.

    Example:
        >>> import numpy as np, invnet
        >>> x = invnet.dequantize(0, np.array([[0, 3, 255]], np.uint8), levels=256)
        >>> x = np.asarray(x)
        >>> bool(((x >= [[0, 3, 255]]) & (x < [[1, 4, 256]])).all())
        True
    """
    a = _check_pixels(pixels, levels)
    dtype = jnp.dtype(dtype) if dtype is not None else a.dtype
    return a.astype(dtype) + jax.random.uniform(_as_key(key), a.shape, dtype)


def _event_ndim(flow, pixels: jax.Array) -> int:
    """How many trailing axes of ``pixels`` are one sample, from the model's event shape."""
    batch_shape = getattr(flow, "batch_shape", None)
    k = pixels.ndim - len(batch_shape(pixels)) if callable(batch_shape) else 1
    if k < 1 or k > pixels.ndim:
        raise ValueError(
            f"bits_per_dim: pixels of shape {tuple(pixels.shape)} do not hold whole samples "
            f"of the model (its events have {k} axes)"
        )
    return k


def bits_per_dim(
    flow,
    pixels,
    *,
    key,
    scale: float = 1.0,
    offset: float = 0.0,
    levels: int | None = None,
    samples: int = 1,
    cond=None,
) -> jax.Array:
    r"""Bits per dimension of discrete pixels under a flow trained on dequantised pixels.

    The flow's input is ``x = (pixels + u) * scale + offset`` with ``u ~ U[0, 1)``: give
    ``scale=1`` (the default) when the flow starts with `invnet.Dequantize`, or
    ``scale=1/levels`` when it was trained on ``(pixels + u) / levels``; ``offset`` (and
    ``scale``) cover a standardisation ``((pixels + u) / levels - mean) / std`` too. Then

    ``bits/dim = -(E_u log p(x) + D log scale) / (D ln 2)``

    where D is the number of values in one sample; ``samples`` draws of ``u`` are
    averaged (one draw is an unbiased estimate of the bound). The uniform model over
    ``levels`` values scores ``log2(levels)``. A ``scale`` at which the flow scores far
    worse than that (by more than 4 bits per value) while ``1`` or ``1/levels`` scores it
    far better is refused, with the ``scale`` to pass: integer levels fed to a flow trained
    on ``[0, 1]``, or the reverse (checked on concrete inputs only).

    Args:
        flow: an `invnet.Flow` (or any model with ``log_prob``), or a bare bijector
            scored against a standard normal.
        pixels: whole numbers ``>= 0``, shape ``batch + event``.
        key: a PRNG key or an int seed for the dequantisation noise.
        scale, offset: how the flow's input relates to ``pixels + u`` (see above).
        levels: the number of pixel levels, for a range check of ``pixels``.
        samples: draws of the dequantisation noise to average (>= 1).
        cond: the conditioning input of a conditional flow.

    Returns:
        The bits per dimension of each sample, shape ``batch`` (take ``.mean()`` for the
        figure papers report).

    Example:
        >>> import jax, numpy as np, invnet
        >>> from flax import nnx
        >>> flow = invnet.Flow(invnet.Sequential(
        ...     invnet.Dequantize(16), invnet.Logit(0.05), invnet.LULinear(4, rngs=nnx.Rngs(0))))
        >>> pixels = np.random.default_rng(0).integers(0, 16, (8, 4))
        >>> bpd = invnet.bits_per_dim(flow, pixels, key=0, levels=16)
        >>> bpd.shape
        (8,)
    """
    scale = float(scale)
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"bits_per_dim: scale must be a positive number, got {scale!r}")
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"bits_per_dim: samples must be an int >= 1, got {samples!r}")
    key = _as_key(key)
    a = _check_pixels(pixels, levels)
    k = _event_ndim(flow, a)
    size = math.prod(a.shape[a.ndim - k :])
    if size == 0:
        raise ValueError("bits_per_dim: the samples are empty (an event of size 0)")
    bpd = _bits(flow, a, key, scale, offset, samples, cond, size)
    if not isinstance(bpd, jax.core.Tracer) and bpd.size:
        _check_scale(flow, a, key, scale, offset, levels, cond, size, bpd)
    return bpd


def _bits(flow, a, key, scale, offset, samples, cond, size):
    total = 0.0
    for i in range(samples):
        x = dequantize(jax.random.fold_in(key, i), a) * scale + offset
        total = total + _log_density(flow, x, cond)
    mean_log_p = total / samples
    return -(mean_log_p + size * math.log(scale)) / (size * math.log(2.0))


# A flow scored more than this many bits per value above the uniform model over the levels
# is taken as fed at the wrong scale when another scale scores it that much better.
IMPLAUSIBLE_BITS = 4.0


def _check_scale(flow, a, key, scale, offset, levels, cond, size, bpd) -> None:
    """Refuse a ``scale`` at which the pixels cannot be what the flow was trained on.

    The uniform model over ``levels`` values scores ``log2(levels)`` bits per value; a flow
    scoring ``IMPLAUSIBLE_BITS`` more than that at ``scale`` while ``1`` or ``1/levels``
    (levels given, or the next power of 2 above the largest pixel) scores it far better was
    trained on the other scale: integer levels fed to a flow trained on ``[0, 1]``
    (``bits_per_dim(glow, pixels, key=0)`` gave 198,164 instead of 8.34) or the reverse.
    """
    high = float(np.max(np.asarray(a)))
    levels = levels if levels is not None else 2 ** max(1, math.ceil(math.log2(high + 1)))
    ceiling = math.log2(levels) + IMPLAUSIBLE_BITS
    got = float(np.mean(np.asarray(bpd, np.float64)))
    if not got > ceiling:  # plausible (or NaN: nothing to compare)
        return
    for other, label in ((1.0 / levels, f"1/{levels}"), (1.0, "1")):
        if math.isclose(other, scale, rel_tol=1e-6):
            continue
        alt = _bits(flow, a, key, other, 0.0, 1, cond, size)
        alt = float(np.mean(np.asarray(alt, np.float64)))
        if alt <= ceiling and alt < got - IMPLAUSIBLE_BITS:
            raise ValueError(
                f"bits_per_dim: at scale={scale:.6g} (offset={offset:g}) the flow scores "
                f"{got:.6g} bits/dim, far above the {math.log2(levels):g} of a uniform model "
                f"over {levels} levels, while scale={label} gives {alt:.4g}: these pixels "
                f"cannot be what the flow was trained on at scale={scale:.6g}. Pass "
                f"scale={label} (1 when the flow starts with invnet.Dequantize or was trained "
                f"on pixels + u; 1/{levels} when it was trained on (pixels + u) / {levels})"
            )


def _log_density(flow, x, cond):
    if hasattr(flow, "log_prob"):
        return flow.log_prob(x, cond=cond)
    from invnet.flows import StandardNormal

    z, log_det = flow.forward(x, cond=cond)
    flat = z.reshape(*log_det.shape, -1)  # latents of any rank: one vector per sample
    return StandardNormal().log_prob(flat) + log_det
