"""Masked autoregressive flows (MAF) with a MADE conditioner; their inverse is an IAF."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from invnet import splitmm
from invnet.core import Bijector, Buffer, check_precision, wider_float
from invnet.layers.coupling import ACTIVATIONS, check_hidden, dense_min_values
from invnet.layers.jacobi import CertifiedInverse, check_inverse_method
from invnet.layers.rq_spline import check_spline_config, conditioner_input
from invnet.layers.transformers import make_transformer

__all__ = ["MaskedAutoregressive", "MADE"]

TRANSFORMERS = ("affine", "spline")


class MaskedDense(nnx.Module):
    """``h @ (W * M) + b`` with a fixed 0/1 mask ``M`` (an `invnet.Buffer`) over ``W``."""

    def __init__(self, mask: np.ndarray, *, zero: bool, param_dtype, rngs: nnx.Rngs):
        shape = mask.shape
        init = nnx.initializers.zeros_init() if zero else nnx.initializers.lecun_normal()
        self.kernel = nnx.Param(init(rngs.params(), shape, param_dtype))
        self.bias = nnx.Param(jnp.zeros((shape[1],), param_dtype))
        self.mask = Buffer(jnp.asarray(mask, bool))

    def __call__(self, h: jax.Array) -> jax.Array:
        dt = wider_float(h.dtype, self.kernel[...].dtype)  # explicit: no implicit promotion
        weight = jnp.where(self.mask[...], self.kernel[...].astype(dt), 0.0)
        return splitmm.scoped_matmul(h.astype(dt), weight) + self.bias[...].astype(dt)


def made_degrees(dim: int, hidden: Sequence[int], cond_dim: int) -> list[np.ndarray]:
    """MADE degrees: inputs ``1..dim`` (condition inputs 0), hidden units cycling through
    ``1..dim-1`` (``0..dim-1`` when conditional, so the first feature sees the condition)."""
    degrees = [np.concatenate([np.arange(1, dim + 1), np.zeros(cond_dim, int)])]
    for width in hidden:
        if cond_dim > 0:
            degrees.append(np.arange(width) % dim)
        else:
            degrees.append(np.arange(width) % max(dim - 1, 1) + 1)
    return degrees


class MADE(nnx.Module):
    """Masked autoencoder conditioner (Germain et al. 2015): output block ``i`` (the
    ``n_params`` numbers of feature ``i``) depends only on features ``< i`` and on ``cond``.

    Returns shape ``(..., dim, n_params)``. The last layer starts at zero.
    """

    def __init__(
        self,
        dim: int,
        hidden: Sequence[int],
        n_params: int,
        *,
        cond_dim: int = 0,
        activation: str = "relu",
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        if activation not in ACTIVATIONS:
            raise ValueError(f"MADE: activation must be one of {sorted(ACTIVATIONS)}")
        self.activation, self.dim, self.n_params = activation, dim, n_params
        self.cond_dim, self.hidden = int(cond_dim), tuple(int(h) for h in hidden)
        *masks, out_mask = self.masks()
        dt = param_dtype
        self.hidden_layers = nnx.List(
            [MaskedDense(m, zero=False, param_dtype=dt, rngs=rngs) for m in masks]
        )
        self.out = MaskedDense(out_mask, zero=True, param_dtype=dt, rngs=rngs)

    def masks(self) -> list[np.ndarray]:
        """The 0/1 masks the MADE degrees give, input layer first (the layers hold these)."""
        degrees = made_degrees(self.dim, self.hidden, self.cond_dim)
        pairs = zip(degrees[:-1], degrees[1:], strict=True)
        masks = [d_out[None, :] >= d_in[:, None] for d_in, d_out in pairs]
        out_degrees = np.repeat(np.arange(1, self.dim + 1), self.n_params)  # feature-major
        return [*masks, out_degrees[None, :] > degrees[-1][:, None]]

    def __call__(self, x: jax.Array, cond: jax.Array | None = None) -> jax.Array:
        h = x if cond is None else jnp.concatenate([x, cond], axis=-1)
        act = ACTIVATIONS[self.activation]
        for layer in self.hidden_layers:
            h = act(layer(h))
        out = self.out(h).astype(x.dtype)
        return out.reshape(*out.shape[:-1], self.dim, self.n_params)


class MaskedAutoregressive(CertifiedInverse, Bijector):
    r"""Masked autoregressive flow block (MAF), affine or rational-quadratic spline.

    With a MADE conditioner, the parameters ``theta_i`` of feature ``i`` depend only on
    ``x_{<i}`` (and ``cond``): ``y_i = tau(x_i; theta_i(x_{<i}[, cond]))``, where ``tau`` is

    * ``transformer="affine"``: ``tau(x) = x exp(s) + t``, ``s = clamp tanh(s_raw / clamp)``
      (as in `AffineCoupling`; amplification at most ``exp(2 clamp)``);
    * ``transformer="spline"``: the monotone rational-quadratic spline of `SplineCoupling`
      (``bins >= 2``, ``bound``, linear tails; MADE sees ``x`` clipped to
      ``[-bound, bound]``, so tail points get no extrapolated, extreme splines).

    * Log-det: ``sum_i log tau'(x_i)``: the Jacobian is triangular. O(D) after the MADE pass.
    * Forward (x -> y): **one** MADE pass, all features at once.
    * Inverse (y -> x), ``inverse_method="sequential"`` (default): **D sequential MADE
      passes** (a ``jax.lax.fori_loop``): pass ``k`` recomputes ``theta`` from the current
      ``x`` and inverts ``tau``, which makes ``x_1..x_k`` exact; after ``D`` passes ``x`` is
      the exact inverse (to rounding), D times the forward's cost.
    * ``inverse_method="jacobi"``: the same passes, stopped per sample when the estimate
      stops changing (``tol``, 0: to the bit) or after ``max_sweeps`` (default ``None``: D,
      always exact); see `invnet.layers.jacobi`. A sample that hits a lower cap unconverged
      comes back as **NaN** (``invnet.verify`` counts and names it);
      ``inverse_with_certificate(y)`` returns ``(x, log_det, certificate)`` with the sweeps,
      last change, residual and converged flag of every sample.
    * IAF: ``invnet.Inverse(MaskedAutoregressive(...))`` is an inverse autoregressive flow:
      its forward costs D passes and its inverse one. In a `Flow` (forward = data -> latent),
      a MAF gives fast densities of data and slow sampling; an IAF the reverse (fast
      sampling and fast densities of its own samples). Choose the direction you need fast.
    * Init: the last MADE layer is zero, so the block starts as the identity.
    * Masks are fixed `invnet.Buffer` arrays; the weights are ``nnx.Param`` multiplied by
      them. Features are taken in their order: put a `Permute` between blocks.
    * ``cond_dim > 0``: condition inputs (degree 0) reach every output.

    Reference: Papamakarios, Pavlakou & Murray, "Masked Autoregressive Flow for Density
    Estimation", NeurIPS 2017; Germain et al., "MADE", ICML 2015; Kingma et al., "Improved
    Variational Inference with Inverse Autoregressive Flow", NeurIPS 2016; Durkan et al.,
    "Neural Spline Flows", NeurIPS 2019.

    Example:
        >>> import jax, jax.numpy as jnp, invnet
        >>> from flax import nnx
        >>> maf = invnet.MaskedAutoregressive(3, transformer="spline", hidden=(16,),
        ...                                   rngs=nnx.Rngs(0))
        >>> x = jax.random.normal(jax.random.key(0), (2, 3))
        >>> y, log_det = maf.forward(x)              # identity at init
        >>> bool(jnp.allclose(y, x, atol=1e-6)), log_det.shape
        (True, (2,))
        >>> iaf = invnet.Inverse(maf)                # fast inverse, D-pass forward
        >>> bool(jnp.allclose(iaf.inverse(iaf.forward(x)[0])[0], x, atol=1e-5))
        True
    """

    def __init__(
        self,
        dim: int,
        *,
        transformer: str = "affine",
        hidden: Sequence[int] = (64, 64),
        cond_dim: int = 0,
        bins: int = 8,
        bound: float = 3.0,
        clamp: float = 2.0,
        activation: str = "relu",
        inverse_method: str = "sequential",
        max_sweeps: int | None = None,
        tol: float = 0.0,
        param_dtype: Any = jnp.float32,
        precision: str = "highest",
        rngs: nnx.Rngs,
    ):
        if not isinstance(dim, int | np.integer) or dim < 1:
            raise ValueError(f"MaskedAutoregressive: dim must be a positive integer, got {dim!r}")
        if transformer not in TRANSFORMERS:
            raise ValueError(
                f"MaskedAutoregressive: transformer must be one of {TRANSFORMERS}, got "
                f"{transformer!r}"
            )
        if cond_dim < 0:
            raise ValueError(f"MaskedAutoregressive: cond_dim must be >= 0, got {cond_dim}")
        if not (clamp > 0 and np.isfinite(clamp)):
            raise ValueError(f"MaskedAutoregressive: clamp must be positive and finite: {clamp}")
        if transformer == "spline":
            check_spline_config("MaskedAutoregressive", bins, bound, 1e-3, 1e-3, 1e-3)
        self.dim, self.cond_dim, self.transformer = int(dim), int(cond_dim), transformer
        self.hidden = check_hidden("MaskedAutoregressive", hidden)
        self.bins, self.bound, self.clamp = int(bins), float(bound), float(clamp)
        self.activation = activation
        self.param_dtype = jnp.dtype(param_dtype)
        self.precision = check_precision(precision)
        check_inverse_method("MaskedAutoregressive", inverse_method, max_sweeps, tol)
        self.inverse_method, self.max_sweeps, self.tol = inverse_method, max_sweeps, float(tol)
        n_params = self.tau.n_params
        self.made = MADE(
            self.dim,
            self.hidden,
            n_params,
            cond_dim=self.cond_dim,
            activation=activation,
            param_dtype=param_dtype,
            rngs=rngs,
        )

    @classmethod
    def min_stored_values(cls, config: dict[str, Any]) -> int:
        """The MADE kernels ``dim (+ cond) -> hidden... -> dim`` at least (what `invnet.load`
        checks a file's arrays against before building)."""
        dim, hidden = int(config["dim"]), [int(h) for h in config.get("hidden", (64, 64))]
        return dense_min_values([dim + int(config.get("cond_dim", 0)), *hidden, dim])

    def check_buffers(self) -> None:
        """The MADE masks must be those its degrees give: another mask lets feature ``i``
        see ``x_i`` or later features, and the inverse and log-det are then wrong.
        `invnet.load` calls it."""
        layers = [*self.made.hidden_layers, self.made.out]
        for i, (layer, expected) in enumerate(zip(layers, self.made.masks(), strict=True)):
            if not np.array_equal(np.asarray(layer.mask[...]), expected):
                raise ValueError(
                    f"MaskedAutoregressive: the mask of MADE layer {i} is not the "
                    "autoregressive mask of its degrees"
                )

    def get_config(self) -> dict[str, Any]:
        return {
            "dim": self.dim,
            "transformer": self.transformer,
            "hidden": list(self.hidden),
            "cond_dim": self.cond_dim,
            "bins": self.bins,
            "bound": self.bound,
            "clamp": self.clamp,
            "activation": self.activation,
            "param_dtype": self.param_dtype.name,
            "precision": self.precision,
            "inverse_method": self.inverse_method,
            "max_sweeps": self.max_sweeps,
            "tol": self.tol,
        }

    @property
    def tau(self):
        """The elementwise transformer (`invnet.layers.transformers`)."""
        return make_transformer(self.transformer, clamp=self.clamp, bins=self.bins,
                                bound=self.bound)  # fmt: skip

    def n_tokens(self) -> int:
        return self.dim

    def _theta(self, x, cond):
        """MADE's output for ``x``; a spline's MADE sees ``x`` clipped to ``[-bound, bound]``
        (`invnet.layers.rq_spline.conditioner_input`: no extreme splines from tail points)."""
        if self.transformer == "spline":
            x = conditioner_input(x, self.bound)
        return self.made(x, cond)

    def _forward(self, x, cond):
        y, log_det = self.tau.forward(x, self._theta(x, cond))
        return y, jnp.sum(log_det, axis=-1)

    def _sweep(self, x, y, cond):
        """One Jacobi sweep: ``tau^{-1}(y; theta(x))`` for every feature at once."""
        return self.tau.inverse(y, self._theta(x, cond))

    def _sequential_inverse(self, y, cond):
        def step(_, carry):
            return self._sweep(carry[0], y, cond)

        start = (jnp.zeros_like(y), jnp.zeros_like(y))
        return jax.lax.fori_loop(0, self.dim, step, start)

    def error_bound(self) -> tuple[float, str]:
        """``exp(2 clamp)`` for the affine transformer; ``inf`` (data-dependent) for splines."""
        return self.tau.error_bound()
