"""Fast inference: a model turned into pure jitted functions with precomputed inverses.

``invnet.freeze(model)`` returns a `Compiled` object. It snapshots the model's state,
precomputes from it what can be precomputed, and jit-compiles pure functions of that
snapshot for both directions. Each direction's matrices are formed when it is first called
(the forward needs ``W``, the inverse ``W^{-1}``), so a model only ever inverted never
forms ``W``:

* `LULinear`: the dense ``W = P L U`` and its explicit inverse ``W^{-1} = U^{-1} L^{-1} P^T``,
  both formed in float64 on the host from the layer's (float32 or float64) factors (BLAS
  ``trmm`` for ``W``, two ``trsm`` for ``W^{-1}``: 1.5 D^3 multiply-adds in all) and then
  rounded once to the parameter dtype. Forward and inverse are then one GEMM each, so the
  inverse costs exactly what the forward costs. The model's own ``inverse`` uses the same
  precomputed ``W^{-1}`` (kept per parameter version by the runtime). ``lu_inverse``
  chooses the inverse:

  - ``"matrix"`` (default): ``x = (y - b) W^{-1 T}``: one GEMM.
  - ``"matrix+refine"``: the above plus one step of iterative refinement
    ``x <- x + W^{-1}(y - b - W x)``: three GEMMs; removes the error of the rounded
    inverse matrix, so ill-conditioned layers come back about as accurately as with solves.
  - ``"solve"``: the layer's own inverse as written (triangular solves, or for batches of
    at least D/16 rows ``W^{-1}`` formed in the call by GEMMs; what the model's methods run
    inside a user's ``jax.jit`` or under ``invnet.eager()``).

* every other layer (couplings, activations, permutations, ActNorm) runs as written; the
  containers `Sequential` and `Inverse` are walked so LULinear layers nested in them are
  replaced too.

Matrix products run at each layer's precision (``invnet.set_precision(model, mode)``,
see `invnet.PRECISIONS`), exactly as the eager layers do.

Never stale: the object remembers which arrays the model held when it was built. Every call
checks (a Python identity test per variable, microseconds) that the model still holds the
same arrays and precision settings; after any change (an optimizer step, ``nnx.update``,
``set_precision``, loading a checkpoint) it raises `StaleCompiledError`. ``refresh()``
rebuilds the precomputed matrices from the current state without recompiling when shapes
are unchanged.

Inside your own ``jax.jit`` / ``vmap`` / ``grad``, a captured `Compiled` object would bake
its snapshot into that trace as constants, where no later check can see it go stale; so its
methods refuse to run there (`CompiledTraceError`). Use the pure form, which takes the
snapshot as an argument: ``fns, snapshot = fast.pure()`` and
``jax.jit(lambda s, x: fns.forward(s, x))(snapshot, x)``; after an update, ``fast.refresh()``
and ``fast.pure()`` give the new snapshot (same functions, no recompilation).

``fast.apply(x)`` / ``fast.apply_inverse(y)`` return ``y`` / ``x`` alone: XLA then drops
the log-det work, which for elementwise layers costs more than the map itself.

The module is ``invnet.compiled``; ``invnet.freeze`` is the function.

Accuracy of the LU inverse methods, measured (``python benchmarks/inverse_accuracy.py``:
float32 layer from ``W = Q1 diag(s) Q2^T``, D=256, batch 512, CPU, precision "highest";
relative error ``max|x_hat - x| / max|x|`` where ``y = W x + b`` was formed in float64 and
rounded to float32; the last column is a float64 solve of that same float32 ``y``, the
floor set by rounding ``y``):

================  ========  ========  =============  ================
condition number  solve     matrix    matrix+refine  f64 solve (floor)
================  ========  ========  =============  ================
1                 6.1e-06   6.2e-07   3.2e-07        3.6e-08
1e2               9.8e-06   3.5e-06   4.4e-06        1.1e-06
1e4               2.1e-04   1.8e-04   2.3e-04        7.0e-05
1e6               1.6e-02   1.4e-02   1.7e-02        6.6e-03
================  ========  ========  =============  ================

All three track ``eps * cond`` within a small factor of the floor. The explicit inverse is
formed in float64 and rounded once, so it is *not* less accurate than float32 triangular
solves here: on well-conditioned layers it is 10x more accurate (the float32 solves
accumulate the rounding of L and U, whose own condition numbers exceed W's), and at
D=1024 the same holds (solve 2.7e-05, matrix 9.7e-07 at condition 1). One fixed-precision
refinement step gives no consistent gain at D=256 and about 2x at D=1024 on the worst
matrices (1.8e-02 vs 3.6e-02 at condition 1e6); it costs two more GEMMs. Use
``"matrix"`` by default, ``"matrix+refine"`` for ill-conditioned layers where every bit
counts, ``"solve"`` to reproduce the eager layer exactly.

Example:
    >>> import jax, jax.numpy as jnp, invnet
    >>> from flax import nnx
    >>> model = invnet.Sequential(invnet.LULinear(4, rngs=nnx.Rngs(0)), invnet.LeakyReLU(0.5))
    >>> fast = invnet.freeze(model)
    >>> x = jnp.ones((2, 4))
    >>> y, log_det = fast.forward(x)
    >>> x_back, _ = fast.inverse(y)
    >>> bool(jnp.allclose(x_back, x, atol=1e-5))
    True
    >>> fwd, inv = fast                       # or unpack into two functions
    >>> _ = nnx.update(model, jax.tree.map(lambda p: p * 1.1, nnx.state(model, nnx.Param)))
    >>> try:
    ...     fwd(x)                            # parameters changed: refused
    ... except invnet.StaleCompiledError:
    ...     print("stale")
    stale
    >>> fwd, inv = fast.refresh()             # rebuilt from the current parameters
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
from flax import nnx

from invnet import _runtime
from invnet.core import Bijector, nodes, using_prepared

__all__ = [
    "freeze",
    "compile",
    "Compiled",
    "CompiledTraceError",
    "PureFunctions",
    "StaleCompiledError",
    "LU_INVERSE_METHODS",
]

LU_INVERSE_METHODS = ("matrix", "matrix+refine", "solve")


class StaleCompiledError(RuntimeError):
    """A `Compiled` model was called after the model's parameters changed."""


