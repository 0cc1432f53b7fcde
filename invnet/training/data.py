"""`invnet.fit`'s data preparation: checked arrays, the objective, the split, the batches.

Everything here runs once, before training, and raises a ``ValueError`` that says what to
do for data that cannot be trained on: rows that disagree, a ``cond`` for a model without
a conditional layer (or none for a conditional one), a ``y`` that fits no objective, a
batch larger than the training set.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from invnet.core import Bijector
from invnet.objectives import InverseProblem, MaximumLikelihood, Regression
from invnet.parallel import AXIS


@dataclass
class TrainingData:
    """The prepared arrays of one `invnet.fit` call (``val`` is ``None`` without validation)."""

    train: dict[str, jax.Array]
    val: dict[str, jax.Array] | None
    objective: Callable
    batch_size: int
    key: jax.Array  # what is left of the caller's key after the validation split

    @property
    def n_train(self) -> int:
        return self.train["x"].shape[0]

    @property
    def steps_per_epoch(self) -> int:
        return self.n_train // self.batch_size


def as_key(key) -> jax.Array:
    """An int seed, a new-style key or a raw uint32 key, as a new-style PRNG key."""
    if key is None:
        return jax.random.key(0)
    if isinstance(key, int | np.integer):
        return jax.random.key(int(key))
    if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):  # a raw uint32 key
        return jax.random.wrap_key_data(key)
    return key


def collect(x, y, cond) -> dict[str, jax.Array]:
    """``{"x", "y", "cond"}`` (the ones given) as arrays with one row per sample."""
    data = {"x": jnp.asarray(x)}
    if y is not None:
        data["y"] = jnp.asarray(y)
    if cond is not None:
        data["cond"] = jnp.asarray(cond)
    n = data["x"].shape[0]
    for name, arr in data.items():
        if arr.ndim < 1 or arr.shape[0] != n:
            raise ValueError(
                f"invnet.fit: {name} has {arr.shape[0] if arr.ndim else 0} rows, x has {n}; "
                "every array needs one row per sample"
            )
    return data


def check_cond(model: Bijector, data: dict[str, jax.Array]) -> None:
    """A ``cond`` exactly when the model is conditional, of width ``model.cond_dim``."""
    name = type(model).__name__
    if "cond" in data and model.cond_dim == 0:
        width = data["cond"].shape[-1] if data["cond"].ndim > 1 else 1
        raise ValueError(
            f"invnet.fit: cond was given but the model ({name}) has no conditional layer "
            f"(cond_dim=0), so it would be ignored and the flow trained unconditionally. Build "
            f"its coupling layers with cond_dim={width} (the width of your cond) to train a "
            "conditional model, or drop cond"
        )
    if "cond" not in data and model.cond_dim > 0:
        raise ValueError(
            f"invnet.fit: the model ({name}) is conditional (cond_dim={model.cond_dim}); pass "
            f"cond=array of shape (len(x), {model.cond_dim})"
        )
    if "cond" in data and data["cond"].shape[1:] != (model.cond_dim,):
        raise ValueError(
            f"invnet.fit: cond has shape {tuple(data['cond'].shape)}, the model expects "
            f"(len(x), {model.cond_dim}) (its cond_dim)"
        )


def choose_objective(objective: Callable | None, data: dict[str, jax.Array]) -> Callable:
    """The objective given, else the one the data implies, never guessed from ``y``'s width.

    Without ``y``: `MaximumLikelihood`. With ``y`` of ``x``'s shape: `Regression`. Any other
    ``y`` needs an explicit objective (``InverseProblem(y_dim)`` for ``x -> [y, z]``).
    """
    if "y" not in data:
        return objective if objective is not None else MaximumLikelihood()
    x_event, y_event = tuple(data["x"].shape[1:]), tuple(data["y"].shape[1:])
    same = y_event == x_event
    if objective is None and same:
        return Regression()
    if objective is None or (isinstance(objective, Regression) and not same):
        x_dim = x_event[-1] if x_event else 1
        wider = int(np.prod(y_event)) > int(np.prod(x_event))
        note = " (a bijection cannot map x to more numbers than it has)" if wider else ""
        raise ValueError(
            f"invnet.fit: y has shape {tuple(data['y'].shape)} and x "
            f"{tuple(data['x'].shape)}{note}. Bijective regression x -> y (objective="
            f"invnet.Regression(), the default with y) needs y of x's shape, {x_event} per "
            "row; an inverse problem x -> [y, z] needs objective=invnet.InverseProblem(y_dim=k) "
            f"with y of shape (len(x), k), 1 <= k < {x_dim}"
        )
    if isinstance(objective, InverseProblem) and y_event != (objective.y_dim,):
        raise ValueError(
            f"invnet.fit: InverseProblem(y_dim={objective.y_dim}) needs y of shape "
            f"(len(x), {objective.y_dim}), got {tuple(data['y'].shape)}"
        )
    return objective


def split_validation(data, val_data, val_fraction: float, key):
    """``(train, val, key)``: ``val_data`` checked, or ``val_fraction`` of the rows held out."""
    if val_data is None and val_fraction > 0:
        n = data["x"].shape[0]
        n_val = max(1, int(round(val_fraction * n)))
        key, k_split = jax.random.split(key)
        perm = jax.random.permutation(k_split, n)
        val = {k: v[perm[:n_val]] for k, v in data.items()}
        return {k: v[perm[n_val:]] for k, v in data.items()}, val, key
    if val_data is None:
        return data, None, key
    val = {k: jnp.asarray(v) for k, v in val_data.items() if v is not None}
    missing = set(data) - set(val)
    if missing:
        raise ValueError(f"invnet.fit: the validation dict lacks {sorted(missing)}")
    return data, val, key


def check_batch_size(batch_size: int, n_train: int, devices: int) -> None:
    """Full batches only: ``1 <= batch_size <= n_train``, a multiple of the devices."""
    if n_train == 0:
        raise ValueError("invnet.fit: no training rows")
    if batch_size > n_train:
        raise ValueError(
            f"invnet.fit: batch_size {batch_size} is larger than the {n_train} training rows "
            "(after any validation split), so an epoch would have no full batch; use "
            f"batch_size <= {n_train}"
        )
    if batch_size % devices:
        d = devices
        lower, upper = batch_size - batch_size % d, batch_size + d - batch_size % d
        raise ValueError(
            f"invnet.fit: batch_size {batch_size} is not divisible by the {d} devices of the "
            f"mesh's {AXIS!r} axis; use a multiple of {d} (e.g. {lower or upper} or {upper})"
        )


def prepare(model: Bijector, x, y, cond, *, objective, val_data, val_fraction, batch_size,
            key, devices: int) -> TrainingData:  # fmt: skip
    """Check and arrange `invnet.fit`'s data; raises before any training happens."""
    data = collect(x, y, cond)
    check_cond(model, data)
    objective = choose_objective(objective, data)
    train, val, key = split_validation(data, val_data, val_fraction, as_key(key))
    check_batch_size(batch_size, train["x"].shape[0], devices)
    return TrainingData(train, val, objective, batch_size, key)
