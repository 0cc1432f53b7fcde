"""The Bijector contract, the one walk of a model, and the containers `Sequential`, `Inverse`.

Every invnet layer is a bijection of the last ``k`` axes of its input (its *event*: ``k = 1``
for feature vectors, ``k = 3`` for channels-last images ``(H, W, C)``), with any number of
leading batch axes, and has exactly two methods:

    forward(x, *, cond=None) -> (y, log_det)    y = f(x),       log_det = log|det df/dx|
    inverse(y, *, cond=None) -> (x, log_det)    x = f^{-1}(y),  log_det = log|det df^{-1}/dy|

`log_det` has the batch shape ``x.shape[:-k]``; at matching points the inverse's log-det is
minus the forward's. There is no direction flag and no cached result: `inverse` recomputes
`x` from `y` every time. A layer may change its event's shape but never its size (a 2x2
squeeze maps ``(H, W, C)`` to ``(H/2, W/2, 4C)``); `Sequential` checks that neighbours fit
when it is built.

Input rules (checked when a call is traced, never by silent broadcasting):

* the event axes must have the layer's sizes -> `ValueError` naming expected and got;
* `x` must be a float32 or float64 array -> `TypeError` for integers, booleans, complex and
  for float16/bfloat16 (their round trips lose 1e-3 to 1e-2; convert first);
* a conditional layer (``cond_dim > 0``) needs `cond` of shape ``(..., cond_dim)`` whose batch
  axes equal `x`'s, or ``(cond_dim,)`` to use one condition for the whole batch ->
  `ValueError` otherwise. A model with no conditional layer refuses a `cond` (a forgotten
  ``cond_dim=`` would otherwise train an unconditional model silently); inside a model, a
  container hands `cond` only to its conditional children.
* NaN or inf inputs are not errors: they propagate to NaN/inf outputs (use `invnet.verify`
  to find them).

Outputs keep the input's dtype; parameters are cast to it. Every matrix product inside a
layer runs at the layer's `precision` (default `"highest"`, i.e. true float32 even on GPUs,
where JAX's default float32 matmul is TF32-like and loses ~1e-3 relative per product). Set
it for a whole model with `invnet.set_precision(model, mode)`.

What a layer knows about itself lives on the layer (defaults here, overridden in the
layer's own file): `Bijector.error_bound` (how much a round trip can amplify rounding,
used by `invnet.verify`), `Bijector.prepare` / `forward_prepared` / `inverse_prepared` (what
`invnet.freeze` precomputes and how it is applied), `Bijector.not_ready` /
`reset_data_init` (data-dependent initialisation). Every tool walks a model through
`invnet.walk`: `nodes` (every bijector, for settings and hooks) or `steps` (the leaf layers
in the order ``forward`` applies them, for per-layer checks), both built from each
container's `chain` (or a multi-branch layer's `branches`). How a call runs (compiled by
default, as written inside a trace) is `invnet._runtime`'s business; the execution context
it reads is `invnet._context`. `invnet.bases` has the bases of elementwise layers and
wrappers; the containers are in `invnet.containers`."""

from __future__ import annotations

import contextlib
import inspect
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from invnet import _context, _runtime, splitmm
from invnet.walk import nodes

__all__ = ["Bijector", "Buffer", "set_precision", "from_spec", "PRECISIONS"]

# Matmul precision modes, by the name users pass. Values go to jax.default_matmul_precision.
PRECISIONS: dict[str, str] = {
    "highest": "highest",  # exact float32 (6 passes of bf16 or native fp32): the default
    "default": "default",  # the platform's fast default (TF32-like on NVIDIA GPUs)
    "tf32x3": "TF32_TF32_F32_X3",  # GPU only: 3 TF32 passes, close to float32 accuracy
    "bf16x6": "BF16_BF16_F32_X6",  # 6 bf16 passes: float32-level accuracy on tensor cores
    "bf16x3": "BF16_BF16_F32_X3",  # 3 bf16 passes: ~1e-5 relative
    # error-corrected split products (invnet.splitmm) in the layers' big GEMMs; every other
    # product of such a layer runs at full float32
    "tf32_corrected": "highest",
    "bf16_corrected": "highest",
}

Shape = tuple[int | None, ...]  # an event shape; None: any size on that axis


class Buffer(nnx.Variable):
    """A fixed (non-trainable) array such as a permutation or a sign vector.

    Optimizers built with ``wrt=nnx.Param`` leave it alone; select with
    ``nnx.state(model, invnet.Buffer)``.
    """


LAYER_TYPES: dict[str, type[Bijector]] = {}