def _check_platform(model: Bijector) -> None:
    precisions = {n.precision for n in nodes(model)}
    if "tf32x3" in precisions and jax.default_backend() != "gpu":
        raise ValueError(
            "precision 'tf32x3' needs an NVIDIA GPU (TF32 tensor cores); the default backend "
            f"here is {jax.default_backend()!r}. Use 'highest' (exact float32) or 'bf16x6' "
            "there: invnet.set_precision(model, 'highest')"
        )


class CompiledTraceError(RuntimeError):
    """A `Compiled` method was called inside a jax transformation (``jit``, ``vmap``,
    ``grad``): its snapshot would be baked into that trace as constants and go stale
    without a word after the next update. Use `Compiled.pure` there."""


_TRACE_MESSAGE = (
    "Compiled.{method} was called inside a jax transformation (jit, vmap, grad, scan): the "
    "snapshot of the parameters would be baked into that trace and silently go stale after "
    "the next update. Pass the snapshot as an argument instead: fns, snapshot = "
    "fast.pure(); jax.jit(lambda s, x: fns.{method}(s, x))(snapshot, x). Or call the model "
    "itself (model.forward / model.inverse), which traces as written"
)


class PureFunctions(NamedTuple):
    """The jitted pure functions of a `Compiled` model: each is ``f(snapshot, x, cond=None)``."""

    forward: Callable
    inverse: Callable
    log_det: Callable
    apply: Callable
    apply_inverse: Callable


