"""The Bijector contract, and the two containers `Sequential` and `Inverse`.

Every invnet layer is a bijection f: R^D -> R^D acting on the last axis of its input, with
any number of leading batch axes, and has exactly two methods:

    forward(x, *, cond=None) -> (y, log_det)    y = f(x),       log_det = log|det df/dx|
    inverse(y, *, cond=None) -> (x, log_det)    x = f^{-1}(y),  log_det = log|det df^{-1}/dy|

`log_det` has the batch shape `x.shape[:-1]`; at matching points the inverse's log-det is
minus the forward's. There is no direction flag and no cached result: `inverse` recomputes
`x` from `y` every time.

Input rules (checked when a call is traced, never by silent broadcasting):

* the last axis must have the layer's size -> `ValueError` naming expected and got;
* `x` must be a floating array -> `TypeError` for integers, booleans, complex;
* a conditional layer (`cond_dim > 0`) needs `cond` of shape `(..., cond_dim)` whose batch
  axes equal `x`'s, or `(cond_dim,)` to use one condition for the whole batch -> `ValueError`
  otherwise. Unconditional layers ignore `cond`, so one `cond` can be passed to a whole
  `Sequential`.
* NaN or inf inputs are not errors: they propagate to NaN/inf outputs (use `invnet.verify`
  to find them).

Outputs keep the input's dtype; parameters are cast to it. Every matrix product inside a
layer runs at the layer's `precision` (default `"highest"`, i.e. true float32 even on GPUs,
where JAX's default float32 matmul is TF32-like and loses ~1e-3 relative per product). Set
it for a whole model with `invnet.set_precision(model, mode)`.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

__all__ = ["Bijector", "Buffer", "Sequential", "Inverse", "set_precision", "PRECISIONS"]

# Matmul precision modes, by the name users pass. Values go to jax.default_matmul_precision.
PRECISIONS: dict[str, str] = {
    "highest": "highest",  # exact float32 (6 passes of bf16 or native fp32): the default
    "default": "default",  # the platform's fast default (TF32-like on NVIDIA GPUs)
    "tf32x3": "TF32_TF32_F32_X3",  # GPU only: 3 TF32 passes, close to float32 accuracy
    "bf16x6": "BF16_BF16_F32_X6",  # 6 bf16 passes: float32-level accuracy on tensor cores
    "bf16x3": "BF16_BF16_F32_X3",  # 3 bf16 passes: ~1e-5 relative
}


class Buffer(nnx.Variable):
    """A fixed (non-trainable) array such as a permutation or a sign vector.

    Optimizers built with ``wrt=nnx.Param`` leave it alone; select with
    ``nnx.state(model, invnet.Buffer)``.
    """


_LAYER_TYPES: dict[str, type[Bijector]] = {}


class Bijector(nnx.Module):
    """Base class of every invnet layer: a bijection on the last axis.

    Subclasses set ``dim`` (``None`` for elementwise layers that accept any size) and
    ``cond_dim`` (0 when unconditional), and implement ``_forward(x, cond)`` and
    ``_inverse(y, cond)`` on validated inputs, each returning ``(out, log_det)`` with
    ``log_det`` of shape ``x.shape[:-1]``. They also implement ``get_config()``, the
    JSON-able constructor arguments that `invnet.load` rebuilds the layer from.
    """

    dim: int | None = None
    cond_dim: int = 0
    precision: str = "highest"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not cls.__name__.startswith("_"):
            _LAYER_TYPES[cls.__name__] = cls

    # ----------------------------------------------------------------- public contract
    def forward(self, x: jax.Array, *, cond: jax.Array | None = None):
        """Apply the map: returns ``(y, log|det dy/dx|)``, log-det of shape ``x.shape[:-1]``."""
        x = self._check_input(x, "x")
        cond = self._check_cond(cond, x)
        with self._precision_scope(x.dtype):
            return self._forward(x, cond)

    def inverse(self, y: jax.Array, *, cond: jax.Array | None = None):
        """Exact inverse: returns ``(x, log|det dx/dy|)``, equal to minus the forward log-det."""
        y = self._check_input(y, "y")
        cond = self._check_cond(cond, y)
        with self._precision_scope(y.dtype):
            return self._inverse(y, cond)

    def __call__(self, x: jax.Array, *, cond: jax.Array | None = None) -> jax.Array:
        """``layer(x)`` is ``layer.forward(x)[0]``."""
        return self.forward(x, cond=cond)[0]

    def get_config(self) -> dict[str, Any]:
        raise NotImplementedError(f"{type(self).__name__} does not define get_config()")

    @classmethod
    def from_config(cls, config: dict[str, Any], children: list[Bijector], *, rngs: nnx.Rngs):
        """Build a layer from ``get_config()`` output (parameters are then loaded over it)."""
        del children
        if "rngs" in inspect.signature(cls.__init__).parameters:
            return cls(**config, rngs=rngs)
        return cls(**config)

    # ------------------------------------------------------------------- subclass API
    def _forward(self, x, cond):  # pragma: no cover - abstract
        raise NotImplementedError

    def _inverse(self, y, cond):  # pragma: no cover - abstract
        raise NotImplementedError

    # ---------------------------------------------------------------------- helpers
    def _check_input(self, x, name: str) -> jax.Array:
        if not hasattr(x, "dtype"):
            x = jnp.asarray(x)
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(
                f"{type(self).__name__}: {name} must be a floating array (float32 or float64), "
                f"got dtype {x.dtype}; convert with x.astype(jnp.float32)"
            )
        if x.ndim == 0:
            raise ValueError(
                f"{type(self).__name__}: {name} must have a feature axis, got a scalar"
            )
        if self.dim is not None and x.shape[-1] != self.dim:
            raise ValueError(
                f"{type(self).__name__}: expected last axis of size {self.dim}, "
                f"got {name} of shape {tuple(x.shape)}"
            )
        return jnp.asarray(x)

    def _check_cond(self, cond, x) -> jax.Array | None:
        if self.cond_dim == 0:
            return None
        name = type(self).__name__
        if cond is None:
            raise ValueError(
                f"{name} is conditional (cond_dim={self.cond_dim}): pass cond=array of shape "
                f"(..., {self.cond_dim})"
            )
        cond = jnp.asarray(cond)
        if not jnp.issubdtype(cond.dtype, jnp.floating):
            cond = cond.astype(x.dtype)
        if cond.ndim == 0 or cond.shape[-1] != self.cond_dim:
            raise ValueError(
                f"{name}: expected cond with last axis of size {self.cond_dim}, "
                f"got shape {tuple(cond.shape)}"
            )
        batch = x.shape[:-1]
        if cond.shape[:-1] == ():
            cond = jnp.broadcast_to(cond, (*batch, self.cond_dim))
        elif cond.shape[:-1] != batch:
            raise ValueError(
                f"{name}: cond batch shape {tuple(cond.shape[:-1])} does not match the input's "
                f"{tuple(batch)}; give one cond per sample or a single (cond_dim,) vector"
            )
        return cond.astype(x.dtype)

    def _precision_scope(self, dtype):
        if dtype == jnp.float64 or self.precision == "highest":
            return jax.default_matmul_precision("highest")
        if self.precision == "default":
            return contextlib.nullcontext()
        return jax.default_matmul_precision(PRECISIONS[self.precision])

    def _zero_log_det(self, x: jax.Array) -> jax.Array:
        return jnp.zeros(x.shape[:-1], dtype=x.dtype)

    def children(self) -> list[Bijector]:
        """Sub-bijectors (for containers); leaves return an empty list."""
        return []

    def to_spec(self) -> dict[str, Any]:
        """The architecture as plain JSON-able data: ``{"type": ..., "config": ...}``."""
        spec: dict[str, Any] = {
            "type": type(self).__name__,
            "config": self.get_config(),
            "precision": self.precision,
        }
        kids = self.children()
        if kids:
            spec["children"] = [k.to_spec() for k in kids]
        return spec


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    return precision


def set_precision(model: Bijector, precision: str) -> Bijector:
    """Set the matmul precision of every layer in ``model`` (in place); returns ``model``.

    ``"highest"`` (default): full float32 on every platform. ``"default"``: the platform's
    fast mode (TF32-like on NVIDIA GPUs: ~1e-3 relative error per product). ``"bf16x6"``,
    ``"bf16x3"``, ``"tf32x3"`` (GPU only): multi-pass tensor-core algorithms. float64
    inputs always run at full precision.
    """
    check_precision(precision)
    for _, node in nnx.iter_graph(model):
        if isinstance(node, Bijector):
            node.precision = precision
    return model


def from_spec(spec: dict[str, Any], *, rngs: nnx.Rngs | None = None) -> Bijector:
    """Rebuild a model (with fresh parameters) from ``Bijector.to_spec()`` output."""
    rngs = rngs if rngs is not None else nnx.Rngs(0)
    kind = spec.get("type")
    cls = _LAYER_TYPES.get(kind)
    if cls is None:
        raise ValueError(f"unknown layer type {kind!r}; known: {sorted(_LAYER_TYPES)}")
    config = dict(spec.get("config", {}))
    children = [from_spec(c, rngs=rngs) for c in spec.get("children", [])]
    layer = cls.from_config(config, children, rngs=rngs)
    layer.precision = check_precision(spec.get("precision", "highest"))
    return layer


class Sequential(Bijector):
    """Compose bijectors: ``forward`` applies them in list order, ``inverse`` in reverse.

    Map: ``y = f_n(... f_2(f_1(x)))``. Log-det: the sum of the layers' log-dets. Inverse:
    ``x = f_1^{-1}(... f_n^{-1}(y))``, each layer's exact inverse. ``cond`` is passed to
    every layer (unconditional layers ignore it).

    ``len(model)``, iteration and indexing work like a list; a slice is again a
    ``Sequential`` sharing the same layers, so ``model[:k].inverse(h)`` maps a hidden state
    after layer ``k`` back to the input exactly.

    Example:
        >>> import jax, jax.numpy as jnp, invnet
        >>> from flax import nnx
        >>> model = invnet.Sequential(invnet.LULinear(3, rngs=nnx.Rngs(0)), invnet.LeakyReLU(0.5))
        >>> x = jnp.ones((2, 3))
        >>> y, log_det = model.forward(x)
        >>> x_back, inv_log_det = model.inverse(y)
        >>> bool(jnp.allclose(x_back, x, atol=1e-5)), log_det.shape
        (True, (2,))
    """

    def __init__(self, *layers: Bijector):
        if len(layers) == 1 and isinstance(layers[0], list | tuple):
            layers = tuple(layers[0])
        for i, layer in enumerate(layers):
            if not isinstance(layer, Bijector):
                raise TypeError(
                    f"Sequential: layer {i} is {type(layer).__name__}, not an invnet Bijector; "
                    "only bijective layers can be composed into an invertible model"
                )
        dims = {layer.dim for layer in layers if layer.dim is not None}
        if len(dims) > 1:
            raise ValueError(f"Sequential: layers have different sizes {sorted(dims)}")
        self.dim = dims.pop() if dims else None
        self.cond_dim = max((layer.cond_dim for layer in layers), default=0)
        for layer in layers:
            if layer.cond_dim not in (0, self.cond_dim):
                raise ValueError("Sequential: conditional layers disagree on cond_dim")
        self.layers = nnx.List(list(layers))

    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self) -> Iterator[Bijector]:
        return iter(self.layers)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return Sequential(*list(self.layers)[index])
        return self.layers[index]

    def children(self) -> list[Bijector]:
        return list(self.layers)

    def get_config(self) -> dict[str, Any]:
        return {}

    @classmethod
    def from_config(cls, config, children, *, rngs):
        return cls(*children)

    def forward(self, x, *, cond=None, return_intermediates: bool = False):
        """Apply every layer in order. With ``return_intermediates=True`` also returns the
        list of each layer's output (``hs[k]`` is the state after layer ``k``)."""
        x = self._check_input(x, "x")
        cond = self._check_cond(cond, x) if self.cond_dim else cond
        log_det = self._zero_log_det(x)
        hs = []
        for layer in self.layers:
            x, ld = layer.forward(x, cond=cond)
            log_det = log_det + ld
            hs.append(x)
        if return_intermediates:
            return x, log_det, hs
        return x, log_det

    def inverse(self, y, *, cond=None):
        y = self._check_input(y, "y")
        cond = self._check_cond(cond, y) if self.cond_dim else cond
        log_det = self._zero_log_det(y)
        for layer in reversed(list(self.layers)):
            y, ld = layer.inverse(y, cond=cond)
            log_det = log_det + ld
        return y, log_det


class Inverse(Bijector):
    """The inverse of a bijector: ``Inverse(b).forward`` is ``b.inverse`` and vice versa.

    Example:
        >>> import jax.numpy as jnp, invnet
        >>> inv = invnet.Inverse(invnet.LeakyReLU(0.5))
        >>> inv.forward(jnp.array([-1.0, 2.0]))[0]
        Array([-2.,  2.], dtype=float32)
    """

    def __init__(self, bijector: Bijector):
        if not isinstance(bijector, Bijector):
            raise TypeError(f"Inverse: expected an invnet Bijector, got {type(bijector).__name__}")
        self.bijector = bijector
        self.dim = bijector.dim
        self.cond_dim = bijector.cond_dim

    def children(self) -> list[Bijector]:
        return [self.bijector]

    def get_config(self) -> dict[str, Any]:
        return {}

    @classmethod
    def from_config(cls, config, children, *, rngs):
        return cls(children[0])

    def forward(self, x, *, cond=None):
        return self.bijector.inverse(x, cond=cond)

    def inverse(self, y, *, cond=None):
        return self.bijector.forward(y, cond=cond)