@contextlib.contextmanager
def using_prepared(table: dict[int, Any]):
    """Within this block, each layer whose ``id`` is in ``table`` runs its
    ``forward_prepared`` / ``inverse_prepared`` with those arrays (used by `invnet.freeze`)."""
    with _context.using(prepared=table):
        yield


def prepared_active() -> bool:
    """True while a compiled call traces (see `using_prepared`)."""
    return _context.current().prepared is not None


def data_direction(inverse: bool) -> bool:
    """Whether a layer's ``forward`` (``inverse=False``) or ``inverse`` (``True``) is running
    in the direction data flows through the model: the model's ``forward``, seen through any
    `Inverse` wrappers. Data-dependent initialisation happens only in that direction."""
    return inverse == _context.current().flipped


def fmt(shape) -> str:
    """An event shape for messages; ``*`` marks an axis of any size."""
    inner = ", ".join("*" if s is None else str(s) for s in shape)
    return f"({inner},)" if len(shape) == 1 else f"({inner})"


def unify_shapes(a: Shape, b: Shape) -> Shape | None:
    """The common refinement of two event patterns, or None when they cannot match."""
    if len(a) != len(b):
        return None
    out = []
    for u, v in zip(a, b, strict=True):
        if u is not None and v is not None and u != v:
            return None
        out.append(u if u is not None else v)
    return tuple(out)


