"""One epoch of `invnet.fit`: a training step compiled once, looped from Python, and its cache.

Why a step and not a scanned epoch: XLA compiles a ``lax.scan`` of the step (with its
non-finite guard) several times slower than the step alone, and the user waits for that
before the first epoch shows any progress (a small Glow: minutes against seconds). The
step is one ``jax.jit`` call per batch; JAX dispatches it asynchronously, so the Python
loop runs ahead of the computation and costs nothing on models whose step takes more than
a fraction of a millisecond. The epoch's row order and step keys are drawn once per epoch
on the device; each step slices its batch from them (no host transfer per step).

The non-finite guard is cheap: one scalar says whether the loss, the gradients and the
update (the change the optimizer proposes) are all finite (a finite gradient can still give
a non-finite update: ``optax.adam(eps=0.0)`` on a zero gradient, a NaN learning rate); a
single ``lax.cond`` then keeps either the new or the old parameters and optimizer state.
With ``halt`` (``on_nonfinite`` "stop"/"raise") a device flag set by the first non-finite
step turns every later step of the epoch into a no-op, without a host round trip.

The default optimizer is ``optax.adam`` with its learning rate *in the optimizer state*
(``optax.inject_hyperparams``): a new learning rate reuses the compiled step.

The jitted step and evaluation functions are kept in a small cache keyed on what they are
traced from: the model's graph definition (its structure, not its parameters), the
objective, the optimizer, the batch size, the non-finite policy and the placement. A second
`invnet.fit` of the same structure reuses them, and ``jax.jit``'s own cache (keyed on the
argument shapes and dtypes) reuses the compiled code: no retrace, no recompile. Objectives
and optimizers compare by value where they define it (`invnet.MaximumLikelihood()` equals
any other), else by identity: pass the same optimizer object to reuse its compilation. As
with any ``jax.jit``, Python values an objective reads from outside (globals, closed-over
variables) are fixed when it is traced; `clear_cache` forgets every trace. They live in the
runtime's one bounded cache of compiled functions (`invnet._runtime.cached`).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from invnet import _runtime


def clear_cache() -> None:
    """Forget every cached step and evaluation function (they then retrace): the runtime's
    one cache of compiled functions (`invnet._runtime.clear_cache`)."""
    _runtime.clear_cache()


_cached = _runtime.cached


def default_optimizer(learning_rate, params=None) -> optax.GradientTransformation:
    """``optax.adam(learning_rate)``. For a plain number the rate lives in the optimizer
    state (`set_learning_rate` writes it after ``init``) and the transformation is one
    object per parameter dtype, so a new rate does not recompile the step. The rate's
    dtype is the narrowest float dtype of ``params`` (a float32 model keeps float32
    updates, as with a Python float rate)."""
    if not injects(learning_rate):
        return optax.adam(learning_rate)  # a schedule, an array: as given
    return _injected_adam(_rate_dtype(params))


def injects(learning_rate) -> bool:
    """Whether `default_optimizer` keeps this rate in the optimizer state."""
    return isinstance(learning_rate, int | float) and not isinstance(learning_rate, bool)


def _rate_dtype(params) -> str | None:
    dtypes = [jnp.dtype(a.dtype) for a in jax.tree.leaves(params)
              if jnp.issubdtype(a.dtype, jnp.floating)]  # fmt: skip
    return min(dtypes, key=lambda d: d.itemsize).name if dtypes else None


@functools.lru_cache(maxsize=8)
def _injected_adam(dtype: str | None) -> optax.GradientTransformation:
    return optax.inject_hyperparams(optax.adam, hyperparam_dtype=dtype)(learning_rate=1e-3)


def set_learning_rate(opt_state, learning_rate):
    """The state of a `default_optimizer` with ``learning_rate`` written in."""
    hyper = dict(opt_state.hyperparams)
    hyper["learning_rate"] = jnp.asarray(learning_rate, hyper["learning_rate"].dtype)
    return opt_state._replace(hyperparams=hyper)


def _placement_key(placement) -> tuple:
    return type(placement), getattr(placement, "mesh", None)


def finite_scalar(*trees) -> jax.Array:
    """One boolean scalar: whether every float leaf of ``trees`` is finite.

    ``sum(a * 0)`` over the leaves is 0 for finite values and NaN as soon as one value is
    NaN or infinite; it cannot overflow (a sum of squares would, for huge finite values).
    """
    leaves = [jnp.asarray(a) for a in jax.tree.leaves(trees)]
    floats = [a for a in leaves if jnp.issubdtype(a.dtype, jnp.inexact)]
    total = [jnp.sum(a * 0).astype(jnp.float32) for a in floats]
    return jnp.isfinite(functools.reduce(jnp.add, total)) if total else jnp.asarray(True)


class Carry(NamedTuple):
    """What one step hands the next: the leaves of (parameters, optimizer state), flat,
    and the halt flag. Flat lists cross the ``jax.jit`` boundary several times faster than
    ``nnx.State`` trees (whose flattening runs Python per node): the state is flattened
    once per epoch, not once per step."""

    leaves: list
    halted: jax.Array


class Defs(NamedTuple):
    """The tree structures of the parameters, the optimizer state and the buffers."""

    params: Any
    opt_state: Any
    rest: Any

    def state(self, leaves):
        """``(params, opt_state)`` from the carry's flat leaves."""
        n = self.params.num_leaves
        return self.params.unflatten(leaves[:n]), self.opt_state.unflatten(leaves[n:])


