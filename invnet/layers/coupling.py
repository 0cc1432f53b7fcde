"""Coupling blocks (RealNVP / GLOW / NICE), optionally conditional (cINN)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from invnet import splitmm
from invnet.core import Bijector, check_precision, wider_float
from invnet.layers.permute import take_last
from invnet.layers.transformers import Additive, Affine, Transformed

__all__ = ["AffineCoupling", "AdditiveCoupling", "MLP"]

# the products follow the enclosing layer's precision, error-corrected modes included
DOT_DIMS = splitmm.scoped_dot_general
ACTIVATIONS = {"relu": jax.nn.relu, "gelu": jax.nn.gelu, "tanh": jnp.tanh, "silu": jax.nn.silu}


def promote_wider(args, /, *, dtype=None):
    """``promote_dtype`` for ``nnx.Linear``: cast ``(inputs, kernel, bias)`` to ``dtype``, or
    to the wider float dtype of the inputs and the kernel (see `wider_float`)."""
    present = [a for a in args if a is not None]
    dtype = wider_float(*(a.dtype for a in present)) if dtype is None else dtype
    return tuple(None if a is None else jnp.asarray(a, dtype) for a in args)


class MLP(nnx.Module):
    """The default conditioner: dense layers with an activation; the last layer starts at 0,
    the hidden biases uniform on ``+-1/sqrt(fan_in)`` (zero biases would kink every feature
    of a one-dimensional input at 0 alone, and 2-D couplings then train slowly).

    A conditioner need not be invertible: it only computes the scale and shift of a
    coupling block from the half that passes through unchanged (and the condition).
    """

    def __init__(
        self,
        in_dim: int,
        hidden: Sequence[int],
        out_dim: int,
        *,
        activation: str = "relu",
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        if activation not in ACTIVATIONS:
            raise ValueError(f"MLP: activation must be one of {sorted(ACTIVATIONS)}")
        sizes = [in_dim, *check_hidden("MLP", hidden)]
        self.activation = activation
        opts = dict(
            param_dtype=param_dtype, dot_general=DOT_DIMS, promote_dtype=promote_wider, rngs=rngs
        )
        self.hidden_layers = nnx.List(
            [nnx.Linear(a, b, bias_init=_fan_in_uniform(a), **opts)
             for a, b in zip(sizes[:-1], sizes[1:], strict=True)]
        )  # fmt: skip
        zeros = nnx.initializers.zeros_init()
        self.out = nnx.Linear(sizes[-1], out_dim, kernel_init=zeros, **opts)

    def __call__(self, h: jax.Array) -> jax.Array:
        act = ACTIVATIONS[self.activation]
        dtype = h.dtype
        for layer in self.hidden_layers:
            h = act(layer(h))  # computes in the wider of the input and parameter dtypes
        return self.out(h).astype(dtype)


def _fan_in_uniform(fan_in: int):
    """Biases uniform on ``[-1/sqrt(fan_in), 1/sqrt(fan_in)]`` (PyTorch's and equinox's
    default for dense layers)."""
    limit = float(1.0 / np.sqrt(max(int(fan_in), 1)))

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -limit, limit)

    return init


def check_hidden(name: str, hidden) -> tuple[int, ...]:
    """``hidden`` as a tuple of layer widths, each an integer >= 1, or a clear error."""
    if isinstance(hidden, int | np.integer) and not isinstance(hidden, bool):
        example = (
            f"hidden=({hidden},) for one hidden layer of {hidden} units"
            if hidden >= 1
            else "hidden=(64, 64), or hidden=() for no hidden layer"
        )
        raise TypeError(
            f"{name}: hidden is a list of hidden-layer widths, e.g. {example}; got the "
            f"number {hidden!r}"
        )
    try:
        widths = tuple(hidden)
    except TypeError:
        raise TypeError(
            f"{name}: hidden must be a list of hidden-layer widths such as (64, 64), got {hidden!r}"
        ) from None
    for w in widths:
        if isinstance(w, bool) or not isinstance(w, int | np.integer) or w < 1:
            raise ValueError(
                f"{name}: every hidden width must be an integer >= 1, got hidden={hidden!r}; "
                "use hidden=() for no hidden layer"
            )
    return tuple(int(w) for w in widths)


def dense_min_values(widths) -> int:
    """``sum(w_i * w_{i+1})``: the kernels of a dense stack of these widths hold at least
    this many values (negative widths count as 0: the constructor refuses them)."""
    widths = [max(0, int(w)) for w in widths]
    return sum(a * b for a, b in zip(widths[:-1], widths[1:], strict=True))


def _split_indices(dim: int, mask) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(indices passed through, indices transformed)."""
    if mask is None:
        half = dim // 2
        return tuple(range(half)), tuple(range(half, dim))
    m = np.asarray(mask, bool)
    if m.shape != (dim,):
        raise ValueError(f"coupling mask must have shape ({dim},), got {m.shape}")
    keep, change = np.flatnonzero(m), np.flatnonzero(~m)
    if keep.size == 0 or change.size == 0:
        raise ValueError("coupling mask must mark at least one feature True and one False")
    return tuple(int(i) for i in keep), tuple(int(i) for i in change)


