"""The runtime: how an invnet model runs. Compiled by default, never stale, one jit cache.

``model.forward(x)``, ``model.inverse(y)``, ``model(x)``, `invnet.Flow`'s ``log_prob``,
``sample`` and ``sample_and_log_prob``, and `invnet.sample_posterior` are decorated with
`compiled`:

* Outside any trace, the method runs as one ``jax.jit`` function of the model's parameters
  and buffers, which are passed as arguments on every call (read from the model's own
  variables at that moment), so a result can never come from old parameters. The compiled
  function is cached on the model's structure (its ``nnx`` graph definition), the method and
  its static arguments (Python ints, bools, strings, dtypes), and, by ``jax.jit``, on the
  input shapes and dtypes: models of the same structure share it, a new batch size compiles
  once more.
* Inside a user's own ``jax.jit`` / ``grad`` / ``vmap`` (an input or a parameter is a
  tracer), inside a call the runtime compiled, and while `invnet.freeze` traces, the method
  runs as written. Traced inside a user's ``jax.jit`` with the model closed over (its
  parameters concrete), it warns (`BakedParametersWarning`): the parameters become constants
  of that compiled function, which would silently keep the old model after an update; pass
  the model in (``nnx.jit(lambda m, x: m.forward(x))(model, x)``) instead.
* A model with a layer that initialises itself from its first batch (an `invnet.ActNorm`
  that has not seen data: ``node.not_ready()`` is not None) runs as written, so that the
  initialisation is kept; later calls are compiled.
* Under ``jax.disable_jit()`` the methods run op by op, as written.
* Opt-out for debugging (prints, breakpoints, op-by-op errors): ``with invnet.eager(): ...``,
  or the environment variable ``INVNET_EAGER=1`` for the whole process.

One staleness rule serves the methods and `invnet.freeze`: a `Snapshot` (one ``nnx.split``)
is current while every module of the model keeps the attributes it had (a replaced layer,
variable or precision setting is a structural change: the model is split again); its values
are current while every variable still holds the array it held (an optimizer step,
``nnx.update`` or a checkpoint load replaces them).

Precomputed arrays: the inverse methods (and the samplers, which run the inverse) pass each
layer's ``prepare()`` arrays (`invnet.LULinear`'s ``W^{-1}``) into the compiled call. They
are built on the first such call and kept in the `Snapshot` with weak references to the
arrays they came from: the same staleness rule, so the first call after any change builds
them again.

One jit cache: `cached`, least recently used first out, at most `CACHE_SIZE` functions
(the methods, `invnet.freeze` and `invnet.fit`'s step and evaluation share it).

Per-call cost: the structure check (one dict comparison per module, in C), a read of each
variable's array, and ``jax.jit``'s own dispatch (measured by ``benchmarks/run.py --only
layers``: within the noise of a hand-jitted call on a tiny flow, CPU).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable

import jax
import numpy as np
from flax import nnx

from invnet import _context
from invnet.walk import nodes, steps

__all__ = [
    "cached",
    "eager",
    "eager_mode",
    "compiled",
    "cached_jit",
    "Snapshot",
    "CACHE_SIZE",
    "BakedParametersWarning",
    "NonFiniteWarning",
]

CACHE_SIZE = 256


@contextlib.contextmanager
def eager():
    """Within this block invnet models run op by op, as written (no automatic ``jax.jit``):
    for debugging with prints or breakpoints. ``INVNET_EAGER=1`` does the same for a whole
    process.

    Example:
        >>> import jax.numpy as jnp, invnet
        >>> with invnet.eager():
        ...     y, log_det = invnet.LeakyReLU(0.5).forward(jnp.array([-2.0, 2.0]))
        >>> y
        Array([-1.,  2.], dtype=float32)
    """
    with _context.using(eager=True):
        yield


def eager_mode() -> bool:
    """True inside `eager` or when the environment sets ``INVNET_EAGER`` (not ``0``)."""
    return _context.current().eager or os.environ.get("INVNET_EAGER", "0") not in ("", "0")


# ------------------------------------------------------------------------ the jit cache
_CACHE: OrderedDict[Hashable, Callable] = OrderedDict()


def cached(key: Hashable, build: Callable[[], Callable]) -> Callable:
    """The compiled function cached under ``key``, built by ``build()`` (which returns a
    ``jax.jit`` function) on a miss: the one cache of compiled functions in invnet (the
    models' methods, `invnet.freeze`, `invnet.fit`'s step and evaluation), bounded to
    `CACHE_SIZE` entries, the least recently used dropped first. An unhashable key (an
    objective or optimizer that cannot be hashed) builds afresh, uncached."""
    try:
        found = _CACHE.get(key)
    except TypeError:
        return build()
    if found is None:
        found = _CACHE[key] = build()
        while len(_CACHE) > CACHE_SIZE:
            _CACHE.popitem(last=False)
    else:
        _CACHE.move_to_end(key)
    return found


def cached_jit(key: Hashable, make: Callable[[], Callable]) -> Callable:
    """`cached` for ``jax.jit(make())``."""
    return cached(key, lambda: jax.jit(make()))


def clear_cache() -> None:
    """Forget every compiled function (they retrace on their next call)."""
    _CACHE.clear()
    _SNAPSHOTS.clear()


# ---------------------------------------------------------------------------- snapshots
class Snapshot:
    """How one model instance splits: its graph definition, its variables in leaf order,
    and each module's attributes (to see structural changes), taken by one ``nnx.split``."""

    __slots__ = (
        "root_items",
        "modules",
        "variables",
        "structure",
        "functions",
        "_prepared",
        "__weakref__",
    )

    def __init__(self, model):
        graphdef, state = nnx.split(model)
        self.variables = jax.tree.leaves(state, is_leaf=lambda v: isinstance(v, nnx.Variable))
        self.structure = (graphdef, jax.tree.structure(state))
        self.root_items = dict(vars(model))
        # each module's attribute dict and a copy of it; every module but the root (a strong
        # reference to the root would keep it alive in the cache)
        self.modules = [
            (vars(node), dict(vars(node)))
            for path, node in nnx.iter_graph(model)
            if path and isinstance(node, nnx.Pytree)
        ]
        self.functions: dict[Hashable, Callable] = {}
        # per (direction, lu_inverse): (references to the arrays the tables were built
        # from, the tables)
        self._prepared: dict[tuple[str, str], tuple[list, list]] = {}

    def current(self, model) -> bool:
        """Whether the model still has the structure this snapshot was taken from."""
        try:
            if not _same_attributes(vars(model), self.root_items):
                return False
            for attributes, copy in self.modules:
                if not _same_attributes(attributes, copy):
                    return False
            return True
        except Exception:  # noqa: BLE001 - an attribute that cannot be compared: re-split
            return False

    def arrays(self) -> list:
        """The arrays the variables hold now."""
        return [v.get_raw_value() for v in self.variables]

    def holds(self, model, arrays: list) -> bool:
        """Whether ``model`` has this structure and its variables still hold ``arrays``."""
        return self.current(model) and all(
            v.get_raw_value() is a for v, a in zip(self.variables, arrays, strict=True)
        )

    def adopt_equal(self, arrays: list) -> bool:
        """Whether every variable holds ``arrays``' values, if not the same objects: a
        read-only `nnx.jit` call over the model writes each variable back as a new array of
        equal value, which is not a change. If so, ``arrays`` is updated in place to the new
        objects (the next check is by identity again). Values are compared on the host, only
        for the variables whose object changed; NaN equals NaN."""
        current = self.arrays()
        for held, now in zip(arrays, current, strict=True):
            if held is not now and not _equal_values(held, now):
                return False
        arrays[:] = current
        return True

    def prepared(self, model, arrays: list, direction: str, *, lu_inverse: str = "matrix") -> list:
        """Each node's ``prepare()`` arrays (in the order of `nodes`) for running ``model`` in
        ``direction`` ("forward" or "inverse"), built once per parameter version: kept while
        every variable holds the array it held when they were built (the staleness rule of
        the methods), rebuilt after any change. Each layer is told which of its own methods
        the call runs (``run``): its ``inverse``, or its ``forward`` inside an odd number of
        `invnet.Inverse` wrappers. ``lu_inverse``: `invnet.freeze`'s option."""
        held = self._prepared.get((direction, lu_inverse))
        if held is not None and all(r() is a for r, a in zip(held[0], arrays, strict=True)):
            return held[1]
        inverse = direction == "inverse"
        runs: dict[int, set[str]] = {}
        for step in steps(model):
            if step.layer is not None:
                run = "inverse" if inverse != step.inverted else "forward"
                runs.setdefault(id(step.layer), set()).add(run)
        tables = [
            node.prepare(lu_inverse=lu_inverse, run=tuple(sorted(runs[id(node)])))
            if id(node) in runs
            else None
            for node in nodes(model)
        ]
        self._prepared[(direction, lu_inverse)] = ([_reference(a) for a in arrays], tables)
        return tables