def _make_step_fn(graphdef, objective, tx, batch_size: int, halt_on_nonfinite: bool, placement):
    """A jitted optimizer step on batch ``i`` of an epoch's row order."""

    @functools.partial(jax.jit, static_argnums=0)
    def step(defs: Defs, carry: Carry, rest_leaves, data, order, keys, i):
        params, opt_state = defs.state(carry.leaves)
        rest = defs.rest.unflatten(rest_leaves)
        rows = jax.lax.dynamic_slice_in_dim(order, i * batch_size, batch_size)
        batch = placement.batch(jax.tree.map(lambda a: a[rows], data))

        def loss_fn(p):
            return objective(nnx.merge(graphdef, p, rest, copy=True), batch, keys[i])

        loss, grads = jax.value_and_grad(loss_fn)(params)
        # the optimizer is optax's code (or the user's), not invnet's: optax's adam mixes a
        # weak float with an int32 step count (``b1 ** count``), which a test suite or a user
        # running with jax_numpy_dtype_promotion="strict" would refuse; the model's own
        # computation above stays under whatever promotion mode the caller set
        with jax.numpy_dtype_promotion("standard"):
            updates, new_opt_state = tx.update(grads, opt_state, params)
            new_params = optax.apply_updates(params, updates)
        finite = jnp.isfinite(loss) & finite_scalar(grads, updates)
        params, opt_state = jax.lax.cond(
            finite & ~carry.halted,
            lambda: (new_params, new_opt_state),
            lambda: (params, opt_state),
        )
        halted = carry.halted | ~finite if halt_on_nonfinite else carry.halted
        leaves = defs.params.flatten_up_to(params) + defs.opt_state.flatten_up_to(opt_state)
        return Carry(leaves, halted), loss, finite

    return step


def step_fn(graphdef, objective, tx, batch_size: int, halt_on_nonfinite: bool, placement):
    """The jitted step for this structure, from the cache when it was built before."""
    key = ("step", graphdef, objective, tx, batch_size, halt_on_nonfinite)
    key += _placement_key(placement)
    return _cached(
        key,
        lambda: _make_step_fn(graphdef, objective, tx, batch_size, halt_on_nonfinite, placement),
    )


def eval_fn(graphdef, objective):
    """The jitted ``objective(model, batch, key)`` for this structure, cached like the step."""

    def build():
        @jax.jit
        def evaluate(params, rest, batch, key):
            return objective(nnx.merge(graphdef, params, rest), batch, key)

        return evaluate

    return _cached(("eval", graphdef, objective), build)


class Interrupted(Exception):
    """Raised by `Epochs.run` in place of a ``KeyboardInterrupt`` inside an epoch: ``state``
    already holds the last completed step; ``losses``/``finite`` are that epoch's steps so far."""

    def __init__(self, losses: np.ndarray, finite: np.ndarray, epoch_key):
        super().__init__("interrupted")
        self.losses, self.finite, self.epoch_key = losses, finite, epoch_key


