"""Base distributions ``p_Z`` for `invnet.Flow`: learnable, mixture, heavy-tailed,
class-conditional and bounded.

Every base is an ``nnx.Module`` over a fixed event shape ``E`` (any rank) with

* ``log_prob(z, cond=None)``: ``log p_Z(z | cond)`` in nats, summed over the event axes, one
  value per sample (``z`` has shape ``(*batch, *E)``), in ``z``'s float dtype;
* ``sample(key, n, cond=None, *, dtype=None, temperature=1.0)``: ``(n, *E)`` samples (the
  reparameterised form ``z = loc + T * scale * eps``, so gradients reach the parameters);
* ``get_config()`` / ``from_config(config, rngs=)``: the JSON-able constructor arguments;
  `invnet.save` stores them in the flow's architecture and the parameters as arrays.

Trainable parameters are ``nnx.Param`` (so `invnet.fit` trains them with the bijector); fixed
ones (a uniform's box, a frozen Student-t ``df``) are `invnet.Buffer`. A user's own base
subclasses `Distribution` and saves and loads the same way once its module is imported.

Reference: Papamakarios et al., "Normalizing Flows for Probabilistic Modeling and Inference",
JMLR 2021 (section 2.3); Ardizzone et al., "Training Normalizing Flows with the Information
Bottleneck for Competitive Generative Classification", NeurIPS 2020 (IB-INN).
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.scipy.special import gammaln, logsumexp

from invnet.core import Buffer

__all__ = [
    "Distribution", "DiagonalGaussian", "GaussianMixture", "StudentT",
    "ClassConditionalGaussian", "Uniform", "distribution_from_spec",
]  # fmt: skip

_LOG_2PI = math.log(2 * math.pi)
_DISTRIBUTIONS: dict[str, type[Distribution]] = {}


def _event_shape(name: str, shape) -> tuple[int, ...]:
    shape = (shape,) if isinstance(shape, int | np.integer) else tuple(shape)
    if not shape or any(isinstance(s, bool) or not isinstance(s, int | np.integer) or s < 1
                        for s in shape):  # fmt: skip
        raise ValueError(f"{name}: event_shape must be positive integers, e.g. (2,), got {shape}")
    return tuple(int(s) for s in shape)


def _param_dtype(name: str, dtype) -> np.dtype:
    dt = jnp.dtype(dtype)
    if dt not in (jnp.float32, jnp.float64):
        raise TypeError(f"{name}: param_dtype must be float32 or float64, got {dt}")
    if dt == jnp.float64 and not jax.config.jax_enable_x64:
        raise ValueError(
            f"{name}: param_dtype=float64 needs jax.config.update('jax_enable_x64', True)"
        )
    return dt


class Distribution(nnx.Module):
    """Base class of invnet's base distributions (see the module docs for the contract).

    Subclasses set ``event_shape`` (and ``cond_dim`` when conditional) and implement
    ``_log_prob(z, cond)`` on a checked ``z`` (elementwise terms summed with `_sum_event`),
    ``_sample(key, n, cond, dtype, temperature)`` and ``get_config()``.
    """

    event_shape: tuple[int, ...] = ()
    cond_dim: int = 0
    param_dtype: Any = jnp.float32
    tempered: bool = True  # whether ``temperature`` means anything for this base

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not cls.__name__.startswith("_"):
            _DISTRIBUTIONS[cls.__name__] = cls

    def log_prob(self, z: jax.Array, cond: jax.Array | None = None) -> jax.Array:
        """``log p(z | cond)``, summed over the event axes: shape ``z.shape[:-len(E)]``."""
        z = jnp.asarray(z)
        k = len(self.event_shape)
        if (
            not jnp.issubdtype(z.dtype, jnp.floating)
            or tuple(z.shape[z.ndim - k :]) != tuple(self.event_shape)
            or z.ndim < k
        ):
            raise ValueError(
                f"{type(self).__name__}.log_prob: z must be a float array of shape "
                f"(..., {', '.join(map(str, self.event_shape))}), got {z.dtype} {z.shape}"
            )
        if cond is not None and self.cond_dim == 0:
            raise ValueError(f"{type(self).__name__} is not conditional; drop cond")
        return self._log_prob(z, cond)

    def sample(
        self, key: jax.Array | int, n: int, cond: jax.Array | None = None, *,
        dtype=None, temperature: float = 1.0,
    ) -> jax.Array:  # fmt: skip
        """``n`` samples of shape ``(n, *E)`` in ``dtype`` (default: ``param_dtype``);
        ``temperature`` scales the spread about the location (``< 1``: typical samples)."""
        if isinstance(key, int | np.integer):
            key = jax.random.key(int(key))
        if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 0:
            raise ValueError(f"{type(self).__name__}.sample: n must be an integer >= 0, got {n!r}")
        if cond is not None and self.cond_dim == 0:
            raise ValueError(f"{type(self).__name__} is not conditional; drop cond")
        dt = jnp.dtype(dtype) if dtype is not None else jnp.dtype(self.param_dtype)
        return self._sample(key, int(n), cond, dt, temperature)

    def _sum_event(self, a: jax.Array) -> jax.Array:
        k = len(self.event_shape)
        return jnp.sum(a, axis=tuple(range(a.ndim - k, a.ndim)))

    def get_config(self) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__} does not define get_config()")

    @classmethod
    def from_config(cls, config: dict[str, Any], *, rngs: nnx.Rngs) -> Distribution:
        """Build from ``get_config()`` output (the parameters are then loaded over it)."""
        if "rngs" in inspect.signature(cls.__init__).parameters:
            return cls(**config, rngs=rngs)
        return cls(**config)

    def to_spec(self) -> dict[str, Any]:
        return {"type": type(self).__name__, "config": self.get_config()}

    def _config(self, **more) -> dict[str, Any]:
        return {"event_shape": list(self.event_shape), **more,
                "param_dtype": jnp.dtype(self.param_dtype).name}  # fmt: skip


def distribution_from_spec(spec: Any, *, rngs: nnx.Rngs | None = None) -> Distribution:
    """Rebuild a base (fresh parameters) from `Distribution.to_spec` output."""
    if not isinstance(spec, dict) or not isinstance(spec.get("config", {}), dict):
        raise ValueError(f"not a base-distribution spec: {spec!r}")
    cls = _DISTRIBUTIONS.get(spec.get("type"))
    if cls is None:
        raise ValueError(
            f"unknown base distribution {spec.get('type')!r}; known: {sorted(_DISTRIBUTIONS)}"
        )
    try:
        return cls.from_config(dict(spec.get("config", {})), rngs=rngs or nnx.Rngs(0))
    except TypeError as err:
        raise ValueError(f"base distribution {spec.get('type')!r}: bad config: {err}") from None


def _normal_terms(z, loc, log_scale):
    """Elementwise ``log N(z; loc, exp(log_scale)^2)``."""
    u = (z - loc) * jnp.exp(-log_scale)
    return -0.5 * u * u - log_scale - 0.5 * _LOG_2PI


class DiagonalGaussian(Distribution):
    r"""A learnable Gaussian with diagonal covariance: ``N(loc, diag(exp(2 log_scale)))``.

    ``log p(z) = sum_i [-(z_i - loc_i)^2 / (2 s_i^2) - log s_i - log(2 pi) / 2]``,
    ``s = exp(log_scale)``; starts as ``N(0, I)`` (``loc = 0``, ``log_scale = 0``).

    Example:
        >>> import jax, jax.numpy as jnp, invnet
        >>> base = invnet.DiagonalGaussian(3)
        >>> z = base.sample(jax.random.key(0), 4)
        >>> z.shape, bool(jnp.allclose(base.log_prob(z), invnet.StandardNormal().log_prob(z)))
        ((4, 3), True)
    """

    def __init__(self, event_shape, *, param_dtype=jnp.float32):
        self.event_shape = _event_shape("DiagonalGaussian", event_shape)
        self.param_dtype = _param_dtype("DiagonalGaussian", param_dtype)
        self.loc = nnx.Param(jnp.zeros(self.event_shape, self.param_dtype))
        self.log_scale = nnx.Param(jnp.zeros(self.event_shape, self.param_dtype))

    def _log_prob(self, z, cond):
        dt = z.dtype
        return self._sum_event(
            _normal_terms(z, self.loc[...].astype(dt), self.log_scale[...].astype(dt))
        )

    def _sample(self, key, n, cond, dtype, temperature):
        eps = jax.random.normal(key, (n, *self.event_shape), dtype)
        scale = jnp.exp(self.log_scale[...].astype(dtype))
        return self.loc[...].astype(dtype) + temperature * scale * eps

    def get_config(self):
        return self._config()


class GaussianMixture(Distribution):
    r"""A learnable mixture of ``K`` diagonal Gaussians.

    ``log p(z) = logsumexp_k [log w_k + sum_i log N(z_i; mu_ki, s_ki^2)]``,
    ``w = softmax(logits)``. Means start at ``init_spread * N(0, I)`` draws (distinct, so
    the components can separate), scales at 1, weights equal. Sampling draws a component
    (not differentiable in the weights) and then ``mu_k + T s_k eps``.

    Example:
        >>> import jax, invnet
        >>> from flax import nnx
        >>> base = invnet.GaussianMixture(2, components=3, rngs=nnx.Rngs(0))
        >>> base.log_prob(base.sample(jax.random.key(0), 5)).shape
        (5,)
    """

    def __init__(self, event_shape, components: int, *, init_spread: float = 1.0,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):  # fmt: skip
        self.event_shape = _event_shape("GaussianMixture", event_shape)
        if isinstance(components, bool) or not isinstance(components, int) or components < 1:
            raise ValueError(
                f"GaussianMixture: components must be an integer >= 1, got {components!r}"
            )
        self.param_dtype = _param_dtype("GaussianMixture", param_dtype)
        self.components, self.init_spread = components, float(init_spread)
        shape = (components, *self.event_shape)
        self.means = nnx.Param(
            init_spread * jax.random.normal(rngs.params(), shape, self.param_dtype)
        )
        self.log_scales = nnx.Param(jnp.zeros(shape, self.param_dtype))
        self.logits = nnx.Param(jnp.zeros((components,), self.param_dtype))

    def log_prob_per_component(self, z: jax.Array) -> jax.Array:
        """``log w_k + log N_k(z)``, shape ``(*batch, K)``."""
        dt, k = z.dtype, len(self.event_shape)
        zk = jnp.expand_dims(z, z.ndim - k)  # (*batch, 1, *E)
        terms = _normal_terms(zk, self.means[...].astype(dt), self.log_scales[...].astype(dt))
        return self._sum_event(terms) + jax.nn.log_softmax(self.logits[...].astype(dt))

    def _log_prob(self, z, cond):
        return logsumexp(self.log_prob_per_component(z), axis=-1)

    def _sample(self, key, n, cond, dtype, temperature):
        k_comp, k_eps = jax.random.split(key)
        comp = jax.random.categorical(k_comp, self.logits[...].astype(dtype), shape=(n,))
        eps = jax.random.normal(k_eps, (n, *self.event_shape), dtype)
        scale = jnp.exp(self.log_scales[...].astype(dtype))[comp]
        return self.means[...].astype(dtype)[comp] + temperature * scale * eps

    def get_config(self):
        return self._config(components=self.components, init_spread=self.init_spread)


class StudentT(Distribution):
    r"""Independent Student-t per element: heavy tails for data with outliers.

    ``log p(z) = sum_i [lgamma((v+1)/2) - lgamma(v/2) - log(v pi)/2 - log s_i
    - (v+1)/2 log(1 + u_i^2 / v)]``, ``u = (z - loc) / s``; one ``df = v`` shared by all
    elements, learnable (``learn_df=True``, kept positive as ``exp(log_df)``) or fixed.
    Sampling is reparameterised: ``t = eps sqrt(v / (2 g))``, ``eps ~ N(0, 1)``,
    ``g ~ Gamma(v/2)`` (JAX differentiates the gamma draw), so reverse-KL training reaches
    ``df`` too. Tails fall like ``|z|^-(v+1)``; ``v -> inf`` is the Gaussian.

    Example:
        >>> import jax, invnet
        >>> base = invnet.StudentT(2, df=4.0)
        >>> base.sample(jax.random.key(0), 3).shape
        (3, 2)
    """

    def __init__(self, event_shape, *, df: float = 5.0, learn_df: bool = True,
                 param_dtype=jnp.float32):  # fmt: skip
        self.event_shape = _event_shape("StudentT", event_shape)
        self.param_dtype = _param_dtype("StudentT", param_dtype)
        if not (isinstance(df, int | float) and math.isfinite(df) and df > 0):
            raise ValueError(f"StudentT: df must be a finite number > 0, got {df!r}")
        self.df, self.learn_df = float(df), bool(learn_df)
        self.loc = nnx.Param(jnp.zeros(self.event_shape, self.param_dtype))
        self.log_scale = nnx.Param(jnp.zeros(self.event_shape, self.param_dtype))
        kind = nnx.Param if learn_df else Buffer
        self.log_df = kind(jnp.asarray(math.log(df), self.param_dtype))

    def _log_prob(self, z, cond):
        dt = z.dtype
        v = jnp.exp(self.log_df[...].astype(dt))
        s = self.log_scale[...].astype(dt)
        u = (z - self.loc[...].astype(dt)) * jnp.exp(-s)
        const = gammaln(0.5 * (v + 1)) - gammaln(0.5 * v) - 0.5 * jnp.log(v * math.pi)
        return self._sum_event(const - s - 0.5 * (v + 1) * jnp.log1p(u * u / v))

    def _sample(self, key, n, cond, dtype, temperature):
        k_eps, k_gamma = jax.random.split(key)
        v = jnp.exp(self.log_df[...].astype(dtype))
        shape = (n, *self.event_shape)
        eps = jax.random.normal(k_eps, shape, dtype)
        g = jax.random.gamma(k_gamma, 0.5 * v, shape, dtype)
        t = eps * jnp.sqrt(0.5 * v / g)
        scale = jnp.exp(self.log_scale[...].astype(dtype))
        return self.loc[...].astype(dtype) + temperature * scale * t

    def get_config(self):
        return self._config(df=self.df, learn_df=self.learn_df)


class ClassConditionalGaussian(Distribution):
    r"""One learnable mean per class, shared fixed scale: ``p(z | c) = N(mu_c, sigma^2 I)``.

    The base of IB-INN-style invertible classifiers: train a flow on ``(x, one_hot(c))``,
    then ``log p(c | x) = log_softmax_c log p_Z(f(x) | c)`` (from `log_prob_per_class`,
    equal class priors). ``cond`` is an integer label per sample (shape = batch shape) or a
    one-hot (or soft) row of width ``num_classes`` (``cond_dim``; the form `invnet.fit`
    passes); ``cond=None`` gives the marginal ``log (1/K) sum_c p(z | c)``. Means start at
    ``init_spread * N(0, I)`` draws.

    Example:
        >>> import jax, jax.numpy as jnp, invnet
        >>> from flax import nnx
        >>> base = invnet.ClassConditionalGaussian(2, num_classes=3, rngs=nnx.Rngs(0))
        >>> z = base.sample(jax.random.key(0), 4, cond=jnp.array([0, 1, 2, 0]))
        >>> base.log_prob(z, cond=jax.nn.one_hot(jnp.array([0, 1, 2, 0]), 3)).shape
        (4,)
    """

    def __init__(self, event_shape, num_classes: int, *, scale: float = 1.0,
                 init_spread: float = 1.0, param_dtype=jnp.float32, rngs: nnx.Rngs):  # fmt: skip
        self.event_shape = _event_shape("ClassConditionalGaussian", event_shape)
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(
                "ClassConditionalGaussian: num_classes must be an integer >= 1, got "
                f"{num_classes!r}"
            )
        if not (isinstance(scale, int | float) and math.isfinite(scale) and scale > 0):
            raise ValueError(f"ClassConditionalGaussian: scale must be > 0, got {scale!r}")
        self.param_dtype = _param_dtype("ClassConditionalGaussian", param_dtype)
        self.num_classes, self.cond_dim = num_classes, num_classes
        self.scale, self.init_spread = float(scale), float(init_spread)
        shape = (num_classes, *self.event_shape)
        self.means = nnx.Param(
            init_spread * jax.random.normal(rngs.params(), shape, self.param_dtype)
        )

    def _mean_for(self, cond, batch: tuple[int, ...], dt) -> jax.Array:
        cond = jnp.asarray(cond)
        means = self.means[...].astype(dt)
        if jnp.issubdtype(cond.dtype, jnp.integer):
            return means[jnp.broadcast_to(cond, batch)]
        if cond.shape[-1:] != (self.num_classes,):
            raise ValueError(
                f"ClassConditionalGaussian: cond must be integer labels or one-hot rows of width "
                f"{self.num_classes}, got {cond.dtype} {cond.shape}"
            )
        weights = jnp.broadcast_to(cond.astype(dt), (*batch, self.num_classes))
        return jnp.tensordot(weights, means, axes=1)

    def log_prob_per_class(self, z: jax.Array) -> jax.Array:
        """``log p(z | c)`` for every class: shape ``(*batch, num_classes)``."""
        dt, k = z.dtype, len(self.event_shape)
        zk = jnp.expand_dims(z, z.ndim - k)
        log_s = jnp.asarray(math.log(self.scale), dt)
        return self._sum_event(_normal_terms(zk, self.means[...].astype(dt), log_s))

    def _log_prob(self, z, cond):
        if cond is None:
            return logsumexp(self.log_prob_per_class(z), axis=-1) - math.log(self.num_classes)
        batch = z.shape[: z.ndim - len(self.event_shape)]
        log_s = jnp.asarray(math.log(self.scale), z.dtype)
        return self._sum_event(_normal_terms(z, self._mean_for(cond, batch, z.dtype), log_s))

    def _sample(self, key, n, cond, dtype, temperature):
        k_class, k_eps = jax.random.split(key)
        if cond is None:
            cond = jax.random.randint(k_class, (n,), 0, self.num_classes)
        mean = self._mean_for(cond, (n,), dtype)
        eps = jax.random.normal(k_eps, (n, *self.event_shape), dtype)
        return mean + (temperature * self.scale) * eps

    def get_config(self):
        return self._config(num_classes=self.num_classes, scale=self.scale,
                            init_spread=self.init_spread)  # fmt: skip


class Uniform(Distribution):
    r"""The uniform distribution on the box ``[low, high]`` (fixed, not trained).

    ``log p(z) = -sum_i log(high_i - low_i)`` inside the box, ``-inf`` outside. Use it
    with a flow whose latent is bounded (e.g. ending in `invnet.Sigmoid` for ``[0, 1]``).
    ``low``/``high``: numbers or arrays broadcastable to the event shape, ``low < high``.

    Example:
        >>> import jax, jax.numpy as jnp, invnet
        >>> base = invnet.Uniform(2, low=0.0, high=2.0)
        >>> base.log_prob(jnp.array([[1.0, 1.0], [3.0, 1.0]])).tolist()
        [-1.3862943649291992, -inf]
    """

    tempered = False

    def __init__(self, event_shape, *, low=-1.0, high=1.0, param_dtype=jnp.float32):
        self.event_shape = _event_shape("Uniform", event_shape)
        self.param_dtype = _param_dtype("Uniform", param_dtype)
        lo = np.broadcast_to(np.asarray(low, np.float64), self.event_shape)
        hi = np.broadcast_to(np.asarray(high, np.float64), self.event_shape)
        if not (np.all(np.isfinite(lo)) and np.all(np.isfinite(hi)) and np.all(lo < hi)):
            raise ValueError("Uniform: low and high must be finite with low < high everywhere")
        self.low = Buffer(jnp.asarray(lo, self.param_dtype))
        self.high = Buffer(jnp.asarray(hi, self.param_dtype))

    def _log_prob(self, z, cond):
        dt = z.dtype
        lo, hi = self.low[...].astype(dt), self.high[...].astype(dt)
        inside = self._sum_event(((z < lo) | (z > hi)).astype(jnp.int32)) == 0
        log_volume = jnp.sum(jnp.log(hi - lo))
        return jnp.where(inside, -log_volume, -jnp.inf).astype(dt)

    def _sample(self, key, n, cond, dtype, temperature):
        if isinstance(temperature, int | float) and temperature != 1.0:
            raise ValueError("Uniform: temperature has no meaning for a uniform base; use 1.0")
        lo, hi = self.low[...].astype(dtype), self.high[...].astype(dtype)
        return jax.random.uniform(key, (n, *self.event_shape), dtype, lo, hi)

    def get_config(self):
        return self._config()
