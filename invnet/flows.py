"""Normalizing flows: a bijector plus a base distribution.

A `Flow` maps data ``x`` to a latent ``z = f(x)`` with its bijector's ``forward`` and
models the data density by the change of variables

    log p(x | c) = log p_Z(f(x; c)) + log|det df/dx (x; c)|

with ``p_Z`` a standard normal by default. Samples come from the exact inverse:
``z ~ p_Z``, ``x = f^{-1}(z; c)``. A conditional flow (cINN) is a flow whose bijector
has conditional coupling blocks (``cond_dim > 0``); ``cond`` is passed to every layer.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from invnet.core import Bijector

__all__ = ["Flow", "StandardNormal"]


class StandardNormal:
    r"""The standard normal base ``N(0, I)`` on the last axis.

    ``log_prob(z) = -0.5 * sum(z**2) - 0.5 * D * log(2 pi)`` (summed over the last axis).
    """

    name = "standard_normal"

    def log_prob(self, z: jax.Array) -> jax.Array:
        d = z.shape[-1]
        return -0.5 * jnp.sum(z * z, axis=-1) - 0.5 * d * math.log(2 * math.pi)

    def sample(self, key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
        return jax.random.normal(key, shape, dtype)

    def __repr__(self) -> str:
        return "StandardNormal()"

    def __eq__(self, other) -> bool:
        return type(other) is type(self)

    def __hash__(self) -> int:
        return hash(type(self).__name__)


_BASES = {"standard_normal": StandardNormal}


class Flow(Bijector):
    r"""A density model ``p(x | c)``: a bijector ``f`` (data -> latent) and a base ``p_Z``.

    * ``forward(x)`` / ``inverse(z)`` are the bijector's, so a `Flow` is itself a
      `invnet.Bijector` and `invnet.save` / `invnet.load` store and rebuild it (the base is
      saved by name; only `StandardNormal` is built in).
    * ``log_prob(x, cond)``: ``log p_Z(f(x)) + log|det df/dx|``, one value per sample, in
      nats. Non-finite inputs or a non-finite log-det give a non-finite result, never a
      silently clipped one.
    * ``sample(key, n, cond)``: ``x = f^{-1}(z)``, ``z ~ p_Z`` of shape ``(n, D)``;
      ``temperature`` scales ``z`` (``< 1`` gives typical samples, as in GLOW).
    * Conditional flows: when the bijector has ``cond_dim > 0``, ``cond`` is required: one
      row per sample, or one ``(cond_dim,)`` vector for the whole batch.

    ``dim`` is taken from the bijector; give it explicitly only for bijectors that work on
    any size (a lone `invnet.LeakyReLU`).

    Reference: Papamakarios et al., "Normalizing Flows for Probabilistic Modeling and
    Inference", JMLR 2021.

    Example:
        >>> import jax, jax.numpy as jnp, invnet
        >>> from flax import nnx
        >>> flow = invnet.Flow(invnet.Sequential(
        ...     invnet.LULinear(2, rngs=nnx.Rngs(0)), invnet.AffineCoupling(2, rngs=nnx.Rngs(1))))
        >>> x = flow.sample(jax.random.key(0), 5)
        >>> x.shape, flow.log_prob(x).shape
        ((5, 2), (5,))
    """

    def __init__(self, bijector: Bijector, base: Any = None, *, dim: int | None = None):
        if not isinstance(bijector, Bijector):
            raise TypeError(f"Flow: expected an invnet Bijector, got {type(bijector).__name__}")
        if base is None or base == "standard_normal":
            base = StandardNormal()
        if not (hasattr(base, "log_prob") and hasattr(base, "sample")):
            raise TypeError("Flow: base must have log_prob(z) and sample(key, shape, dtype)")
        if dim is not None and bijector.dim is not None and dim != bijector.dim:
            raise ValueError(f"Flow: dim={dim} disagrees with the bijector's dim={bijector.dim}")
        self.bijector = bijector
        self.base = base
        self.dim = bijector.dim if bijector.dim is not None else dim
        self.cond_dim = bijector.cond_dim
        self.precision = bijector.precision

    # ------------------------------------------------------------------ Bijector API
    def forward(self, x, *, cond=None):
        return self.bijector.forward(x, cond=cond)

    def inverse(self, y, *, cond=None):
        return self.bijector.inverse(y, cond=cond)

    def children(self) -> list[Bijector]:
        return [self.bijector]

    def get_config(self) -> dict[str, Any]:
        name = getattr(self.base, "name", None)
        if name not in _BASES or not isinstance(self.base, _BASES[name]):
            raise ValueError(
                f"Flow with base {self.base!r} cannot be saved by architecture (only "
                f"{sorted(_BASES)} are built in); save flow.bijector and rebuild the Flow"
            )
        return {"base": name, "dim": self.dim}

    @classmethod
    def from_config(cls, config, children, *, rngs):
        return cls(children[0], base=config.get("base"), dim=config.get("dim"))

    # -------------------------------------------------------------------- densities
    def log_prob(self, x: jax.Array, *, cond: jax.Array | None = None) -> jax.Array:
        """``log p(x | cond)`` in nats, shape ``x.shape[:-1]``."""
        z, log_det = self.forward(x, cond=cond)
        return self.base.log_prob(z) + log_det

    def sample(
        self,
        key: jax.Array,
        n: int,
        *,
        cond: jax.Array | None = None,
        temperature: float = 1.0,
        dtype=jnp.float32,
    ) -> jax.Array:
        """``n`` samples ``x = f^{-1}(z)``, ``z ~ base`` (scaled by ``temperature``).

        ``cond``: ``(cond_dim,)`` for one condition shared by all ``n`` samples, or
        ``(n, cond_dim)``, one per sample.
        """
        if self.dim is None:
            raise ValueError("Flow.sample: the flow has no fixed size; build it with dim=")
        if isinstance(key, int):
            key = jax.random.key(key)
        z = temperature * self.base.sample(key, (int(n), self.dim), dtype)
        return self.inverse(z, cond=cond)[0]

    def sample_and_log_prob(self, key, n, *, cond=None, dtype=jnp.float32):
        """Samples and their ``log p`` from one inverse pass: ``log p_Z(z) - log|det df^-1/dz|``."""
        if self.dim is None:
            raise ValueError("Flow.sample: the flow has no fixed size; build it with dim=")
        z = self.base.sample(key, (int(n), self.dim), dtype)
        x, inv_log_det = self.inverse(z, cond=cond)
        return x, self.base.log_prob(z) - inv_log_det
