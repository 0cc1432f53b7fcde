"""Coupling blocks on channels-last images, with a convolutional conditioner (Glow)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from invnet import splitmm
from invnet.core import Bijector, Shape, check_precision
from invnet.layers.coupling import ACTIVATIONS, dense_min_values
from invnet.layers.transformers import Additive, Affine, Transformed

__all__ = ["ConvAffineCoupling", "ConvAdditiveCoupling", "ConvNet"]


def _check_width(name: str, hidden) -> int:
    """The ConvNet's one width (its three convolutions share it) as an int >= 1."""
    if isinstance(hidden, bool) or not isinstance(hidden, int | np.integer) or hidden < 1:
        hint = ""
        if isinstance(hidden, list | tuple):
            hint = (
                " (one number: the conditioner is Glow's 3x3 -> 1x1 -> 3x3 ConvNet, whose "
                "convolutions all have this many channels; for another network pass "
                "conditioner=)"
            )
        raise ValueError(
            f"{name}: hidden must be an integer >= 1, the conditioner's channels, e.g. "
            f"hidden=64; got {hidden!r}{hint}"
        )
    return int(hidden)


class _Conv(nnx.Module):
    """A 'SAME' 2-D convolution whose parameters are cast to the input's dtype."""

    def __init__(self, c_in, c_out, size, *, zero, param_dtype, rngs):
        shape = (size, size, c_in, c_out)
        if zero:
            kernel = jnp.zeros(shape, param_dtype)
        else:
            kernel = nnx.initializers.lecun_normal()(rngs.params(), shape, param_dtype)
        self.kernel = nnx.Param(kernel)
        self.bias = nnx.Param(jnp.zeros((c_out,), param_dtype))

    def __call__(self, h):
        kernel = self.kernel[...].astype(h.dtype)
        if kernel.shape[:2] == (1, 1):
            # a 1x1 convolution is a product over the channel axis; as a matmul its kernel
            # gradient is one GEMM (XLA's CPU backward-filter convolution is ~7x slower)
            out = splitmm.scoped_matmul(h, kernel.reshape(kernel.shape[2:]))
            return out + self.bias[...].astype(h.dtype)
        lead = h.shape[:-3]
        flat = h.reshape(-1, *h.shape[-3:])
        out = splitmm.scoped_conv(  # follows the enclosing layer's precision
            flat,
            kernel,
            window_strides=(1, 1),
            padding="SAME",
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        out = out + self.bias[...].astype(h.dtype)
        return out.reshape(*lead, *out.shape[-3:])


class ConvNet(nnx.Module):
    """Glow's conditioner: 3x3 conv -> act -> 1x1 conv -> act -> 3x3 conv (starts at zero).

    Maps ``(..., H, W, in_channels)`` to ``(..., H, W, out_channels)``, 'SAME' padding, any
    number of batch axes. It need not be invertible: a coupling block only reads the scale
    and shift it computes. The last convolution is zero, so the block starts as identity.
    """

    def __init__(
        self,
        in_channels: int,
        hidden: int,
        out_channels: int,
        *,
        kernel_size: int = 3,
        activation: str = "relu",
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        if activation not in ACTIVATIONS:
            raise ValueError(f"ConvNet: activation must be one of {sorted(ACTIVATIONS)}")
        if not isinstance(kernel_size, int | np.integer) or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(
                f"ConvNet: kernel_size must be a positive odd integer, got {kernel_size!r}"
            )
        self.activation = activation
        k, dt = int(kernel_size), param_dtype
        self.first = _Conv(in_channels, hidden, k, zero=False, param_dtype=dt, rngs=rngs)
        self.middle = _Conv(hidden, hidden, 1, zero=False, param_dtype=dt, rngs=rngs)
        self.last = _Conv(hidden, out_channels, k, zero=True, param_dtype=dt, rngs=rngs)

    def __call__(self, h: jax.Array) -> jax.Array:
        act = ACTIVATIONS[self.activation]
        return self.last(act(self.middle(act(self.first(h)))))


class _ConvCoupling(Transformed, Bijector):
    """Split the channels ``x = (x_a, x_b)`` (first ``C//2`` / the rest); transform ``x_b``
    given ``x_a`` (and a vector condition, broadcast to every pixel) with the transformer
    (`invnet.layers.transformers.Transformed`)."""

    event_ndim = 3
    _n_params = 1

    def __init__(
        self,
        channels,
        *,
        hidden,
        cond_dim,
        conditioner,
        kernel_size,
        activation,
        param_dtype,
        precision,
        rngs,
    ):
        name = type(self).__name__
        if not isinstance(channels, int | np.integer) or channels < 2:
            raise ValueError(
                f"{name}: channels must be an integer >= 2 (one part of the channels "
                f"conditions the other), got {channels!r}; squeeze the image first"
            )
        if not isinstance(cond_dim, int | np.integer) or cond_dim < 0:
            raise ValueError(f"{name}: cond_dim must be an integer >= 0, got {cond_dim!r}")
        self.channels = int(channels)
        self.split = self.channels // 2
        self.cond_dim = int(cond_dim)
        self.hidden = _check_width(name, hidden)
        self.kernel_size = int(kernel_size)
        self.activation = activation
        self.param_dtype = jnp.dtype(param_dtype)
        self.precision = check_precision(precision)
        self.custom_conditioner = conditioner is not None
        if conditioner is None:
            conditioner = ConvNet(
                self.split + self.cond_dim,
                self.hidden,
                self._n_params * (self.channels - self.split),
                kernel_size=self.kernel_size,
                activation=activation,
                param_dtype=param_dtype,
                rngs=rngs,
            )
        self.conditioner = conditioner

    def event_pattern(self) -> Shape:
        return (None, None, self.channels)

    @classmethod
    def min_stored_values(cls, config: dict[str, Any]) -> int:
        """The ConvNet conditioner's kernels at least (what `invnet.load` checks a file's
        arrays against before building)."""
        split = int(config["channels"]) // 2
        hidden = int(config["hidden"])
        return dense_min_values([split + int(config.get("cond_dim", 0)), hidden, hidden, 1])

    def _config(self) -> dict[str, Any]:
        if self.custom_conditioner:
            raise ValueError(
                f"{type(self).__name__} with a user conditioner cannot be saved by architecture; "
                "save its parameters with nnx.state(model) and rebuild it with your code"
            )
        return {
            "channels": self.channels,
            "hidden": self.hidden,
            "cond_dim": self.cond_dim,
            "kernel_size": self.kernel_size,
            "activation": self.activation,
            "param_dtype": self.param_dtype.name,
            "precision": self.precision,
        }

    def _split(self, x):
        return x[..., : self.split], x[..., self.split :]

    def _join(self, x_a, x_b):
        return jnp.concatenate([x_a, x_b], axis=-1)

    def _sum_changed(self, log_det):
        return self._sum_event(log_det)

    def _conditioner_out(self, x_a, cond):
        h = x_a
        if cond is not None:  # the condition is seen at every pixel, as extra channels
            cond = jnp.broadcast_to(cond[..., None, None, :], (*x_a.shape[:-1], self.cond_dim))
            h = jnp.concatenate([x_a, cond], axis=-1)
        out = self.conditioner(h)
        expected = (*x_a.shape[:-1], self._n_params * (self.channels - self.split))
        if tuple(out.shape) != expected:
            raise ValueError(
                f"{type(self).__name__}: conditioner returned shape {tuple(out.shape)}, expected "
                f"{expected} ({self._n_params} x {self.channels - self.split} channels per pixel)"
            )
        return out.astype(x_a.dtype)


class ConvAffineCoupling(_ConvCoupling):
    r"""Affine coupling block on images (Glow, RealNVP), optionally conditional.

    Split the channels ``x = (x_a, x_b)``: the first ``C // 2`` pass through. With
    ``(s_raw, t) = NN(x_a[, cond])`` computed per pixel by a convolutional network:

    * Map: ``y_a = x_a``, ``y_b = x_b * exp(s) + t``, ``s = clamp * tanh(s_raw / clamp)``.
    * Log-det: ``sum(s)`` over pixels and channels, O(H W C) once the conditioner has run.
    * Inverse: ``x_b = (y_b - t) * exp(-s)`` with the same ``NN(y_a)``: the forward's cost.
    * Invertible for every parameter value; the soft clamp bounds each scale to
      ``exp(+-clamp)`` (error amplification at most ``exp(2*clamp)``, no NaNs from huge
      scales).
    * Conditioner (default `ConvNet`): 3x3 conv (``hidden`` channels) -> act -> 1x1 conv ->
      act -> 3x3 conv, 'SAME' padding; the last conv starts at zero, so the block starts
      as the identity. ``cond_dim > 0``: a vector ``cond`` (e.g. a class one-hot) is
      broadcast to every pixel and concatenated to ``x_a`` as extra channels.
    * ``conditioner``: any module mapping ``(..., H, W, C//2 + cond_dim)`` to
      ``(..., H, W, 2 * (C - C//2))`` (log-scale channels first, then shift).

    Reference: Kingma & Dhariwal, "Glow", NeurIPS 2018; Ardizzone et al., "Guided image
    generation with conditional invertible neural networks", 2019.

    Example:
        >>> import jax.numpy as jnp, invnet
        >>> from flax import nnx
        >>> block = invnet.ConvAffineCoupling(4, hidden=8, rngs=nnx.Rngs(0))
        >>> x = jnp.ones((2, 8, 8, 4))
        >>> y, log_det = block.forward(x)          # identity at init
        >>> bool(jnp.allclose(y, x)), log_det.shape
        (True, (2,))
    """

    _n_params = 2

    def __init__(
        self,
        channels: int,
        *,
        hidden: int = 64,
        cond_dim: int = 0,
        conditioner: nnx.Module | None = None,
        clamp: float = 2.0,
        kernel_size: int = 3,
        activation: str = "relu",
        param_dtype: Any = jnp.float32,
        precision: str = "highest",
        rngs: nnx.Rngs,
    ):
        if not (clamp > 0 and np.isfinite(clamp)):
            raise ValueError(
                f"ConvAffineCoupling: clamp must be a positive finite number, got {clamp}"
            )
        self.clamp = float(clamp)
        super().__init__(
            channels,
            hidden=hidden,
            cond_dim=cond_dim,
            conditioner=conditioner,
            kernel_size=kernel_size,
            activation=activation,
            param_dtype=param_dtype,
            precision=precision,
            rngs=rngs,
        )

    def get_config(self) -> dict[str, Any]:
        return {**self._config(), "clamp": self.clamp}

    @property
    def transformer(self) -> Affine:
        return Affine(self.clamp)


class ConvAdditiveCoupling(_ConvCoupling):
    r"""Additive coupling block on images (NICE / Glow's additive variant): volume preserving.

    * Map: ``y_a = x_a`` (the first ``C // 2`` channels), ``y_b = x_b + t``,
      ``t = NN(x_a[, cond])`` per pixel (the convolutional `ConvNet` by default).
    * Log-det: 0 (unit triangular Jacobian). Inverse: ``x_b = y_b - NN(y_a)``, the
      forward's cost, no amplification of errors beyond the conditioner's rounding.
    * Init: the conditioner's last conv is zero (identity at init). ``cond_dim`` and
      ``conditioner`` as in `ConvAffineCoupling` (a user conditioner returns
      ``C - C//2`` channels).

    Reference: Dinh, Krueger & Bengio, "NICE", ICLR 2015 workshop; Kingma & Dhariwal,
    "Glow", NeurIPS 2018.

    Example:
        >>> import jax.numpy as jnp, invnet
        >>> from flax import nnx
        >>> block = invnet.ConvAdditiveCoupling(2, hidden=8, rngs=nnx.Rngs(0))
        >>> y, log_det = block.forward(jnp.ones((4, 4, 2)))
        >>> y.shape, float(log_det)
        ((4, 4, 2), 0.0)
    """

    _n_params = 1

    def __init__(
        self,
        channels: int,
        *,
        hidden: int = 64,
        cond_dim: int = 0,
        conditioner: nnx.Module | None = None,
        kernel_size: int = 3,
        activation: str = "relu",
        param_dtype: Any = jnp.float32,
        precision: str = "highest",
        rngs: nnx.Rngs,
    ):
        super().__init__(
            channels,
            hidden=hidden,
            cond_dim=cond_dim,
            conditioner=conditioner,
            kernel_size=kernel_size,
            activation=activation,
            param_dtype=param_dtype,
            precision=precision,
            rngs=rngs,
        )

    def get_config(self) -> dict[str, Any]:
        return self._config()

    def error_bound(self) -> tuple[float, str]:
        return 1.0, "volume preserving"

    transformer = Additive()