def _pure_function(graphdef, treedef, direction: str, kind: str):
    """The pure function of ``direction`` on a flat snapshot of ``(state, tables)`` (``kind``
    "forward" or "inverse": the tables for that direction) or, for `Compiled.pure`,
    ``(state, (forward tables, inverse tables))`` (``kind`` "both")."""
    inverse = direction in ("inverse", "apply_inverse")

    def run(consts, x, cond=None):
        state, tables = jax.tree.unflatten(treedef, consts)
        if kind == "both":
            tables = tables[1 if inverse else 0]
        model = nnx.merge(graphdef, state)
        table = {id(n): e for n, e in zip(nodes(model), tables, strict=True) if e is not None}
        with using_prepared(table):
            if inverse:
                x, log_det = model.inverse(x, cond=cond)
                return x if direction == "apply_inverse" else (x, log_det)
            y, log_det = model.forward(x, cond=cond)
        return {"log_det": log_det, "apply": y}.get(direction, (y, log_det))

    return run


class Compiled:
    """Pure, jitted forward and inverse of a model with precomputed matrices.

    Build with `invnet.freeze`. Call ``forward(x, cond=None) -> (y, log_det)``,
    ``inverse(y, cond=None) -> (x, log_det)`` and ``log_det(x, cond=None)`` like the
    model's own methods; ``fwd, inv = compiled`` unpacks the two bound methods. Every call
    first checks that the model has not changed since the snapshot (else
    `StaleCompiledError`); ``refresh()`` re-snapshots.
    """

    def __init__(self, model: Bijector, *, lu_inverse: str = "matrix"):
        if not isinstance(model, Bijector):
            raise TypeError(f"compile: expected an invnet Bijector, got {type(model).__name__}")
        if lu_inverse not in LU_INVERSE_METHODS:
            raise ValueError(
                f"compile: lu_inverse must be one of {LU_INVERSE_METHODS}, got {lu_inverse!r}"
            )
        self.model = model
        self.lu_inverse = lu_inverse
        self.refresh()

    # ----------------------------------------------------------------------- snapshot
    def refresh(self) -> Compiled:
        """Re-snapshot the model's current state. The precomputed matrices are formed from
        it when a direction first needs them (``W`` for the forward, ``W^{-1}`` for the
        inverse of an `invnet.LULinear`), once per snapshot."""
        for node in nodes(self.model):
            problem = node.not_ready()
            if problem is not None:
                raise ValueError(f"compile: {problem}")
        _check_platform(self.model)
        self._graphdef, self._state = nnx.split(self.model)
        # the runtime's one staleness rule: same structure, same arrays in every variable;
        # the snapshot also keeps each direction's precomputed tables
        self._snap = _runtime.Snapshot(self.model)
        self._arrays = self._snap.arrays()
        self._consts: dict[str, tuple] = {}  # kind -> (treedef, flat list of arrays)
        return self

    def _tables(self, kind: str) -> list:
        """What each layer precomputes (None: runs as written), in the order of `nodes`."""
        return self._snap.prepared(self.model, self._arrays, kind, lu_inverse=self.lu_inverse)

    def _snapshot(self, kind: str) -> tuple:
        """``(treedef, flat arrays)`` of the state and the tables of ``kind`` ("forward",
        "inverse" or "both"), formed on first use: flattened once, so a call passes a flat
        list to jit instead of a nested State."""
        found = self._consts.get(kind)
        if found is None:
            if kind == "both":
                tables = (self._tables("forward"), self._tables("inverse"))
            else:
                tables = self._tables(kind)
            consts, treedef = jax.tree.flatten((self._state, tables))
            found = self._consts[kind] = (treedef, consts)
        return found

    def _check_fresh(self) -> None:
        # O(#modules + #variables) comparisons, no graph walk: a few microseconds per call;
        # where a variable holds a new array (nnx.jit writes them all back), its values
        if not self._snap.holds(self.model, self._arrays) and not (
            self._snap.current(self.model) and self._snap.adopt_equal(self._arrays)
        ):
            raise StaleCompiledError(
                "this compiled model was built from parameters that have since changed; "
                "call .refresh() (or invnet.freeze(model) again) to rebuild it"
            )

    # ------------------------------------------------------------------------- calls
    def _fn(self, direction: str, kind: str):
        # shared by every Compiled of the same structure; reused when only values changed
        graphdef, (treedef, _) = self._graphdef, self._snapshot(kind)
        key = ("compiled", graphdef, treedef, direction, kind)
        return _runtime.cached_jit(key, lambda: _pure_function(graphdef, treedef, direction, kind))

    def _call(self, direction: str, x, cond):
        if isinstance(x, jax.core.Tracer) or isinstance(cond, jax.core.Tracer):
            raise CompiledTraceError(_TRACE_MESSAGE.format(method=direction))
        self._check_fresh()
        kind = "inverse" if direction in ("inverse", "apply_inverse") else "forward"
        out = self._fn(direction, kind)(self._snapshot(kind)[1], x, cond)
        if isinstance(jax.tree.leaves(out)[0], jax.core.Tracer):  # inputs closed over by a trace
            raise CompiledTraceError(_TRACE_MESSAGE.format(method=direction))
        return out

    def forward(self, x, *, cond=None):
        """``(y, log_det)`` of the model at the snapshot, as one compiled call."""
        return self._call("forward", x, cond)

    def inverse(self, y, *, cond=None):
        """``(x, log_det)``: the exact inverse with the chosen ``lu_inverse`` method."""
        return self._call("inverse", y, cond)

    def log_det(self, x, *, cond=None):
        """Only the forward log-det (XLA drops work the log-det does not need)."""
        return self._call("log_det", x, cond)

    def apply(self, x, *, cond=None):
        """Only ``y = f(x)``, no log-det: the least work (for elementwise layers the
        log-det costs more than the map)."""
        return self._call("apply", x, cond)

    def apply_inverse(self, y, *, cond=None):
        """Only ``x = f^{-1}(y)``, no log-det."""
        return self._call("apply_inverse", y, cond)

    def pure(self) -> tuple[PureFunctions, list]:
        """``(functions, snapshot)`` for use inside your own ``jax.jit`` / ``vmap`` /
        ``grad``: each of ``functions.forward``, ``.inverse``, ``.log_det``, ``.apply``,
        ``.apply_inverse`` is a jitted pure function ``f(snapshot, x, cond=None)``, and
        ``snapshot`` (a list of arrays) is the model's state as of now. Pass the snapshot
        as an argument, never close over it; after the model changes call ``refresh()``
        and ``pure()`` again for a new snapshot (the functions stay the same and do not
        recompile). Raises `StaleCompiledError` if the model changed since the last
        ``refresh()``.
        """
        self._check_fresh()
        functions = PureFunctions(*(self._fn(d, "both") for d in PureFunctions._fields))
        return functions, list(self._snapshot("both")[1])

    def __iter__(self):
        return iter((self.forward, self.inverse))

    def __repr__(self) -> str:
        return f"Compiled({type(self.model).__name__}, lu_inverse={self.lu_inverse!r})"


