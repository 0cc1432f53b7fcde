"""Normalisation layers."""

from __future__ import annotations

import math
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.errors import TraceContextError

from invnet.core import Bijector, Buffer, data_direction, nodes

__all__ = ["ActNorm", "data_init"]


class ActNorm(Bijector):
    r"""Per-feature affine map with data-dependent initialisation (GLOW's actnorm).

    * Map: ``y = (x + bias) * exp(log_scale)``, per feature of the last axis. With
      ``event_ndim=3`` the event is a channels-last image ``(H, W, C)`` and ``dim = C``:
      one bias and scale per channel, shared by every pixel.
    * Log-det: ``sum(log_scale)`` times the number of pixels (1 for vectors), O(D), the
      same for every sample.
    * Inverse: ``x = y * exp(-log_scale) - bias``.
    * Init: ``bias = 0, log_scale = 0`` (identity) until the layer first sees data. The
      first ``forward`` call made eagerly or under ``nnx.jit`` on an uninitialised layer sets
      ``bias = -mean(x)`` and ``log_scale = -log(std(x) + eps)`` over all batch axes, so
      that batch comes out with zero mean and unit variance, and marks the layer
      initialised; later calls leave the parameters to the optimiser. Under a pure
      ``jax.jit`` / ``jax.grad`` of ``nnx.merge`` the update cannot be kept (each call then
      standardises with its own batch statistics, and the layer's parameters get no
      gradient): initialise first (`invnet.data_init(model, x)` or one eager
      ``model.forward(x)``; `invnet.fit` does this for you). A model's ``inverse`` never
      initialises. Inside an `invnet.Inverse` the data reach the layer's ``inverse``: the
      model's first ``forward`` then sets the parameters so that what comes out of it is
      standardised. A batch of one sample (std 0) keeps ``log_scale`` finite through ``eps``.
      Samples holding NaN or inf are left out of the statistics (with a warning that says
      how many, when called eagerly); a batch with no finite sample is refused.

    Reference: Kingma & Dhariwal, "Glow", NeurIPS 2018.

    Example:
        >>> import jax, jax.numpy as jnp, invnet
        >>> norm = invnet.ActNorm(2)
        >>> x = 3.0 + 2.0 * jax.random.normal(jax.random.key(0), (1000, 2))
        >>> y, _ = norm.forward(x)                       # data-dependent init
        >>> [round(float(v), 3) for v in y.std(axis=0)]
        [1.0, 1.0]
    """

    def __init__(
        self,
        dim: int,
        *,
        event_ndim: int = 1,
        eps: float = 1e-6,
        param_dtype: Any = jnp.float32,
    ):
        if not isinstance(dim, int | np.integer) or dim < 1:
            raise ValueError(f"ActNorm: dim must be a positive integer, got {dim!r}")
        if not isinstance(event_ndim, int | np.integer) or event_ndim < 1:
            raise ValueError(f"ActNorm: event_ndim must be a positive integer, got {event_ndim!r}")
        self.dim = int(dim)
        self.event_ndim = int(event_ndim)
        self.eps = float(eps)
        self.param_dtype = jnp.dtype(param_dtype)
        self.bias = nnx.Param(jnp.zeros((dim,), self.param_dtype))
        self.log_scale = nnx.Param(jnp.zeros((dim,), self.param_dtype))
        self.initialized = Buffer(jnp.asarray(False))

    @classmethod
    def min_stored_values(cls, config: dict[str, Any]) -> int:
        """``bias`` and ``log_scale`` (what `invnet.load` checks before building)."""
        return 2 * int(config["dim"])

    def get_config(self) -> dict[str, Any]:
        return {
            "dim": self.dim,
            "event_ndim": self.event_ndim,
            "eps": self.eps,
            "param_dtype": self.param_dtype.name,
        }

    def event_pattern(self):
        return (None,) * (self.event_ndim - 1) + (self.dim,)

    def _log_det(self, log_scale, x):
        pixels = math.prod(x.shape[x.ndim - self.event_ndim : -1])
        return jnp.broadcast_to(pixels * jnp.sum(log_scale), self.batch_shape(x))

    def data_init(self, x: jax.Array) -> None:
        """Set bias and log-scale from a batch so it comes out standardised (in place)."""
        x = self._check_input(x, "x")
        self._init_from(x, force=True)

    def _init_from(self, x, force=False, inverse=False):
        """Data-dependent values where the layer is uninitialised; written back if possible.

        ``x`` is the batch that reaches the layer: its input, or with ``inverse=True`` the
        ``y`` its inverse receives (inside an `invnet.Inverse`), which then comes out
        standardised. Returns the ``(bias, log_scale)`` this call must use. Under a
        transformation that cannot write the layer's variables (e.g. ``jax.grad`` of an
        ``nnx.merge`` made in an outer trace) the values are used for this call only and the
        layer stays as it was.
        """
        dt = self.bias[...].dtype  # the stored dtype (param_dtype, unless cast, as verify's
        # float64 re-run casts it)

        def fresh():
            mean, std = self._finite_stats(x)
            if inverse:  # x = y * exp(-log_scale) - bias = (y - mean) / std
                return (mean / std).astype(dt), jnp.log(std).astype(dt)
            # y = (x + bias) * exp(log_scale) = (x - mean) / std
            return (-mean).astype(dt), (-jnp.log(std)).astype(dt)

        done = False if force else self.initialized[...]
        if isinstance(done, jax.core.Tracer):
            # the flag is only known when the compiled step runs (e.g. a jitted training
            # step that passes the model's state in): a conditional runs the batch
            # statistics only while the layer is uninitialised, not on every step
            stored = (self.bias[...], self.log_scale[...])

            def fresh_as_stored():
                return tuple(v.astype(s.dtype) for v, s in zip(fresh(), stored, strict=True))

            bias, log_scale = jax.lax.cond(done, lambda: stored, fresh_as_stored)
        elif bool(done):
            bias, log_scale = self.bias[...], self.log_scale[...]
        else:
            bias, log_scale = fresh()
        try:
            self.bias[...] = bias
            self.log_scale[...] = log_scale
            self.initialized[...] = jnp.asarray(True)
        except TraceContextError:
            pass
        return bias, log_scale

    def _finite_stats(self, x):
        """Per-feature mean and ``std + eps`` over the samples of ``x`` whose values are all
        finite: one NaN or inf row would otherwise make every parameter NaN.

        Called eagerly (concrete ``x``), it warns with the number of samples ignored and
        refuses a batch with no finite sample. Inside a trace nothing can be said: a batch
        with no finite sample gives the identity (bias 0, log-scale 0).
        """
        batch = x.shape[: x.ndim - self.event_ndim]
        event_axes = tuple(range(len(batch), x.ndim))
        sample_ok = jnp.all(jnp.isfinite(x), axis=event_axes)
        if not isinstance(x, jax.core.Tracer):
            _report_nonfinite_samples(np.asarray(sample_ok))
        rows = jnp.broadcast_to(
            sample_ok.reshape(batch + (1,) * (self.event_ndim - 1)), x.shape[:-1]
        ).reshape(-1, 1)
        flat = jnp.where(rows, x.reshape(-1, self.dim), 0.0)
        count = jnp.sum(rows).astype(x.dtype)
        safe = jnp.maximum(count, 1.0)
        mean = jnp.sum(flat, axis=0) / safe
        var = jnp.sum(jnp.where(rows, (flat - mean) ** 2, 0.0), axis=0) / safe
        std = jnp.where(count > 0, jnp.sqrt(var), 1.0 - self.eps) + self.eps
        return mean, std

    def error_bound(self) -> tuple[float, str]:
        log_scale = np.asarray(self.log_scale[...], np.float64)
        return float(np.exp(log_scale.max() - log_scale.min())), "max/min scale"

    def not_ready(self) -> str | None:
        flag = self.initialized[...]
        if isinstance(flag, jax.core.Tracer) or bool(flag):
            return None
        return (
            "an ActNorm has not seen data yet; its first forward would set its parameters. "
            "Run invnet.data_init(model, x) (or one eager forward) first"
        )

    def reset_data_init(self) -> None:
        self.initialized[...] = jnp.asarray(False)

    def mark_ready(self) -> None:
        self.initialized[...] = jnp.asarray(True)

    def _needs_init(self) -> bool:
        flag = self.initialized[...]
        if isinstance(flag, jax.core.Tracer):
            return True  # decided inside the trace by jnp.where
        return not bool(flag)

    def _params_for(self, data, inverse):
        """The ``(bias, log_scale)`` for this call: initialised from ``data`` first when the
        layer has not seen data and this call runs in the direction data flows."""
        if self._needs_init() and data_direction(inverse):
            return self._init_from(jax.lax.stop_gradient(data), inverse=inverse)
        return self.bias[...], self.log_scale[...]

    def _forward(self, x, cond):
        bias, log_scale = self._params_for(x, inverse=False)
        log_scale = log_scale.astype(x.dtype)
        y = (x + bias.astype(x.dtype)) * jnp.exp(log_scale)
        return y, self._log_det(log_scale, x)

    def _inverse(self, y, cond):
        bias, log_scale = self._params_for(y, inverse=True)
        log_scale = log_scale.astype(y.dtype)
        x = y * jnp.exp(-log_scale) - bias.astype(y.dtype)
        return x, -self._log_det(log_scale, y)


