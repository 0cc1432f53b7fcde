"""Fixed permutations of the features."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from invnet.core import Bijector, Buffer

__all__ = ["Permute", "take_last"]


def take_last(a: jax.Array, index) -> jax.Array:
    """``a[..., index]``: entries of the last axis, in ``index`` order. On CPU it gathers
    whole rows of the transposed array (XLA:CPU copies rows far faster than it gathers
    single elements of the last axis: 1.5x for a 10-block coupling flow at D=64)."""
    if a.ndim > 1 and jax.default_backend() == "cpu":
        return jnp.swapaxes(jnp.swapaxes(a, -1, 0)[index], -1, 0)
    return a[..., index]


def check_permutation(name: str, perm, inv_perm, dim: int) -> None:
    """Raise ``ValueError`` unless ``perm`` is a permutation of ``0..dim-1`` and ``inv_perm``
    its inverse (the fixed buffers of `Permute` and `invnet.LULinear`)."""
    perm, inv_perm = np.asarray(perm), np.asarray(inv_perm)
    if perm.shape != (dim,) or not np.array_equal(np.sort(perm), np.arange(dim)):
        raise ValueError(f"{name}: perm is not a permutation of 0..{dim - 1}")
    if inv_perm.shape != (dim,) or not np.array_equal(perm[inv_perm], np.arange(dim)):
        raise ValueError(f"{name}: inv_perm is not the inverse of perm")


class Permute(Bijector):
    """Fixed permutation of the last axis: ``y = x[..., perm]``.

    * Log-det: 0 (a permutation matrix has determinant +-1).
    * Inverse: ``x = y[..., argsort(perm)]``, a gather like the forward. ``mode="reverse"``
      runs as ``jnp.flip`` (XLA fuses it into its neighbours: a 10-block coupling flow at
      D=64 sampled 2x faster on CPU than with a gather); other permutations gather whole
      rows of the transposed batch on CPU (1.5x faster there than gathering along the
      last axis). The results are the same exact data movement either way.
    * ``mode="random"`` (default) draws ``perm`` from ``rngs``; ``mode="reverse"`` reverses
      the features (needs no ``rngs``); ``perm=`` gives an explicit permutation.
      Place one between coupling blocks so every feature gets transformed.
    * The permutation is a `invnet.Buffer`, never trained.

    Example:
        >>> import jax.numpy as jnp, invnet
        >>> p = invnet.Permute(3, mode="reverse")
        >>> p.forward(jnp.array([1.0, 2.0, 3.0]))[0]
        Array([3., 2., 1.], dtype=float32)
    """

    def __init__(
        self,
        dim: int,
        *,
        mode: str = "random",
        perm=None,
        rngs: nnx.Rngs | None = None,
    ):
        if not isinstance(dim, int | np.integer) or dim < 1:
            raise ValueError(f"Permute: dim must be a positive integer, got {dim!r}")
        self.dim = int(dim)
        if perm is not None:
            p = np.asarray(perm)
            if p.shape != (dim,) or sorted(p.tolist()) != list(range(dim)):
                raise ValueError(f"Permute: perm must be a permutation of 0..{dim - 1}")
            mode = "explicit"
        elif mode == "reverse":
            p = np.arange(dim)[::-1]
        elif mode == "random":
            if rngs is None:
                raise ValueError("Permute(mode='random') needs rngs=nnx.Rngs(seed)")
            p = np.asarray(jax.random.permutation(rngs.params(), dim))
        else:
            raise ValueError(f"Permute: mode must be 'random' or 'reverse', got {mode!r}")
        self.mode = mode
        self.perm = Buffer(jnp.asarray(p, jnp.int32))
        self.inv_perm = Buffer(jnp.asarray(np.argsort(p), jnp.int32))

    @classmethod
    def min_stored_values(cls, config: dict[str, Any]) -> int:
        """``perm`` and ``inv_perm`` (what `invnet.load` checks before building)."""
        return 2 * int(config["dim"])

    def check_buffers(self) -> None:
        """``perm`` a permutation of ``0..dim-1`` and ``inv_perm`` its inverse (the reversal
        for ``mode="reverse"``, which runs as a flip); `invnet.load` calls it."""
        check_permutation("Permute", self.perm[...], self.inv_perm[...], self.dim)
        reverse = np.arange(self.dim)[::-1]
        if self.mode == "reverse" and not np.array_equal(np.asarray(self.perm[...]), reverse):
            raise ValueError("Permute(mode='reverse'): perm must be the reversal of 0..dim-1")

    def get_config(self) -> dict[str, Any]:
        # the permutation itself is restored from the saved Buffer state
        return {"dim": self.dim, "mode": "reverse" if self.mode == "reverse" else "random"}

    def error_bound(self) -> tuple[float, str]:
        return 1.0, "permutation"

    def _apply(self, a, index):
        if self.mode == "reverse":  # a static reversal: XLA fuses it where a gather is not
            return jnp.flip(a, axis=-1)
        return take_last(a, index)

    def _forward(self, x, cond):
        return self._apply(x, self.perm[...]), self._zero_log_det(x)

    def _inverse(self, y, cond):
        return self._apply(y, self.inv_perm[...]), self._zero_log_det(y)
