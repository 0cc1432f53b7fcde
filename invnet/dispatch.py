"""Compiled by default: a model's methods called on concrete arrays run as cached jitted
functions of its current parameters.

``model.forward(x)``, ``model.inverse(y)``, ``model(x)``, `invnet.Flow`'s ``sample``,
``log_prob`` and ``sample_and_log_prob``, and `invnet.sample_posterior` go through `call`:

* Outside any trace, the method runs as one ``jax.jit`` function of the model's parameters
  and buffers, which are passed as arguments on every call (read from the model's own
  variables at that moment), so a result can never come from old parameters. The compiled
  function is cached on the model's structure (its ``nnx`` graph definition) and, by
  ``jax.jit``, on the input shapes, dtypes and whether ``cond`` is given: models of the same
  structure share it, a new batch size compiles once more.
* Inside a user's own ``jax.jit`` / ``grad`` / ``vmap`` (an input or a parameter is a
  tracer) and while `invnet.compile` traces, the method runs as written, as it always did.
* A model with a layer that initialises itself from its first batch (an `invnet.ActNorm`
  that has not seen data: ``node.not_ready()`` is not None) runs as written, so that the
  initialisation is kept; later calls are compiled.
* Under ``jax.disable_jit()`` the methods run op by op, as written.
* Opt-out for debugging (prints, breakpoints, op-by-op errors): ``with invnet.eager(): ...``,
  or the environment variable ``INVNET_EAGER=1`` for the whole process.

Per-call cost: a check that the model's structure is unchanged (one dict comparison per
module, in C), a read of each variable's array, and ``jax.jit``'s own dispatch (measured by
``benchmarks/run.py --only layers``: within the noise of a hand-jitted call on a tiny flow,
CPU). A structural change (a replaced layer or variable, a new precision) is seen by that
check and the model is re-split.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import weakref
from collections.abc import Callable
from typing import Any

import jax
from flax import nnx

__all__ = ["eager", "eager_mode", "call", "AS_WRITTEN"]

AS_WRITTEN = object()  # returned by `call` when the method must run as written

_EAGER: contextvars.ContextVar[bool] = contextvars.ContextVar("invnet_eager", default=False)
# True while a dispatched function runs (traces, or runs op by op under jax.disable_jit):
# the model's methods called from there run as written instead of dispatching again
_INSIDE: contextvars.ContextVar[bool] = contextvars.ContextVar("invnet_inside", default=False)


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
    token = _EAGER.set(True)
    try:
        yield
    finally:
        _EAGER.reset(token)


def eager_mode() -> bool:
    """True inside `eager` or when the environment sets ``INVNET_EAGER`` (not ``0``)."""
    return _EAGER.get() or os.environ.get("INVNET_EAGER", "0") not in ("", "0")


class _Snapshot:
    """How one model instance splits: its graph definition, its variables in leaf order,
    and each module's attributes (to see structural changes), taken by one ``nnx.split``."""

    __slots__ = ("root_items", "modules", "variables", "functions", "__weakref__")

    def __init__(self, model):
        graphdef, state = nnx.split(model)
        self.variables = jax.tree.leaves(state, is_leaf=lambda v: isinstance(v, nnx.Variable))
        treedef = jax.tree.structure(state)
        self.root_items = dict(vars(model))
        # each module's attribute dict and a copy of it; every module but the root (a strong
        # reference to the root would keep it alive in the cache)
        self.modules = [
            (vars(node), dict(vars(node)))
            for path, node in nnx.iter_graph(model)
            if path and isinstance(node, nnx.Pytree)
        ]
        self.functions = _functions_for(graphdef, treedef)

    def current(self, model) -> bool:
        """Whether the model still has the structure this snapshot was taken from."""
        try:
            if vars(model) != self.root_items:
                return False
            for attributes, copy in self.modules:  # dict ==: identity first, in C
                if attributes != copy:
                    return False
            return True
        except Exception:  # noqa: BLE001 - an attribute that cannot be compared: re-split
            return False


# (graphdef, treedef) -> {(fn, statics): jitted}; shared by models of the same structure
_FUNCTIONS: dict[Any, dict[Any, Callable]] = {}
_SNAPSHOTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _functions_for(graphdef, treedef) -> dict:
    key = (graphdef, treedef)
    table = _FUNCTIONS.get(key)
    if table is None:
        table = _FUNCTIONS[key] = {"structure": key}
    return table


def _jitted(table: dict, fn: Callable, statics: tuple) -> Callable:
    found = table.get((fn, statics))
    if found is None:
        graphdef, treedef = table["structure"]
        kwargs = dict(statics)

        def run(leaves, args):
            token = _INSIDE.set(True)
            try:
                model = nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))
                return fn(model, *args, **kwargs)
            finally:
                _INSIDE.reset(token)

        found = table[(fn, statics)] = jax.jit(run)
    return found


def call(fn: Callable, model, args: tuple, statics: tuple = ()) -> Any:
    """``fn(model, *args, **dict(statics))`` as a cached jitted function of the model's
    current variables, or `AS_WRITTEN` when it must run as written (eager mode, inside a
    trace, under ``jax.disable_jit()``, or a layer waiting for its data-dependent
    initialisation).

    ``fn`` is a module-level function (it is part of the cache key); ``args`` are arrays,
    scalars or ``None``; ``statics`` are hashable ``(name, value)`` pairs.
    """
    from invnet.core import nodes, prepared_active

    if eager_mode() or prepared_active() or _INSIDE.get() or jax.config.jax_disable_jit:
        return AS_WRITTEN
    for a in args:
        if isinstance(a, jax.core.Tracer):
            return AS_WRITTEN
    for node in nodes(model):
        if node.not_ready() is not None:
            return AS_WRITTEN
    snap = _SNAPSHOTS.get(model)
    if snap is None or not snap.current(model):
        snap = _SNAPSHOTS[model] = _Snapshot(model)
    leaves = [v.get_raw_value() for v in snap.variables]
    for a in leaves:
        if isinstance(a, jax.core.Tracer):  # the model's variables are traced (nnx.grad, ...)
            return AS_WRITTEN
    return _jitted(snap.functions, fn, statics)(leaves, args)


# ----------------------------------------------------- the functions the methods compile
def forward(model, x, cond, **kwargs):
    return model.forward(x, cond=cond, **kwargs)


def inverse(model, y, cond, **kwargs):
    return model.inverse(y, cond=cond, **kwargs)


def apply(model, x, cond):
    return model.forward(x, cond=cond)[0]
