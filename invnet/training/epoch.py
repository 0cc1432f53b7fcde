"""One epoch of `invnet.fit`: a jitted ``lax.scan`` over the optimizer steps, and its cache.

A step applies its update only when the loss, every gradient and the *result* (new
parameters and optimizer state) are finite: a finite gradient can still give a non-finite
update (``optax.adam(eps=0.0)`` on a zero gradient, a NaN learning rate), and such a step
is counted as not applied like any other.

The jitted epoch and evaluation functions are kept in a small cache keyed on what they are
traced from: the model's graph definition (its structure, not its parameters), the
objective, the optimizer, the batch size, the non-finite policy and the placement. A second
`invnet.fit` of the same structure reuses them, and ``jax.jit``'s own cache (keyed on the
argument shapes and dtypes) reuses the compiled code: no retrace, no recompile. Objectives
and optimizers compare by value where they define it (`invnet.MaximumLikelihood()` equals
any other), else by identity: pass the same optimizer object to reuse its compilation (the
default ``optax.adam(learning_rate)`` is built once per learning rate). As with any
``jax.jit``, Python values an objective reads from outside (globals, closed-over
variables) are fixed when it is traced; `clear_cache` forgets every trace. The cache holds
at most 32 entries (least recently used dropped).
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from collections.abc import Callable, Hashable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

_CACHE_SIZE = 32
_cache: OrderedDict[Hashable, Callable] = OrderedDict()


def clear_cache() -> None:
    """Forget every cached epoch and evaluation function (they then retrace)."""
    _cache.clear()


def _cached(key: tuple, build: Callable[[], Callable]) -> Callable:
    try:
        hash(key)
    except TypeError:  # an unhashable objective or optimizer: build afresh, as before
        return build()
    if key in _cache:
        _cache.move_to_end(key)
        return _cache[key]
    _cache[key] = fn = build()
    while len(_cache) > _CACHE_SIZE:
        _cache.popitem(last=False)
    return fn


def default_optimizer(learning_rate) -> optax.GradientTransformation:
    """``optax.adam(learning_rate)``, the same object for the same (hashable) rate."""
    try:
        return _adam(learning_rate)
    except TypeError:  # e.g. a jax array as the rate
        return optax.adam(learning_rate)


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _adam(learning_rate) -> optax.GradientTransformation:
    return optax.adam(learning_rate)


def _placement_key(placement) -> tuple:
    return type(placement), getattr(placement, "mesh", None)


def all_finite(tree) -> jax.Array:
    """Whether every float leaf of ``tree`` is finite (integer counters always are)."""
    leaves = [
        jnp.all(jnp.isfinite(a))
        for a in jax.tree.leaves(tree)
        if jnp.issubdtype(jnp.asarray(a).dtype, jnp.inexact)
    ]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def _select(pred, on_true, on_false):
    return jax.tree.map(lambda a, b: jnp.where(pred, a, b), on_true, on_false)


def _make_epoch_fn(graphdef, objective, tx, batch_size: int, halt_on_nonfinite: bool, placement):
    """A jitted function running one epoch of optimizer steps with ``lax.scan``."""

    def step(carry, inputs):
        params, opt_state, rest, halted = carry
        batch, key = inputs

        def loss_fn(p):
            return objective(nnx.merge(graphdef, p, rest, copy=True), batch, key)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        # the optimizer is optax's code (or the user's), not invnet's: optax's adam mixes a
        # weak float with an int32 step count (``b1 ** count``), which a test suite or a user
        # running with jax_numpy_dtype_promotion="strict" would refuse; the model's own
        # computation above stays under whatever promotion mode the caller set
        with jax.numpy_dtype_promotion("standard"):
            updates, new_opt_state = tx.update(grads, opt_state, params)
            new_params = optax.apply_updates(params, updates)
        finite = jnp.isfinite(loss) & all_finite(grads)
        finite = finite & all_finite(new_params) & all_finite(new_opt_state)
        apply = finite & ~halted
        params = _select(apply, new_params, params)
        opt_state = _select(apply, new_opt_state, opt_state)
        if halt_on_nonfinite:
            halted = halted | ~finite
        return (params, opt_state, rest, halted), (loss, finite)

    @jax.jit
    def run_epoch(params, opt_state, rest, data, order, keys):
        n_steps = keys.shape[0]
        batches = jax.tree.map(lambda a: a[order].reshape(n_steps, batch_size, *a.shape[1:]), data)
        batches = placement.batches(batches)
        carry = (params, opt_state, rest, jnp.asarray(False))
        (params, opt_state, _, _), (losses, finite) = jax.lax.scan(step, carry, (batches, keys))
        return params, opt_state, losses, finite

    return run_epoch


def epoch_fn(graphdef, objective, tx, batch_size: int, halt_on_nonfinite: bool, placement):
    """The jitted epoch for this structure, from the cache when it was built before."""
    key = ("epoch", graphdef, objective, tx, batch_size, halt_on_nonfinite)
    key += _placement_key(placement)
    return _cached(
        key,
        lambda: _make_epoch_fn(graphdef, objective, tx, batch_size, halt_on_nonfinite, placement),
    )


def eval_fn(graphdef, objective):
    """The jitted ``objective(model, batch, key)`` for this structure, cached like the epoch."""

    def build():
        @jax.jit
        def evaluate(params, rest, batch, key):
            return objective(nnx.merge(graphdef, params, rest), batch, key)

        return evaluate

    return _cached(("eval", graphdef, objective), build)


class Epochs:
    """Runs `invnet.fit`'s epochs on a `TrainState`: the data placed once, the jitted
    epoch and evaluation functions from the cache."""

    def __init__(self, graphdef, prepared, tx, placement, *, shuffle: bool, halt: bool,
                 eval_batch_size: int, val_key):  # fmt: skip
        self.prepared, self.placement, self.shuffle = prepared, placement, shuffle
        self.eval_batch_size = eval_batch_size
        self.train = placement.data(prepared.train)
        self.val = placement.data(prepared.val) if prepared.val is not None else None
        self.val_key = placement.state(val_key)
        objective, batch_size = prepared.objective, prepared.batch_size
        self.run_epoch = epoch_fn(graphdef, objective, tx, batch_size, halt, placement)
        self.evaluate = eval_fn(graphdef, objective)

    def run(self, state) -> tuple[np.ndarray, np.ndarray, float | None]:
        """One epoch on ``state`` (its key, parameters and optimizer state move on);
        returns the steps' losses, whether each was finite, and the validation loss."""
        p, placement = self.prepared, self.placement
        state.key, order, keys = draw_epoch(
            state.key, p.n_train, p.steps_per_epoch, p.batch_size, self.shuffle
        )
        order, keys = placement.state((order, keys))
        state.params, state.opt_state, losses, finite = self.run_epoch(
            state.params, state.opt_state, state.rest, self.train, order, keys
        )
        losses, finite = np.asarray(placement.host(losses)), np.asarray(placement.host(finite))
        if self.val is None:
            return losses, finite, None
        val_loss = validation_loss(self.evaluate, state.params, state.rest, self.val,
                                   self.val_key, self.eval_batch_size, placement)  # fmt: skip
        return losses, finite, val_loss


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