def _report_nonfinite_samples(sample_ok: np.ndarray) -> None:
    """Warn how many samples the data-dependent init ignores; refuse when none is left."""
    bad, total = int(sample_ok.size - sample_ok.sum()), int(sample_ok.size)
    if bad == 0:
        return
    if bad == total:
        raise ValueError(
            f"ActNorm: cannot initialise from data: all {total} samples of the batch that "
            "reaches it hold NaN or inf. Check the data for non-finite values "
            "(e.g. x[np.isfinite(x).all(axis=tuple(range(1, x.ndim)))]) and pass finite rows"
        )
    where = np.flatnonzero(~sample_ok.reshape(-1))[:10].tolist()
    warnings.warn(
        f"ActNorm: data-dependent init ignored {bad} of {total} samples with NaN or inf "
        f"values (flat indices {where}{' ...' if bad > 10 else ''}); its bias and scale "
        f"come from the other {total - bad}. Remove or fix those rows in your data",
        RuntimeWarning,
        stacklevel=2,
    )


def data_init(model: Bijector, x: jax.Array, *, cond: jax.Array | None = None) -> Bijector:
    """(Re-)initialise every `ActNorm` in ``model`` from a batch ``x`` (in place).

    Runs ``model.forward`` eagerly once, so each ActNorm sees the activations that reach it
    and standardises them. Returns ``model``.
    """
    for node in nodes(model):
        node.reset_data_init()
    model.forward(x, cond=cond)
    return model