# nnx's own bookkeeping on every module (the trace state it was last updated under): any
# nnx transform (nnx.jit, nnx.grad) over the model replaces it, which changes no structure
_BOOKKEEPING = frozenset({"_pytree__state", "_object__state"})


def _same_attributes(now: dict, copy: dict) -> bool:
    """Whether a module's attributes are those of ``copy``, nnx's bookkeeping aside; when
    only the bookkeeping differs, ``copy`` takes it (the next check is one dict ``==``,
    identity first, in C)."""
    if now == copy:
        return True
    if now.keys() != copy.keys():
        return False
    for key, value in now.items():
        if key not in _BOOKKEEPING and value is not copy[key] and not bool(value == copy[key]):
            return False
    copy.update({key: now[key] for key in _BOOKKEEPING if key in now})
    return True


def _equal_values(a, b) -> bool:
    """Whether two variable values are equal arrays (same shape, dtype and elements)."""
    try:
        if np.shape(a) != np.shape(b) or getattr(a, "dtype", None) != getattr(b, "dtype", None):
            return False
        u, v = np.asarray(a), np.asarray(b)
        floating = np.issubdtype(u.dtype, np.inexact)
        return bool(np.array_equal(u, v, equal_nan=floating))
    except Exception:  # noqa: BLE001 - e.g. PRNG key arrays: treat as changed
        return False


