"""Training objectives: what `invnet.fit` minimises.

An objective is a callable ``objective(model, batch, key) -> scalar loss``; ``batch`` is a
dict with ``"x"`` and, where the data has them, ``"y"`` and ``"cond"``; ``key`` is a fresh
PRNG key per step (used by `InverseProblem`'s MMD). Any callable with that signature works.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp

from invnet import _runtime
from invnet.core import wider_float
from invnet.flows import StandardNormal

__all__ = ["MaximumLikelihood", "Regression", "InverseProblem", "mmd", "sample_posterior"]


def density(model, x, cond):
    if hasattr(model, "log_prob"):  # a Flow with its own base distribution
        return model.log_prob(x, cond=cond)
    z, log_det = model.forward(x, cond=cond)
    return StandardNormal().log_prob(z) + log_det


@dataclass(frozen=True)
class MaximumLikelihood:
    r"""Negative log-likelihood in nats per sample: ``-mean_i log p(x_i | c_i)``.

    ``log p(x | c) = log N(f(x; c); 0, I) + log|det df/dx|`` (or the `invnet.Flow`'s own
    base). With ``cond`` in the batch this is conditional maximum likelihood (a cINN).
    """

    def __call__(self, model, batch, key=None):
        return -jnp.mean(density(model, batch["x"], batch.get("cond")))


@dataclass(frozen=True)
class Regression:
    r"""Supervised bijective regression ``x -> y`` of equal size: ``mean((f(x) - y)**2)``.

    The trained model inverts exactly: ``x = f^{-1}(y)``.
    """

    def __call__(self, model, batch, key=None):
        y_pred, _ = model.forward(batch["x"], cond=batch.get("cond"))
        y = batch["y"]
        dt = wider_float(y_pred.dtype, y.dtype)  # a float32 x with a float64 y: in float64
        return jnp.mean((y_pred.astype(dt) - y.astype(dt)) ** 2)


def mmd(a: jax.Array, b: jax.Array, scales=(0.05, 0.2, 0.9)) -> jax.Array:
    r"""Maximum mean discrepancy (squared, biased V-statistic) between samples ``a`` and ``b``.

    Inverse multiquadric kernels ``k(u, v) = sum_s s / (s + |u - v|^2)``, as in Ardizzone
    et al. (2019). Pairwise distances are formed by differences, not a matmul, so the value
    does not depend on the platform's matmul precision.
    """

    def kernel(u, v):
        d2 = jnp.sum((u[:, None, :] - v[None, :, :]) ** 2, axis=-1)
        return sum(s / (s + d2) for s in scales)

    return jnp.mean(kernel(a, a)) + jnp.mean(kernel(b, b)) - 2 * jnp.mean(kernel(a, b))


@dataclass(frozen=True)
class InverseProblem:
    r"""Learn ``x -> [y, z]``: ``y`` (the first ``y_dim`` outputs) supervised, ``z`` normal.

    Then ``x ~ p(x | y)`` is sampled by drawing ``z ~ N(0, I)`` and running the model
    backwards (`invnet.sample_posterior`).

    * ``z_loss="mle"`` (default): the negative log-likelihood of ``x`` under
      ``y_pred ~ N(y, y_sigma^2 I)``, ``z ~ N(0, I)``:
      ``|y_pred - y|^2 / (2 y_sigma^2) + |z|^2 / 2 - log|det df/dx| + const`` (nats).
    * ``z_loss="mmd"``: ``y_weight * mean((y_pred - y)^2) + z_weight * MMD([sg(y_pred), z],
      [y, eps])`` with ``eps ~ N(0, I)`` and ``sg`` the stop-gradient: the joint of the
      predicted ``y`` and ``z`` is pushed to ``p(y) N(0, I)``, which makes ``z``
      independent of ``y``.

    Reference: Ardizzone et al., "Analyzing Inverse Problems with Invertible Neural
    Networks", ICLR 2019.
    """

    y_dim: int
    z_loss: str = "mle"
    y_sigma: float = 0.1
    y_weight: float = 1.0
    z_weight: float = 1.0
    mmd_scales: tuple[float, ...] = (0.05, 0.2, 0.9)

    def __post_init__(self):
        if self.z_loss not in ("mle", "mmd"):
            raise ValueError(f"InverseProblem: z_loss must be 'mle' or 'mmd', got {self.z_loss!r}")
        if self.y_dim < 1:
            raise ValueError(f"InverseProblem: y_dim must be >= 1, got {self.y_dim}")

    def __call__(self, model, batch, key=None):
        x, y = batch["x"], batch["y"]
        if model.dim is not None and self.y_dim >= model.dim:
            raise ValueError(
                f"InverseProblem: y_dim={self.y_dim} leaves no latent z in a {model.dim}-dim "
                "model; use Regression for equal sizes"
            )
        if y.shape[-1] != self.y_dim:
            raise ValueError(f"InverseProblem: y has {y.shape[-1]} features, y_dim={self.y_dim}")
        out, log_det = model.forward(x, cond=batch.get("cond"))
        y_pred, z = out[..., : self.y_dim], out[..., self.y_dim :]
        dt = wider_float(out.dtype, y.dtype)  # the loss: in the wider of the output's and y's
        sq_err = (y_pred.astype(dt) - y.astype(dt)) ** 2
        if self.z_loss == "mle":
            s2 = self.y_sigma**2
            nll_y = jnp.sum(sq_err, -1) / (2 * s2) + 0.5 * self.y_dim * math.log(2 * math.pi * s2)
            nll = nll_y - StandardNormal().log_prob(z).astype(dt) - log_det.astype(dt)
            return jnp.mean(nll)
        eps = jax.random.normal(key, z.shape, z.dtype)
        joint = jnp.concatenate([jax.lax.stop_gradient(y_pred), z], axis=-1)
        target = jnp.concatenate([y.astype(z.dtype), eps], axis=-1)
        fit_y = jnp.mean(sq_err)
        z_fit = mmd(joint, target, self.mmd_scales).astype(dt)
        return self.y_weight * fit_y + self.z_weight * z_fit


def sample_posterior(model, y, key, *, n: int | None = None, temperature: float = 1.0, cond=None):
    r"""Sample ``x ~ p(x | y)`` from a model trained with `InverseProblem`.

    Draws ``z ~ N(0, temperature^2 I)`` and returns ``x = f^{-1}([y, z])``. ``y`` has shape
    ``(B, y_dim)`` (one sample per row), or ``(y_dim,)`` with ``n`` samples for that one ``y``.

    Example:
        >>> import jax, jax.numpy as jnp, invnet
        >>> from flax import nnx
        >>> model = invnet.Sequential(invnet.LULinear(3, rngs=nnx.Rngs(0)))
        >>> x = invnet.sample_posterior(model, jnp.array([1.0]), jax.random.key(0), n=4)
        >>> x.shape, bool(jnp.allclose(model(x)[:, 0], 1.0, atol=1e-5))
        ((4, 3), True)
    """
    y = y if isinstance(y, jax.Array) else jnp.asarray(y)
    if isinstance(key, int):
        key = jax.random.key(key)
    if n is not None:
        if y.ndim != 1:
            raise ValueError("sample_posterior: give n only with a single y of shape (y_dim,)")
        n = int(n)
    if model.dim is None or y.shape[-1] >= model.dim:
        raise ValueError(
            f"sample_posterior: y has {y.shape[-1]} features; the model must be larger "
            f"(dim={model.dim}) so that z has at least one"
        )
    return _posterior(model, y, key, temperature, cond, n=n)


@_runtime.compiled(precompute="inverse")
def _posterior(model, y, key, temperature, cond, *, n):
    """`sample_posterior` after its checks (compiled by `invnet._runtime`)."""
    if n is not None:
        y = jnp.broadcast_to(y, (n, y.shape[0]))
    dtype = y.dtype if jnp.issubdtype(y.dtype, jnp.floating) else jnp.float32
    y = y.astype(dtype)
    z = temperature * jax.random.normal(key, (*y.shape[:-1], model.dim - y.shape[-1]), dtype)
    return model.inverse(jnp.concatenate([y, z], axis=-1), cond=cond)[0]