class CouplingBase(Transformed, Bijector):
    """Vector couplings: split x into (x_a, x_b) (halves or a mask), ask the MLP conditioner
    for the raw parameters of x_b given x_a (and cond), apply the transformer to x_b
    (`invnet.layers.transformers.Transformed`)."""

    def __init__(
        self,
        dim: int,
        n_params: int,
        *,
        hidden,
        cond_dim,
        conditioner,
        mask,
        activation,
        param_dtype,
        precision,
        rngs,
    ):
        if not isinstance(dim, int | np.integer) or dim < 2:
            raise ValueError(
                f"{type(self).__name__}: dim must be an integer >= 2 (one half conditions the "
                f"other), got {dim!r}"
            )
        if cond_dim < 0:
            raise ValueError(f"{type(self).__name__}: cond_dim must be >= 0, got {cond_dim}")
        self.dim = int(dim)
        self.cond_dim = int(cond_dim)
        self.keep, self.change = _split_indices(self.dim, mask)
        self.contiguous = self.keep == tuple(range(len(self.keep)))
        self.order = tuple(int(i) for i in np.argsort(np.asarray(self.keep + self.change)))
        self.hidden = check_hidden(type(self).__name__, hidden)
        self.mask = None if mask is None else tuple(bool(v) for v in np.asarray(mask, bool))
        self.activation = activation
        self.param_dtype = jnp.dtype(param_dtype)
        self.precision = check_precision(precision)
        self.custom_conditioner = conditioner is not None
        out = n_params * len(self.change)
        if conditioner is None:
            conditioner = MLP(
                len(self.keep) + self.cond_dim,
                self.hidden,
                out,
                activation=activation,
                param_dtype=param_dtype,
                rngs=rngs,
            )
        self.conditioner = conditioner

    @classmethod
    def min_stored_values(cls, config: dict[str, Any]) -> int:
        """The MLP conditioner's kernels, ``x_a (+ cond) -> hidden... -> 1`` at least (what
        `invnet.load` checks a file's arrays against before building)."""
        dim, mask = int(config["dim"]), config.get("mask")
        keep = dim // 2 if mask is None else sum(bool(v) for v in mask)
        hidden = [int(h) for h in config.get("hidden", ())]
        return dense_min_values([keep + int(config.get("cond_dim", 0)), *hidden, 1])

    def _config(self) -> dict[str, Any]:
        if self.custom_conditioner:
            raise ValueError(
                f"{type(self).__name__} with a user conditioner cannot be saved by architecture; "
                "save its parameters with nnx.state(model) and rebuild it with your code"
            )
        return {
            "dim": self.dim,
            "hidden": list(self.hidden),
            "cond_dim": self.cond_dim,
            "mask": None if self.mask is None else list(self.mask),
            "activation": self.activation,
            "param_dtype": self.param_dtype.name,
            "precision": self.precision,
        }

    def _split(self, x):
        if self.contiguous:
            k = len(self.keep)
            return x[..., :k], x[..., k:]
        return take_last(x, np.asarray(self.keep)), take_last(x, np.asarray(self.change))

    def _join(self, x_a, x_b):
        joined = jnp.concatenate([x_a, x_b], axis=-1)
        return joined if self.contiguous else take_last(joined, np.asarray(self.order))

    def _sum_changed(self, log_det):
        return jnp.sum(log_det, axis=-1)

    def _conditioner_out(self, x_a, cond):
        h = x_a if cond is None else jnp.concatenate([x_a, cond], axis=-1)
        out = self.conditioner(h)
        expected = self._n_params * len(self.change)
        if out.shape[-1] != expected:
            raise ValueError(
                f"{type(self).__name__}: conditioner returned last axis {out.shape[-1]}, "
                f"expected {expected} ({self._n_params} x {len(self.change)} transformed features)"
            )
        return out.astype(x_a.dtype)