def _reference(a) -> Callable:
    """A weak reference to ``a`` where it can have one (arrays), else a strong one: the
    prepared tables must not keep a model's old parameters alive."""
    try:
        return weakref.ref(a)
    except TypeError:
        return lambda: a


_SNAPSHOTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def snapshot(model) -> Snapshot:
    """The current `Snapshot` of ``model`` (taken again after a structural change)."""
    snap = _SNAPSHOTS.get(model)
    if snap is None or not snap.current(model):
        snap = _SNAPSHOTS[model] = Snapshot(model)
    return snap


# ------------------------------------------------------------------- compiled methods
def _dynamic(value) -> bool:
    """Arrays, floats, containers of them and None are traced; ints, bools, strings and
    dtypes are static (part of the cache key)."""
    return value is None or isinstance(
        value, jax.Array | np.ndarray | float | complex | np.floating | list | tuple | dict
    )


class BakedParametersWarning(UserWarning):
    """A model method was traced inside the user's own ``jax.jit`` with the model's
    parameters closed over: they become constants of that compiled function, which then
    keeps returning the old model's results after any update."""


_BAKED = (
    "{name} is being traced inside jax.jit with the model closed over: its parameters become "
    "constants of that compiled function, which will keep returning this model's results "
    "after the model changes (invnet.fit, an optimizer step, nnx.update, a load). Pass the "
    "model in instead: nnx.jit(lambda m, x: m.{method}(x))(model, x), or graphdef, state = "
    "nnx.split(model) and jax.jit(lambda s, x: nnx.merge(graphdef, s).{method}(x))(state, "
    "x). (Called outside any jit, model.{method} is compiled already and never stale.)"
)


def _under_jit() -> bool:
    """Whether the code runs inside a ``jax.jit`` trace (not only a scan, cond or vmap run
    on the spot). Reads JAX's trace stack; False wherever that cannot be read."""
    try:
        from jax._src import core

        trace = core.trace_ctx.trace
        while trace is not None:
            info = getattr(getattr(trace, "frame", None), "debug_info", None)
            if getattr(info, "traced_for", None) in ("jit", "pjit"):
                return True
            trace = getattr(trace, "parent_trace", None)
    except Exception:  # noqa: BLE001 - a JAX without these internals: no warning
        return False
    return False


def _warn_if_baked(model, fn) -> None:
    if not _under_jit():
        return
    params = jax.tree.leaves(nnx.state(model, nnx.Param))  # buffers alone never train
    if params and not any(isinstance(a, jax.core.Tracer) for a in params):
        name = f"{type(model).__name__}.{fn.__name__.lstrip('_')}"
        method = "forward" if fn.__name__ == "__call__" else fn.__name__.lstrip("_")
        warnings.warn(_BAKED.format(name=name, method=method), BakedParametersWarning, 3)


def _as_written(model, fn, args, kwargs) -> bool:
    ctx = _context.current()
    if ctx.inside or ctx.prepared is not None or eager_mode() or jax.config.jax_disable_jit:
        return True
    if any(isinstance(a, jax.core.Tracer) for a in jax.tree.leaves((args, kwargs))):
        _warn_if_baked(model, fn)
        return True
    return any(node.not_ready() is not None for node in nodes(model))


def _make(structure, fn, static_args, static_kwargs, check: bool):
    graphdef, treedef = structure

    def run(leaves, tables, args, kwargs):
        with _context.using(inside=True):
            model = nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))
            full = list(args)
            for i, value in static_args:
                full.insert(i, value)
            table = {}
            if tables is not None:
                pairs = zip(nodes(model), tables, strict=True)
                table = {id(n): t for n, t in pairs if t is not None}
            if not table:  # nothing precomputed: the layers run as written
                out = fn(model, *full, **kwargs, **dict(static_kwargs))
            else:
                with _context.using(prepared=table):
                    out = fn(model, *full, **kwargs, **dict(static_kwargs))
            if check:
                return out, _all_finite(out[0])
            return out

    return run