class Epochs:
    """Runs `invnet.fit`'s epochs on a `TrainState`: the data placed once, the jitted step
    and evaluation functions from the cache."""

    def __init__(self, graphdef, prepared, tx, placement, *, shuffle: bool, halt: bool,
                 eval_batch_size: int, val_key):  # fmt: skip
        self.prepared, self.placement, self.shuffle = prepared, placement, shuffle
        self.eval_batch_size = eval_batch_size
        self.train = placement.data(prepared.train)
        self.val = placement.data(prepared.val) if prepared.val is not None else None
        self.val_key = placement.state(val_key)
        objective, batch_size = prepared.objective, prepared.batch_size
        self.step = step_fn(graphdef, objective, tx, batch_size, halt, placement)
        self.evaluate = eval_fn(graphdef, objective)
        self.first_call_seconds: float | None = None  # trace + compile (+ dispatch)

    def run(self, state, on_compile: Callable | None = None, guard=None):
        """One epoch on ``state`` (its key, parameters and optimizer state move on);
        returns the steps' losses, whether each was finite, and the validation loss.

        ``on_compile(True)`` is called before the first step of the first epoch (which
        compiles, unless cached), ``on_compile(False)`` after it. A ``KeyboardInterrupt``
        between steps becomes `Interrupted`, with ``state`` at the last completed step.
        With a ``guard`` (`invnet.training.interrupts.Guard`), an interrupt arriving after
        the epoch's last step is held until ``guard.settle()``, once the caller has
        recorded the epoch."""
        p, placement = self.prepared, self.placement
        epoch_key = state.key
        state.key, order, keys = draw_epoch(
            state.key, p.n_train, p.steps_per_epoch, p.batch_size, self.shuffle
        )
        order, keys = placement.state((order, keys))
        outs = []  # (carry, loss, finite) per step; appended whole, so never half a step
        defs = Defs(*(jax.tree.structure(t) for t in (state.params, state.opt_state, state.rest)))
        leaves = jax.tree.leaves(state.params) + jax.tree.leaves(state.opt_state)
        carry = Carry(leaves, placement.state(jnp.asarray(False)))
        args = (jax.tree.leaves(state.rest), self.train, order, keys)
        ahead = placement.max_in_flight
        try:
            for i in range(p.steps_per_epoch):
                if self.first_call_seconds is None:
                    outs.append(self._first_step(defs, carry, args, on_compile))
                else:
                    outs.append(self.step(defs, carry, *args, i))
                if ahead is not None and len(outs) > ahead:
                    jax.block_until_ready(outs[-1 - ahead])
                carry = outs[-1][0]
            losses, finite = self._host(outs)  # waits for the steps: a Ctrl-C may land here
            self._take(state, defs, outs)
            val_loss = self._validation_loss(state.params, state.rest)
            if guard is not None:  # from here until the epoch is recorded, Ctrl-C waits
                guard.critical()
        except (KeyboardInterrupt, jax.errors.JaxRuntimeError) as err:
            if not _is_interrupt(err):
                raise
            self._take(state, defs, outs)
            losses, finite = self._host(outs)
            raise Interrupted(losses, finite, epoch_key) from None
        return losses, finite, val_loss

    def _validation_loss(self, params, rest) -> float | None:
        if self.val is None:
            return None
        return validation_loss(self.evaluate, params, rest, self.val, self.val_key,
                               self.eval_batch_size, self.placement)  # fmt: skip

    def _first_step(self, defs, carry, args, on_compile):
        if on_compile is not None:
            on_compile(True)
        t0 = time.perf_counter()
        out = self.step(defs, carry, *args, 0)  # returns once compiled
        self.first_call_seconds = time.perf_counter() - t0
        if on_compile is not None:
            on_compile(False)
        return out

    def _take(self, state, defs, outs) -> None:
        if outs:
            state.params, state.opt_state = defs.state(outs[-1][0].leaves)

    def _host(self, outs) -> tuple[np.ndarray, np.ndarray]:
        if not outs:
            return np.zeros(0, np.float32), np.zeros(0, bool)
        losses = self.placement.host(jnp.stack([o[1] for o in outs]))
        finite = self.placement.host(jnp.stack([o[2] for o in outs]))
        return np.asarray(losses), np.asarray(finite)


def _is_interrupt(err: BaseException) -> bool:
    """A Ctrl-C, also one that landed inside a host callback of the step (a
    ``jax.debug.print`` in the objective): JAX reports that one as a runtime error."""
    return isinstance(err, KeyboardInterrupt) or "KeyboardInterrupt" in str(err)


def draw_epoch(key, n_train: int, steps: int, batch_size: int, shuffle: bool):
    """``(key, order, keys)``: the next key, the epoch's row order and its per-step keys."""
    key, k_perm, k_steps = jax.random.split(key, 3)
    if shuffle:
        order = jax.random.permutation(k_perm, n_train)[: steps * batch_size]
    else:
        order = jnp.arange(steps * batch_size)
    return key, order, jax.random.split(k_steps, steps)


def validation_loss(evaluate, params, rest, val, key, chunk: int, placement) -> float:
    """The objective on ``val`` in chunks of ``chunk`` rows, weighted by rows."""
    n = val["x"].shape[0]
    total = 0.0
    for start in range(0, n, chunk):
        part = {k: v[start : start + chunk] for k, v in val.items()}
        rows = part["x"].shape[0]
        total += float(placement.host(evaluate(params, rest, part, key))) * rows
    return total / n
