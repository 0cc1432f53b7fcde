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
import numpy as np

from invnet import _runtime
from invnet.bases import Delegate
from invnet.core import Bijector, unify_shapes
from invnet.distributions import Distribution, distribution_from_spec

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


class Flow(Delegate):
    r"""A density model ``p(x | c)``: a bijector ``f`` (data -> latent) and a base ``p_Z``.

    * ``forward(x)`` / ``inverse(z)`` are the bijector's, so a `Flow` is itself a
      `invnet.Bijector` and `invnet.save` / `invnet.load` store and rebuild it, base
      included: `StandardNormal` by name, an `invnet.Distribution` (learnable Gaussian,
      mixture, Student-t, class-conditional, uniform, or your own subclass) by its config,
      its parameters as arrays. A `Distribution` base's ``nnx.Param``s train with the rest.
    * The base sees the latent reshaped to its own ``event_shape`` (same number of
      elements). A conditional base (`invnet.ClassConditionalGaussian`) takes ``cond``; the
      bijector gets ``cond`` only if it has conditional layers itself. When both are
      conditional they take the same ``cond`` and their ``cond_dim`` must agree.
    * ``log_prob(x, cond)``: ``log p_Z(f(x)) + log|det df/dx|``, one value per sample, in
      nats. Non-finite inputs or a non-finite log-det give a non-finite result, never a
      silently clipped one.
    * ``sample(key, n, cond)``: ``x = f^{-1}(z)``, ``z ~ p_Z`` of shape ``(n, D)``;
      ``temperature`` scales ``z`` (``< 1`` gives typical samples, as in GLOW).
    * Conditional flows: when the bijector has ``cond_dim > 0``, ``cond`` is required: one
      row per sample, or one ``(cond_dim,)`` vector for the whole batch.

    The data shape is taken from the bijector; give it explicitly (``dim=`` for vectors,
    ``event_shape=(H, W, C)`` for images) only when the bijector takes any size (a lone
    `invnet.LeakyReLU`, convolutional layers). The latent ``z`` has the bijector's output
    shape; the base density is taken over its flattened elements.

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

    def __init__(
        self,
        bijector: Bijector,
        base: Any = None,
        *,
        dim: int | None = None,
        event_shape: tuple[int, ...] | None = None,
    ):
        if not isinstance(bijector, Bijector):
            raise TypeError(f"Flow: expected an invnet Bijector, got {type(bijector).__name__}")
        if base is None or base == "standard_normal":
            base = StandardNormal()
        if not (hasattr(base, "log_prob") and hasattr(base, "sample")):
            raise TypeError("Flow: base must have log_prob(z) and sample(key, shape, dtype)")
        base_cond = getattr(base, "cond_dim", 0)
        if base_cond and bijector.cond_dim and base_cond != bijector.cond_dim:
            raise ValueError(
                f"Flow: the base takes cond of width {base_cond}, the bijector "
                f"{bijector.cond_dim}; "
                "both receive the same cond, so build them with the same cond_dim"
            )
        self.bijector = bijector
        self.base = base
        self._copy_shape()
        self.precision = bijector.precision
        self.event_shape = _data_shape(bijector, dim, event_shape)
        if self.event_shape is not None and len(self.event_shape) == 1:
            self.dim = self.event_shape[0]
        if isinstance(base, Distribution) and self.event_shape is not None:
            size, latent = math.prod(base.event_shape), self.latent_shape()
            if size != math.prod(latent):
                raise ValueError(
                    f"Flow: the base's event shape {base.event_shape} has {size} elements, the "
                    f"flow's latent {latent} has {math.prod(latent)}; build the base with "
                    f"event_shape={latent}"
                )

    def _copy_shape(self) -> None:
        super()._copy_shape()
        self.cond_dim = self.cond_dim or getattr(getattr(self, "base", None), "cond_dim", 0)

    def _bijector_cond(self, cond):
        """``cond`` for the bijector: dropped when only the base is conditional."""
        return cond if self.bijector.cond_dim else None

    def _base_cond(self, cond):
        return cond if getattr(self.base, "cond_dim", 0) else None

    def inner(self) -> Bijector:
        return self.bijector

    # ------------------------------------------------------------------ Bijector API
    def forward(self, x, *, cond=None):
        if cond is None or self.cond_dim == 0:
            return self.bijector.forward(x, cond=cond)  # the bijector's own errors
        return self.bijector.forward(x, cond=self._bijector_cond(cond))

    def inverse(self, y, *, cond=None):
        if cond is None or self.cond_dim == 0:
            return self.bijector.inverse(y, cond=cond)
        return self.bijector.inverse(y, cond=self._bijector_cond(cond))

    def chain(self) -> list[tuple[str, Bijector, bool]]:
        return [(".bijector", self.bijector, False)]

    def get_config(self) -> dict[str, Any]:
        shape = None if self.event_shape is None else list(self.event_shape)
        if isinstance(self.base, Distribution):
            return {"base": self.base.to_spec(), "dim": self.dim, "event_shape": shape}
        name = getattr(self.base, "name", None)
        if name not in _BASES or not isinstance(self.base, _BASES[name]):
            raise ValueError(
                f"Flow with base {self.base!r} cannot be saved by architecture (only "
                f"{sorted(_BASES)} are built in, and subclasses of invnet.Distribution); save "
                "flow.bijector and rebuild the Flow, or make the base a Distribution"
            )
        return {"base": name, "dim": self.dim, "event_shape": shape}

    @classmethod
    def from_config(cls, config, children, *, rngs):
        shape = config.get("event_shape")
        base = config.get("base")
        if isinstance(base, dict):
            base = distribution_from_spec(base, rngs=rngs)
        elif base is not None and base not in _BASES:
            raise ValueError(f"Flow: unknown base {base!r}; known: {sorted(_BASES)}")
        return cls(
            children[0],
            base=base,
            dim=config.get("dim") if shape is None else None,
            event_shape=None if shape is None else tuple(shape),
        )

    # -------------------------------------------------------------------- densities
    def latent_shape(self) -> tuple[int, ...]:
        """The shape of one latent ``z = f(x)`` (the bijector's output event)."""
        if self.event_shape is None:
            raise ValueError(
                "Flow: the flow's bijector takes events of any size, so the flow cannot draw "
                "samples; build it with event_shape=(...) (or dim= for vectors)"
            )
        return tuple(self.bijector.output_shape(self.event_shape))

    def _base_log_prob(self, z, cond=None):
        k = len(self.bijector.output_pattern())
        batch = z.shape[: z.ndim - k]
        if isinstance(self.base, Distribution):
            size = math.prod(z.shape[z.ndim - k :])
            if size != math.prod(self.base.event_shape):
                raise ValueError(
                    f"Flow: the latent has {size} elements per sample, the base's event shape "
                    f"{self.base.event_shape} {math.prod(self.base.event_shape)}"
                )
            z = z.reshape(*batch, *self.base.event_shape)
            return self.base.log_prob(z, cond=self._base_cond(cond))
        size = math.prod(z.shape[z.ndim - k :])  # not -1: an empty batch has no size to infer
        return self.base.log_prob(z.reshape(*batch, size))

    def _draw(self, key, n, temperature, dtype, cond=None):
        key = _as_key(key)
        n = _count(n)
        latent = self.latent_shape()
        if isinstance(self.base, Distribution):
            z = self.base.sample(key, n, self._base_cond(cond), dtype=dtype,
                                 temperature=temperature)  # fmt: skip
            return z.reshape(n, *latent)
        z = self.base.sample(key, (n, math.prod(latent)), dtype)
        return (temperature * z).reshape(n, *latent)

    def log_prob(self, x: jax.Array, *, cond: jax.Array | None = None) -> jax.Array:
        """``log p(x | cond)`` in nats, one value per sample (the batch shape). Compiled on
        concrete arrays (see `invnet._runtime`)."""
        return _log_prob(self, self._check_input(x, "x"), cond)

    def sample(
        self,
        key: jax.Array | int,
        n: int,
        *,
        cond: jax.Array | None = None,
        temperature: float = 1.0,
        dtype=jnp.float32,
    ) -> jax.Array:
        """``n`` samples ``x = f^{-1}(z)``, ``z ~ base`` (scaled by ``temperature``).

        ``key``: a JAX key (typed or raw) or an int seed. ``cond``: ``(cond_dim,)`` for one
        condition shared by all ``n`` samples, or ``(n, cond_dim)``, one per sample.
        Drawing and the inverse run as one compiled call (see `invnet._runtime`).
        """
        return self._sampled(_sample, key, n, cond, temperature, dtype)

    def sample_and_log_prob(
        self,
        key: jax.Array | int,
        n: int,
        *,
        cond: jax.Array | None = None,
        temperature: float = 1.0,
        dtype=jnp.float32,
    ):
        """Samples (as `sample`, same arguments) and their ``log p(x | cond)`` under the
        flow, from one inverse pass: ``log p_Z(z) - log|det df^-1/dz|``."""
        return self._sampled(_sample_and_log_prob, key, n, cond, temperature, dtype)

    def _sampled(self, fn, key, n, cond, temperature, dtype):
        key, n, dtype = _as_key(key), _count(n), jnp.dtype(dtype)
        self.latent_shape()  # a flow over events of any size cannot sample: say so here
        if not getattr(self.base, "tempered", True) and temperature != 1.0:
            raise ValueError(f"Flow: temperature has no meaning for the base {self.base!r}")
        return fn(self, key, cond, temperature, n=n, dtype=dtype)


# the functions that `invnet._runtime` compiles (module level: they are part of its cache key)
@_runtime.compiled
def _log_prob(flow, x, cond):
    z, log_det = flow.forward(x, cond=cond)
    return flow._base_log_prob(z, cond) + log_det


@_runtime.compiled(precompute="inverse")
def _sample(flow, key, cond, temperature, *, n, dtype):
    z = flow._draw(key, n, temperature, dtype, cond)
    return flow.inverse(z, cond=cond)[0]


@_runtime.compiled(precompute="inverse")
def _sample_and_log_prob(flow, key, cond, temperature, *, n, dtype):
    z = flow._draw(key, n, temperature, dtype, cond)
    x, inv_log_det = flow.inverse(z, cond=cond)
    return x, flow._base_log_prob(z, cond) - inv_log_det


def _as_key(key) -> jax.Array:
    if isinstance(key, int | np.integer):
        return jax.random.key(int(key))
    if not isinstance(key, jax.Array) or not (
        jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
        or (key.dtype == jnp.uint32 and key.shape == (2,))
    ):
        raise TypeError(
            f"Flow: key must be a jax.random.key(...), a raw PRNGKey or an int seed, got {key!r}"
        )
    return key


def _count(n) -> int:
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 0:
        raise ValueError(f"Flow: the number of samples must be an integer >= 0, got {n!r}")
    return int(n)


def _data_shape(bijector: Bijector, dim, event_shape) -> tuple[int, ...] | None:
    """The concrete data event shape of a flow, or None when the bijector leaves it open."""
    pattern = bijector.event_pattern()
    given = tuple(event_shape) if event_shape is not None else (dim,) if dim is not None else None
    if given is None:
        return None if any(s is None for s in pattern) else tuple(pattern)
    if any(not isinstance(s, int | np.integer) or s < 1 for s in given):
        raise ValueError(f"Flow: event_shape must be positive integers, got {given}")
    if unify_shapes(pattern, given) is None:
        raise ValueError(
            f"Flow: the data shape {given} disagrees with the bijector's event shape {pattern}"
        )
    bijector.output_shape(given)  # refuses shapes the bijector cannot take
    return tuple(int(s) for s in given)