class NonFiniteWarning(RuntimeWarning):
    """A model's inverse turned finite inputs into NaN/inf (a target outside the range of an
    interval layer such as `invnet.Tanh`, or an unconverged capped jacobi inverse):
    `invnet.explain_nonfinite` names the layer."""


def _all_finite(out) -> jax.Array:
    """Inside the compiled call: whether every entry of ``out`` is finite, as one fused
    reduction (``0 * x`` is 0 for every finite ``x`` and NaN for NaN/inf). Returned with the
    result, so the usual case costs no second dispatch; `_check_finite` looks closer only
    when it is False."""
    return jax.numpy.isfinite(jax.numpy.sum(out * jax.numpy.zeros((), out.dtype)))


def _check_finite(model, data, out) -> None:
    """Warn when samples with finite ``data`` came back non-finite (run only when some
    output was not finite)."""
    try:
        batch = model.batch_shape(data, inverse=True)
    except (AttributeError, TypeError, ValueError):
        return
    n = math.prod(batch)
    if not n:
        return
    went_in = jax.numpy.isfinite(data.reshape(n, -1)).all(axis=1)
    came_out = jax.numpy.isfinite(out.reshape(n, -1)).all(axis=1)
    lost = np.flatnonzero(np.asarray(went_in & ~came_out))
    if lost.size:
        shown = ", ".join(str(i) for i in lost[:8]) + (", ..." if lost.size > 8 else "")
        warnings.warn(
            f"{type(model).__name__}.inverse: {lost.size} of {n} samples with finite inputs "
            f"came back NaN/inf (samples {shown}, flat batch indices): a target outside the "
            "range of an interval layer (Tanh, Sigmoid, Logit) has no preimage, or an "
            "iterative (jacobi) inverse did not converge within its sweep cap. "
            "invnet.explain_nonfinite(model, y) names the layer where each one was lost",
            NonFiniteWarning,
            stacklevel=3,
        )


def compiled(
    fn: Callable | None = None,
    *,
    check_finite: bool = False,
    static: tuple[str, ...] = (),
    precompute: str | None = None,
) -> Callable:
    """Decorate a method ``fn(model, *args, **kwargs)`` of a model (or a function whose first
    argument is one) so that, called on concrete arrays, it runs as a cached jitted function
    of the model's current variables (see the module docstring); otherwise as written.

    ``check_finite`` (for inverses): warn (`NonFiniteWarning`) when samples of a finite first
    argument came back non-finite (one fused reduction inside the compiled call says
    whether any output is non-finite; the samples are looked for only then).
    ``static``: keyword arguments that are part of the cache key whatever their type (a
    float tolerance a loop tests). ``precompute`` ("forward" or "inverse": the direction
    ``fn`` runs the model in): the layers run with their ``prepare()`` arrays (e.g.
    `invnet.LULinear`'s explicit ``W^{-1}``), built once per parameter version and kept in
    the model's `Snapshot` (rebuilt after any change, so never stale)."""
    if fn is None:
        return functools.partial(
            compiled, check_finite=check_finite, static=static, precompute=precompute
        )

    def is_dynamic(name, value):
        return name not in static and _dynamic(value)

    @functools.wraps(fn)
    def method(model, *args, **kwargs):
        if _as_written(model, fn, args, kwargs):
            return fn(model, *args, **kwargs)
        static_args = tuple((i, a) for i, a in enumerate(args) if not _dynamic(a))
        static_kwargs = tuple(sorted((k, v) for k, v in kwargs.items() if not is_dynamic(k, v)))
        check = check_finite and bool(args) and isinstance(args[0], jax.Array | np.ndarray)
        key = (fn, static_args, static_kwargs, check)
        try:
            hash(key)
        except TypeError:  # an unhashable static argument: nothing to cache on
            return fn(model, *args, **kwargs)
        snap = snapshot(model)
        leaves = snap.arrays()
        if any(isinstance(a, jax.core.Tracer) for a in leaves):  # traced variables (nnx.grad)
            return fn(model, *args, **kwargs)
        tables = None if precompute is None else snap.prepared(model, leaves, precompute)
        jitted = snap.functions.get(key)
        if jitted is None:
            jitted = snap.functions[key] = cached_jit(
                (snap.structure, key), lambda: _make(snap.structure, fn, *key[1:])
            )
        dyn_args = [a for a in args if _dynamic(a)]
        dyn_kwargs = {k: v for k, v in kwargs.items() if is_dynamic(k, v)}
        out = jitted(leaves, tables, dyn_args, dyn_kwargs)
        if check:
            out, finite = out
            if not finite:  # one scalar read; the samples are found only when some are lost
                _check_finite(model, jax.numpy.asarray(args[0]), out[0])
        return out

    return method