class AffineCoupling(CouplingBase):
    r"""Affine coupling block (RealNVP, GLOW), optionally conditional.

    Split ``x = (x_a, x_b)`` (first half / second half, or by ``mask``: True = passed
    through). With ``(s_raw, t) = NN(x_a[, cond])``:

    * Map: ``y_a = x_a``, ``y_b = x_b * exp(s) + t``, ``s = clamp * tanh(s_raw / clamp)``.
    * Log-det: ``sum(s)``, O(D) once the conditioner has run.
    * Inverse: ``x_b = (y_b - t) * exp(-s)`` with the same ``NN(y_a)`` (``y_a = x_a``):
      exactly the forward's cost.
    * Invertible for every parameter value; the soft clamp bounds each scale to
      ``exp(+-clamp)``, so the block's amplification of errors is at most ``exp(2*clamp)``.
    * Init: the conditioner's last layer is zero, so the block starts as the identity.
    * ``cond_dim > 0`` makes it a conditional block (cINN): ``cond`` is then required.
    * ``conditioner``: any module mapping ``(..., len(x_a) + cond_dim)`` to
      ``(..., 2 * len(x_b))`` (log-scale first, then shift); it need not be invertible.

    Reference: Dinh et al., "Density estimation using Real NVP", ICLR 2017; Ardizzone et
    al., "Guided image generation with conditional invertible neural networks", 2019.

    Example:
        >>> import jax.numpy as jnp, invnet
        >>> from flax import nnx
        >>> block = invnet.AffineCoupling(4, hidden=(16,), rngs=nnx.Rngs(0))
        >>> x = jnp.ones((3, 4))
        >>> y, log_det = block.forward(x)       # identity at init
        >>> bool(jnp.allclose(y, x)), log_det.shape
        (True, (3,))
    """

    _n_params = 2

    def __init__(
        self,
        dim: int,
        *,
        hidden: Sequence[int] = (64, 64),
        cond_dim: int = 0,
        conditioner: nnx.Module | None = None,
        clamp: float = 2.0,
        mask=None,
        activation: str = "relu",
        param_dtype: Any = jnp.float32,
        precision: str = "highest",
        rngs: nnx.Rngs,
    ):
        if not (clamp > 0 and np.isfinite(clamp)):
            raise ValueError(f"AffineCoupling: clamp must be a positive finite number, got {clamp}")
        self.clamp = float(clamp)
        super().__init__(
            dim,
            2,
            hidden=hidden,
            cond_dim=cond_dim,
            conditioner=conditioner,
            mask=mask,
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


class AdditiveCoupling(CouplingBase):
    r"""Additive coupling block (NICE): volume preserving, optionally conditional.

    * Map: ``y_a = x_a``, ``y_b = x_b + t``, ``t = NN(x_a[, cond])``.
    * Log-det: 0 (the Jacobian is unit triangular).
    * Inverse: ``x_b = y_b - NN(y_a)``: the forward's cost, no amplification of errors
      beyond the conditioner's rounding.
    * Init: the conditioner's last layer is zero (identity at init).

    Reference: Dinh, Krueger & Bengio, "NICE: Non-linear Independent Components
    Estimation", ICLR 2015 workshop.

    Example:
        >>> import jax.numpy as jnp, invnet
        >>> from flax import nnx
        >>> block = invnet.AdditiveCoupling(4, hidden=(16,), rngs=nnx.Rngs(0))
        >>> y, log_det = block.forward(jnp.ones(4))
        >>> float(log_det)
        0.0
    """

    _n_params = 1

    def __init__(
        self,
        dim: int,
        *,
        hidden: Sequence[int] = (64, 64),
        cond_dim: int = 0,
        conditioner: nnx.Module | None = None,
        mask=None,
        activation: str = "relu",
        param_dtype: Any = jnp.float32,
        precision: str = "highest",
        rngs: nnx.Rngs,
    ):
        super().__init__(
            dim,
            1,
            hidden=hidden,
            cond_dim=cond_dim,
            conditioner=conditioner,
            mask=mask,
            activation=activation,
            param_dtype=param_dtype,
            precision=precision,
            rngs=rngs,
        )

    def get_config(self) -> dict[str, Any]:
        return self._config()

    transformer = Additive()

    def error_bound(self) -> tuple[float, str]:
        return 1.0, "volume preserving"