class Bijector(nnx.Module):
    """Base class of every invnet layer: a bijection of the last ``event_ndim`` axes.

    Subclasses implement ``_forward(x, cond)`` and ``_inverse(y, cond)`` on validated inputs,
    each returning ``(out, log_det)`` with ``log_det`` of the batch shape, and
    ``get_config()``, the JSON-able constructor arguments that `invnet.load` rebuilds the
    layer from. Vector layers set ``dim`` (``None`` for elementwise layers that take any
    size); layers on other events set ``event_ndim`` and override `event_pattern` and, if
    they change the shape, `output_shape` / `input_shape`. ``cond_dim`` is 0 when
    unconditional.
    """

    dim: int | None = None
    cond_dim: int = 0
    event_ndim: int = 1
    precision: str = "highest"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not cls.__name__.startswith("_"):
            LAYER_TYPES[cls.__name__] = cls

    # ----------------------------------------------------------------- public contract
    @_runtime.compiled
    def forward(self, x: jax.Array, *, cond: jax.Array | None = None):
        """Apply the map: returns ``(y, log|det dy/dx|)``, log-det of the batch shape.

        Called on concrete arrays this runs compiled (see `invnet._runtime`); inside a trace,
        or within ``invnet.eager()``, as written."""
        x = self._check_input(x, "x")
        cond = self._check_cond(cond, x)
        with self._precision_scope(x.dtype):
            prepared = _lookup_prepared(self)
            if prepared is not None:
                return self.forward_prepared(prepared, x, cond)
            return self._forward(x, cond)

    @_runtime.compiled(check_finite=True, precompute="inverse")
    def inverse(self, y: jax.Array, *, cond: jax.Array | None = None):
        """Exact inverse: returns ``(x, log|det dx/dy|)``, equal to minus the forward log-det
        (compiled like `forward`)."""
        y = self._check_input(y, "y", inverse=True)
        cond = self._check_cond(cond, y, inverse=True)
        with self._precision_scope(y.dtype):
            prepared = _lookup_prepared(self)
            if prepared is not None:
                return self.inverse_prepared(prepared, y, cond)
            return self._inverse(y, cond)

    @_runtime.compiled
    def __call__(self, x: jax.Array, *, cond: jax.Array | None = None) -> jax.Array:
        """``layer(x)`` is ``layer.forward(x)[0]`` (compiled without the log-det)."""
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

    # ----------------------------------------------------------------------- events
    def event_pattern(self) -> Shape:
        """The input event shape this layer accepts; ``None`` entries take any size."""
        if self.event_ndim == 1:
            return (self.dim,)
        return (None,) * self.event_ndim

    def output_shape(self, shape: Shape) -> Shape:
        """The output event shape for input event ``shape`` (``ValueError`` if it cannot
        take it). Shape-preserving layers return it unchanged."""
        return tuple(shape)

    def input_shape(self, shape: Shape) -> Shape:
        """The input event shape that produces output event ``shape`` (the inverse map)."""
        return tuple(shape)

    def output_pattern(self) -> Shape:
        """The output event shape this layer produces (``None`` entries: any size)."""
        return self.output_shape(self.event_pattern())

    def flexible_rank(self) -> bool:
        """True for layers that take the event rank of their neighbours (elementwise ones
        built without an explicit ``event_ndim``)."""
        return False

    def _adopt_event_ndim(self, ndim: int) -> bool:
        """Take event rank ``ndim`` if this layer can (elementwise layers can); True if the
        layer now works on events of that rank."""
        return ndim == self.event_ndim

    def batch_shape(self, a: jax.Array, *, inverse: bool = False) -> tuple[int, ...]:
        """The batch axes of an input (``inverse=False``) or output array."""
        k = len(self.output_pattern() if inverse else self.event_pattern())
        return tuple(a.shape[: a.ndim - k])

    # -------------------------------------------------------------- knowledge hooks
    def error_bound(self) -> tuple[float, str]:
        """``(bound, rule)``: how much this layer can amplify relative rounding errors in a
        round trip (a condition number). `invnet.verify` derives its tolerances from it."""
        return 1.0, "unknown, assumed 1"

    def prepare(self, **options: Any) -> Any:
        """Arrays `invnet.freeze` precomputes from the current parameters for fast
        inference (e.g. an explicit inverse matrix), or ``None`` to run as written.
        ``options`` are `invnet.freeze`'s (e.g. ``lu_inverse``); ignore unknown ones."""
        del options
        return None

    def forward_prepared(self, prepared: Any, x, cond):
        """The forward map using ``prepare()``'s arrays (on validated inputs)."""
        del prepared
        return self._forward(x, cond)

    def inverse_prepared(self, prepared: Any, y, cond):
        """The inverse map using ``prepare()``'s arrays (on validated inputs)."""
        del prepared
        return self._inverse(y, cond)

    def not_ready(self) -> str | None:
        """Why this layer cannot run as a fixed function yet (e.g. an ActNorm that has not
        seen data), or ``None`` when it can."""
        return None

    def reset_data_init(self) -> None:
        """Forget any data-dependent initialisation, so the next forward redoes it."""

    def mark_ready(self) -> None:
        """Take the current parameters as initialised (skip a pending data-dependent init)."""

    # ---------------------------------------------------------------------- helpers
    def _check_input(self, x, name: str, *, inverse: bool = False) -> jax.Array:
        label = type(self).__name__
        if not hasattr(x, "dtype"):
            x = jnp.asarray(x)
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(
                f"{label}: {name} must be a floating array (float32 or float64), "
                f"got dtype {x.dtype}; convert with x.astype(jnp.float32)"
            )
        if jnp.dtype(x.dtype).itemsize < 4:
            raise TypeError(
                f"{label}: {name} has dtype {x.dtype}; invnet layers compute in float32 or "
                f"float64 (a {x.dtype} round trip loses 1e-3 to 1e-2 relative, too much for "
                "an exact inverse). Convert with x.astype(jnp.float32)"
            )
        pattern = self.output_pattern() if inverse else self.event_pattern()
        k = len(pattern)
        if x.ndim < k:
            what = "a feature axis" if k == 1 else f"{k} event axes {fmt(pattern)}"
            got = "a scalar" if x.ndim == 0 else f"shape {tuple(x.shape)}"
            raise ValueError(f"{label}: {name} must have {what}, got {got}")
        event = tuple(x.shape[x.ndim - k :])
        if unify_shapes(pattern, event) is None:
            if k == 1:
                raise ValueError(
                    f"{label}: expected last axis of size {pattern[0]}, "
                    f"got {name} of shape {tuple(x.shape)}"
                )
            raise ValueError(
                f"{label}: expected event shape {fmt(pattern)} (the last {k} axes), "
                f"got {name} of shape {tuple(x.shape)}"
            )
        # a layer that cannot take this event (e.g. odd sizes for a squeeze) says so here
        self.input_shape(event) if inverse else self.output_shape(event)
        return x if isinstance(x, jax.Array) else jnp.asarray(x)

    def _check_cond(self, cond, x, *, inverse: bool = False) -> jax.Array | None:
        name = type(self).__name__
        if self.cond_dim == 0:
            if cond is not None:
                raise ValueError(
                    f"{name} has no conditional layer (cond_dim=0) but cond was passed; build "
                    "its coupling/autoregressive layers with cond_dim=... to make a conditional "
                    "model, or drop cond"
                )
            return None
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
        batch = self.batch_shape(x, inverse=inverse)
        if cond.shape[:-1] == ():
            cond = jnp.broadcast_to(cond, (*batch, self.cond_dim))
        elif cond.shape[:-1] != batch:
            raise ValueError(
                f"{name}: cond batch shape {tuple(cond.shape[:-1])} does not match the input's "
                f"{tuple(batch)}; give one cond per sample or a single (cond_dim,) vector"
            )
        return cond.astype(x.dtype)

    def _precision_scope(self, dtype):
        """The matmul precision of this layer's products, and the `invnet.splitmm` mode of
        the conditioners' products (error-corrected modes), for a call on ``dtype``."""
        mode = "highest" if dtype == jnp.float64 else self.precision
        stack = contextlib.ExitStack()
        stack.enter_context(splitmm.scoped(mode))  # also undoes an enclosing layer's mode
        if mode != "default":
            stack.enter_context(jax.default_matmul_precision(PRECISIONS[mode]))
        return stack

    def _zero_log_det(self, x: jax.Array, *, inverse: bool = False) -> jax.Array:
        return jnp.zeros(self.batch_shape(x, inverse=inverse), dtype=x.dtype)

    def _sum_event(self, a: jax.Array) -> jax.Array:
        """Sum a per-element array over the event axes (elementwise log-dets)."""
        return jnp.sum(a, axis=tuple(range(a.ndim - self.event_ndim, a.ndim)))

    # -------------------------------------------------------------------- structure
    def chain(self) -> list[tuple[str, Bijector, bool]] | None:
        """For containers that apply their children one after another: ``(name, child,
        inverted)`` in the order ``forward`` applies them; ``None`` for a leaf layer (or a
        container that is not a chain: it then overrides `children`)."""
        return None

    def branches(self):
        """For multi-branch layers (`invnet.FactorOut`): ``(split, children, join)``, where
        ``split`` / ``join`` are `invnet.walk.Move` s (the state cut into a tuple of parts and
        joined again) and ``children`` lists ``(name, child, index)``: ``child`` acts on part
        ``index``. ``None`` (the default) for layers that are not opened this way."""
        return None

    def children(self) -> list[Bijector]:
        """Sub-bijectors (for containers); leaves return an empty list."""
        parts = self.chain()
        if parts is not None:
            return [child for _, child, _ in parts]
        branches = self.branches()
        return [] if branches is None else [child for _, child, _ in branches[1]]

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