def freeze(model: Bijector, *, lu_inverse: str = "matrix") -> Compiled:
    """Freeze ``model``'s current parameters into pure jitted forward/inverse functions: for
    use inside your own ``jax.jit`` (``fns, snapshot = frozen.pure()``), for the log-det-free
    ``apply`` / ``apply_inverse``, and to choose the LU inverse method.

    The model's own methods already run compiled, with the same precomputed inverses, and
    can never be stale; reach for ``freeze`` when you need pure functions of an explicit
    snapshot. Returns a `Compiled`: ``frozen.forward(x)``, ``frozen.inverse(y)``,
    ``frozen.log_det(x)``, or ``fwd, inv = invnet.freeze(model)``. ``lu_inverse`` is
    ``"matrix"`` (default, one GEMM), ``"matrix+refine"`` (one refinement step, for
    ill-conditioned layers) or ``"solve"`` (triangular solves). See the module docstring for
    the accuracy of each. Raises `StaleCompiledError` when called after the model's
    parameters changed (``refresh()`` rebuilds).
    """
    return Compiled(model, lu_inverse=lu_inverse)


def compile(model: Bijector, *, lu_inverse: str = "matrix") -> Compiled:  # noqa: A001
    """The former name of `freeze` (a ``DeprecationWarning``; same result)."""
    import warnings

    warnings.warn(
        "invnet.compile(model) is now invnet.freeze(model): the model's own methods already "
        "run compiled; freeze gives pure functions of a snapshot", DeprecationWarning,
        stacklevel=2,
    )  # fmt: skip
    return freeze(model, lu_inverse=lu_inverse)