def _lookup_prepared(layer: Bijector) -> Any:
    table = _context.current().prepared
    return None if table is None else table.get(id(layer))


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    return precision


def wider_float(*dtypes) -> jnp.dtype:
    """The widest floating dtype among ``dtypes`` (float32 if none is floating), chosen
    explicitly where two dtypes meet (a conditioner's input and its parameters, a model's
    output and a target): what JAX's standard promotion would give, without relying on
    implicit promotion, which ``jax_numpy_dtype_promotion="strict"`` refuses."""
    floats = [jnp.dtype(d) for d in dtypes if jnp.issubdtype(d, jnp.floating)]
    return max(floats, key=lambda d: d.itemsize, default=jnp.dtype(jnp.float32))


def event_size(shape: Shape) -> int | None:
    """The number of elements of an event shape, or None if a size is open."""
    return None if any(s is None for s in shape) else math.prod(shape)


def set_precision(model: Bijector, precision: str) -> Bijector:
    """Set the matmul precision of every layer in ``model`` (in place); returns ``model``.

    ``"highest"`` (default): full float32 on every platform. ``"default"``: the platform's
    fast mode (TF32-like on NVIDIA GPUs: ~1e-3 relative error per product). ``"bf16x6"``,
    ``"bf16x3"``, ``"tf32x3"`` (GPU only): XLA's multi-pass tensor-core algorithms.
    ``"tf32_corrected"`` / ``"bf16_corrected"``: error-corrected split products
    (`invnet.splitmm`, Ootomo & Yokota 2022) for the GEMMs of `LULinear` and `Conv1x1` (as
    written and compiled) and the products of the conditioners invnet builds (`MLP`,
    `ConvNet`, the masked layers of `MaskedAutoregressive`): float32-level accuracy from
    tensor-core products on GPUs; exact but about 3x slower on CPUs. float64 inputs always
    run at full precision.
    """
    check_precision(precision)
    for node in nodes(model):
        node.precision = precision
    return model


def from_spec(spec: dict[str, Any], *, rngs: nnx.Rngs | None = None) -> Bijector:
    """Rebuild a model (with fresh parameters) from ``Bijector.to_spec()`` output."""
    rngs = rngs if rngs is not None else nnx.Rngs(0)
    kind = spec.get("type")
    cls = LAYER_TYPES.get(kind)
    if cls is None:
        raise ValueError(f"unknown layer type {kind!r}; known: {sorted(LAYER_TYPES)}")
    config = dict(spec.get("config", {}))
    children = [from_spec(c, rngs=rngs) for c in spec.get("children", [])]
    layer = cls.from_config(config, children, rngs=rngs)
    layer.precision = check_precision(spec.get("precision", "highest"))
    return layer
