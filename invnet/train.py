"""`invnet.fit`: train any invnet model with optax.

One entry point covers the four jobs (the objective says which; see `invnet.objectives`):

==========================  ===============================  ==========================
job                          call                             objective (default)
==========================  ===============================  ==========================
density p(x)                 ``fit(flow, x)``                 `MaximumLikelihood`
conditional density p(x|c)   ``fit(flow, x, cond=c)``         `MaximumLikelihood`
bijective regression x -> y  ``fit(model, x, y)``, same size  `Regression`
inverse problem x -> [y, z]  ``fit(model, x, y)``, y smaller  `InverseProblem(y_dim)`
==========================  ===============================  ==========================

How a run goes: the model is split once (``nnx.split``) into its graph, its trainable
``nnx.Param`` state and the rest (buffers). Each epoch, the training set is shuffled with
an explicit key (``jax.random.permutation``), cut into full batches, and one jitted
function runs all of the epoch's optimizer steps in a ``jax.lax.scan`` (no Python per
step). A step whose loss or gradients are not finite is not applied: parameters and
optimizer state keep their last finite values; ``on_nonfinite`` says whether training then
goes on (``"skip"``), ends (``"stop"``) or raises (``"raise"``), and the history counts
them. After each epoch: the validation loss, early stopping, checkpoints with `invnet.save`.

Data parallelism is a placement question only: `_Placement` decides where the training
arrays and the state live. Without a mesh everything sits on the default device. With
``mesh=`` (see `invnet.data_mesh`) each batch is split along its batch axis over the mesh's
``"data"`` axis and the parameters, optimizer state and keys are replicated; the same jitted
epoch function runs unchanged and XLA inserts the gradient all-reduce (``jax.sharding``,
no hand-written communication).

Resuming: every checkpoint `fit` writes also holds its optimizer state, keys, epoch counter,
early-stopping counter, best parameters and history (see `invnet.resume`);
``fit(..., resume_from=path)`` with the original arguments continues that run and ends with
the parameters the uninterrupted run would have had.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from invnet import resume
from invnet.core import Bijector, nodes
from invnet.io import save
from invnet.layers.norm import data_init
from invnet.objectives import InverseProblem, MaximumLikelihood, Regression
from invnet.parallel import AXIS, data_mesh, replicate, to_host

__all__ = ["fit", "History", "NonFiniteStepWarning"]


class NonFiniteStepWarning(RuntimeWarning):
    """A training step had a non-finite loss or gradient and was not applied."""


@dataclass
class History:
    """What `invnet.fit` did, epoch by epoch.

    ``train_loss[e]``: mean loss of epoch ``e``'s applied (finite) steps. ``val_loss[e]``:
    the validation loss after epoch ``e`` (empty without validation data). ``best_epoch``
    and ``best_loss`` refer to the monitored loss (validation if given, else training).
    ``nonfinite_steps`` counts steps not applied; ``nonfinite_at`` lists their global step
    numbers (0-based). ``stop_reason`` is ``"epochs"``, ``"early_stopping"`` or
    ``"nonfinite"``. ``epoch_seconds[e]``: wall time of epoch ``e`` (the first includes
    compilation); ``seconds``: the whole call (after a resume: plus the earlier calls).
    """

    train_loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    epochs: int = 0
    steps: int = 0
    best_epoch: int | None = None
    best_loss: float | None = None
    stop_reason: str = "epochs"
    nonfinite_steps: int = 0
    nonfinite_at: list[int] = field(default_factory=list)
    checkpoints: list[str] = field(default_factory=list)
    epoch_seconds: list[float] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def stopped_early(self) -> bool:
        return self.stop_reason == "early_stopping"


class _Placement:
    """Where arrays live. Single device: where JAX puts them; nothing moves."""

    devices = 1

    def data(self, tree):  # the training and validation arrays
        return tree

    def state(self, tree):  # parameters, optimizer state, buffers, per-epoch order and keys
        return tree

    def batches(self, tree):  # inside the jitted epoch: the (steps, batch, ...) stacks
        return tree

    def host(self, tree):  # results to read back or keep in the model
        return tree


class _MeshPlacement(_Placement):
    """Data parallel over the ``"data"`` axis of ``mesh``.

    Every batch is split along its batch axis (``NamedSharding(mesh, P(None, "data"))`` on
    the stacked ``(steps, batch, ...)`` arrays, a sharding constraint inside the jitted
    epoch); everything else is replicated. The training set itself is replicated, so each
    device gathers its own rows of each shuffled batch without communication; the gradient
    mean over the batch becomes an all-reduce that XLA inserts.
    """

    def __init__(self, mesh: Mesh):
        self.mesh = mesh
        self.devices = mesh.shape[AXIS]
        self.batch_sharding = NamedSharding(mesh, PartitionSpec(None, AXIS))

    def data(self, tree):
        return replicate(tree, self.mesh)

    def state(self, tree):
        return replicate(tree, self.mesh)

    def batches(self, tree):
        return jax.lax.with_sharding_constraint(tree, self.batch_sharding)

    def host(self, tree):
        # one copy in this process, back on the default device, uncommitted
        return jax.tree.map(jnp.asarray, to_host(tree))


def _placement(mesh) -> _Placement:
    if mesh is None:
        return _Placement()
    if isinstance(mesh, str):
        if mesh != "all":
            raise ValueError(f'invnet.fit: mesh must be None, "all" or a jax Mesh, got {mesh!r}')
        mesh = data_mesh()
    if not isinstance(mesh, Mesh):
        raise TypeError(f"invnet.fit: mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    if AXIS not in mesh.axis_names:
        raise ValueError(
            f"invnet.fit: the mesh has axes {mesh.axis_names}, none named {AXIS!r}; "
            "build it with invnet.data_mesh()"
        )
    return _MeshPlacement(mesh)


def _as_key(key) -> jax.Array:
    if key is None:
        return jax.random.key(0)
    if isinstance(key, int | np.integer):
        return jax.random.key(int(key))
    if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):  # a raw uint32 key
        return jax.random.wrap_key_data(key)
    return key


def _collect(x, y, cond) -> dict[str, jax.Array]:
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


def _default_objective(model: Bijector, data: dict) -> Callable:
    if "y" not in data:
        return MaximumLikelihood()
    y_dim, x_dim = data["y"].shape[-1], data["x"].shape[-1]
    if y_dim == x_dim:
        return Regression()
    if y_dim < x_dim:
        return InverseProblem(y_dim=y_dim)
    raise ValueError(
        f"invnet.fit: y has {y_dim} features but x only {x_dim}; a bijection cannot map x "
        "to more numbers than it has"
    )


def _all_finite(tree) -> jax.Array:
    leaves = jax.tree.leaves(tree)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(a)) for a in leaves]))


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
        finite = jnp.isfinite(loss) & _all_finite(grads)
        updates, new_opt_state = tx.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
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


def _make_eval_fn(graphdef, objective):
    @jax.jit
    def evaluate(params, rest, batch, key):
        return objective(nnx.merge(graphdef, params, rest), batch, key)

    return evaluate


def fit(
    model: Bijector,
    x,
    y=None,
    *,
    cond=None,
    objective: Callable | None = None,
    val_data: dict | None = None,
    val_fraction: float = 0.0,
    optimizer: optax.GradientTransformation | None = None,
    learning_rate: float = 1e-3,
    epochs: int = 100,
    batch_size: int = 128,
    shuffle: bool = True,
    key: jax.Array | int | None = 0,
    patience: int | None = None,
    min_delta: float = 0.0,
    restore_best: bool = True,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int | None = None,
    save_best: bool = False,
    resume_from: str | os.PathLike | None = None,
    mesh: Mesh | str | None = None,
    on_nonfinite: str = "skip",
    progress: bool = True,
    eval_batch_size: int = 4096,
) -> History:
    r"""Train ``model`` in place with optax; returns the `History`.

    Args:
        model: any invnet `Bijector` (a `invnet.Flow` for densities).
        x, y, cond: training arrays, one row per sample. ``y`` for supervised jobs,
            ``cond`` for conditional models (cINN). See the module docs for which
            ``objective`` is chosen when none is given.
        objective: ``objective(model, batch, key) -> loss``; `invnet.MaximumLikelihood`,
            `invnet.Regression`, `invnet.InverseProblem` or your own.
        val_data: ``{"x": ..., "y": ..., "cond": ...}`` (only the keys the job uses), or
            ``val_fraction`` of the training rows held out (drawn with ``key``).
        optimizer: an optax transformation; default ``optax.adam(learning_rate)``.
        epochs, batch_size, shuffle: each epoch runs ``len(x) // batch_size`` steps on full
            batches of a fresh permutation (the remainder rows wait for the next epoch).
            ``epochs`` is the total, counting the epochs of a resumed run.
        key: int seed or PRNG key: the split, the shuffles and the per-step keys.
        patience, min_delta: stop after ``patience`` epochs without the monitored loss
            (validation, else training) falling by more than ``min_delta``.
        restore_best: with validation data, leave the model at its best-validation
            parameters rather than the last ones.
        checkpoint_dir, checkpoint_every, save_best: write ``epoch_NNNN.invnet`` every
            ``checkpoint_every`` epochs, ``best.invnet`` whenever the monitored loss
            improves, and ``last.invnet`` at the end (all with `invnet.save`; metadata
            holds epoch and losses, and each file can be resumed from).
        resume_from: a checkpoint written by `fit`: continue that run. Pass the arguments
            of the original call (same model architecture, data, key, batch size, shuffle,
            kind of optimizer); parameters, buffers, optimizer state, keys, epoch counter,
            early-stopping state and history come from the file, so the data order and
            per-step keys are the uninterrupted run's. A different architecture, data
            fingerprint, batch size or optimizer structure is a ``ValueError``.
        mesh: ``None`` (one device), ``"all"`` (every local device) or a
            `jax.sharding.Mesh` with a ``"data"`` axis (`invnet.data_mesh`): each batch is
            split over that axis, parameters and optimizer state are replicated. The batch
            size must be a multiple of the number of devices on the axis.
        on_nonfinite: a step with a non-finite loss or gradient is never applied. Then
            ``"skip"`` goes on, ``"stop"`` ends training, ``"raise"`` raises
            ``FloatingPointError``. Each epoch with such steps issues a
            `NonFiniteStepWarning`.
        progress: show a tqdm bar over epochs (``False`` for none).
        eval_batch_size: validation runs in chunks of this many rows.

    Example:
        >>> import jax, invnet
        >>> from flax import nnx
        >>> flow = invnet.Flow(invnet.Sequential(
        ...     invnet.AffineCoupling(2, hidden=(16,), rngs=nnx.Rngs(0)),
        ...     invnet.Permute(2, mode="reverse"),
        ...     invnet.AffineCoupling(2, hidden=(16,), rngs=nnx.Rngs(1))))
        >>> x = 2.0 + 0.5 * jax.random.normal(jax.random.key(0), (256, 2))
        >>> history = invnet.fit(flow, x, epochs=20, batch_size=64, progress=False)
        >>> history.train_loss[-1] < history.train_loss[0]
        True
    """
    if not isinstance(model, Bijector):
        raise TypeError(f"invnet.fit: expected an invnet Bijector, got {type(model).__name__}")
    if on_nonfinite not in ("skip", "stop", "raise"):
        raise ValueError(f"invnet.fit: on_nonfinite must be skip|stop|raise, got {on_nonfinite!r}")
    if epochs < 0 or batch_size < 1:
        raise ValueError("invnet.fit: epochs must be >= 0 and batch_size >= 1")
    t_start = time.perf_counter()
    placement = _placement(mesh)
    key = _as_key(key)
    data = _collect(x, y, cond)
    objective = objective if objective is not None else _default_objective(model, data)

    if val_data is None and val_fraction > 0:
        n = data["x"].shape[0]
        n_val = max(1, int(round(val_fraction * n)))
        key, k_split = jax.random.split(key)
        perm = jax.random.permutation(k_split, n)
        val_data = {k: v[perm[:n_val]] for k, v in data.items()}
        data = {k: v[perm[n_val:]] for k, v in data.items()}
    elif val_data is not None:
        val_data = {k: jnp.asarray(v) for k, v in val_data.items() if v is not None}
        missing = set(data) - set(val_data)
        if missing:
            raise ValueError(f"invnet.fit: val_data lacks {sorted(missing)}")

    n_train = data["x"].shape[0]
    if n_train == 0:
        raise ValueError("invnet.fit: no training rows")
    batch_size = min(batch_size, n_train)
    if batch_size % placement.devices:
        d = placement.devices
        lower, upper = batch_size - batch_size % d, batch_size + d - batch_size % d
        raise ValueError(
            f"invnet.fit: batch_size {batch_size} is not divisible by the {d} devices of the "
            f"mesh's {AXIS!r} axis; use a multiple of {d} (e.g. {lower or upper} or {upper})"
        )
    steps_per_epoch = n_train // batch_size
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    data_sha256 = (
        resume.fingerprint(data, val_data) if (ckpt_dir or resume_from is not None) else None
    )

    ckpt = None
    if resume_from is not None:
        ckpt = resume.Checkpoint(resume_from)
        ckpt.check_run(model, batch_size=batch_size, shuffle=shuffle, data_sha256=data_sha256)
        nnx.update(model, nnx.state(ckpt.model))  # parameters and buffers of the file

    # ActNorm's data-dependent init cannot happen inside a pure jit: do it eagerly now.
    if any(node.not_ready() for node in nodes(model)):
        head = {k: v[:eval_batch_size] for k, v in data.items()}
        data_init(model, head["x"], cond=head.get("cond"))

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optimizer if optimizer is not None else optax.adam(learning_rate)
    opt_state = tx.init(params)
    key, val_key = jax.random.split(key)
    history, bad_epochs, best_params, start_epoch = History(), 0, None, 0
    if ckpt is not None:
        opt_state = ckpt.opt_state(opt_state)
        best_params = ckpt.params("best", params)
        loop_params = ckpt.params("params", params)
        params = loop_params if loop_params is not None else params
        key, val_key = ckpt.key("key"), ckpt.key("val_key")
        history = History(**ckpt.history({f.name for f in fields(History)}))
        bad_epochs, start_epoch = ckpt.state["bad_epochs"], ckpt.state["next_epoch"]
        if ckpt.state["has_best"] and best_params is None:
            best_params = params  # the best were the loop's parameters

    data = placement.data(data)
    if val_data is not None:
        val_data = placement.data(val_data)
    best_is_loop = best_params is params
    params, opt_state, rest = placement.state((params, opt_state, rest))
    if best_params is not None:
        best_params = params if best_is_loop else placement.state(best_params)

    run_epoch = _make_epoch_fn(
        graphdef, objective, tx, batch_size, on_nonfinite != "skip", placement
    )
    evaluate = _make_eval_fn(graphdef, objective)
    placed_val_key = placement.state(val_key)

    def val_loss(p) -> float:
        n = val_data["x"].shape[0]
        total = 0.0
        for start in range(0, n, eval_batch_size):
            chunk = {k: v[start : start + eval_batch_size] for k, v in val_data.items()}
            rows = chunk["x"].shape[0]
            total += float(placement.host(evaluate(p, rest, chunk, placed_val_key))) * rows
        return total / n

    seconds_before = history.seconds

    def checkpoint(name: str, model_params, loop_params, epoch: int) -> None:
        """Write ``name``: the model at ``model_params`` plus the loop state after ``epoch``."""
        if jax.process_index() != 0:  # multi-host: one writer
            return
        nnx.update(model, placement.host(model_params))
        history.seconds = seconds_before + time.perf_counter() - t_start
        if str(ckpt_dir / name) not in history.checkpoints:
            history.checkpoints.append(str(ckpt_dir / name))
        meta = {
            "epoch": epoch,
            "train_loss": history.train_loss[-1] if history.train_loss else None,
            "fit": {
                "version": resume.STATE_VERSION,
                "next_epoch": epoch + 1,
                "history": asdict(history),
                "bad_epochs": bad_epochs,
                "has_best": best_params is not None,
                "batch_size": batch_size,
                "shuffle": shuffle,
                "n_train": n_train,
                "data_sha256": data_sha256,
                "key_impl": str(jax.random.key_impl(key)),
            },
        }
        if history.val_loss:
            meta["val_loss"] = history.val_loss[-1]
        keep_best = best_params is not None and best_params is not loop_params
        extra = resume.pack(
            opt_state=placement.host(opt_state),
            key=key,
            val_key=val_key,
            loop_params=None if model_params is loop_params else placement.host(loop_params),
            best_params=placement.host(best_params) if keep_best else None,
        )
        save(model, ckpt_dir / name, metadata=meta, extra_arrays=extra)

    bar = tqdm(
        range(start_epoch, epochs), desc="invnet.fit", unit="epoch", disable=not progress,
        leave=False,
    )  # fmt: skip
    epoch = start_epoch - 1
    for epoch in bar:
        t_epoch = time.perf_counter()
        key, k_perm, k_steps = jax.random.split(key, 3)
        if shuffle:
            order = jax.random.permutation(k_perm, n_train)[: steps_per_epoch * batch_size]
        else:
            order = jnp.arange(steps_per_epoch * batch_size)
        keys = jax.random.split(k_steps, steps_per_epoch)
        order, keys = placement.state((order, keys))
        params, opt_state, losses, finite = run_epoch(params, opt_state, rest, data, order, keys)
        losses, finite = np.asarray(placement.host(losses)), np.asarray(placement.host(finite))
        if on_nonfinite != "skip" and not finite.all():
            first = int(np.argmin(finite))  # the steps after it were no-ops: drop them
            losses, finite = losses[: first + 1], finite[: first + 1]
        bad = np.flatnonzero(~finite)
        history.nonfinite_at.extend(int(history.steps + i) for i in bad)
        history.nonfinite_steps += len(bad)
        history.steps += len(finite)
        history.train_loss.append(float(losses[finite].mean()) if finite.any() else math.nan)
        if val_data is not None:
            history.val_loss.append(val_loss(params))
        history.epochs = epoch + 1

        if len(bad):
            action = {
                "skip": "skipped them and went on",
                "stop": "stopped training",
                "raise": "raising FloatingPointError",
            }[on_nonfinite]
            message = (
                f"invnet.fit: {len(bad)} step(s) in epoch {epoch} had a non-finite loss or "
                f"gradient (global steps {history.nonfinite_at[-len(bad) :][:10]}); their "
                "updates were not applied, parameters and optimizer state keep their last "
                f"finite values; {action} (on_nonfinite={on_nonfinite!r}). "
                f"Non-finite steps so far: {history.nonfinite_steps}."
            )
            if on_nonfinite == "raise":
                nnx.update(model, placement.host(params))
                raise FloatingPointError(message)
            warnings.warn(message, NonFiniteStepWarning, stacklevel=2)

        monitored = history.val_loss[-1] if history.val_loss else history.train_loss[-1]
        improved = math.isfinite(monitored) and (
            history.best_loss is None or monitored < history.best_loss - min_delta
        )
        if improved:
            history.best_loss, history.best_epoch = monitored, epoch
            best_params, bad_epochs = params, 0
        else:
            bad_epochs += 1
        stop = None
        if len(bad) and on_nonfinite == "stop":
            stop = "nonfinite"
        elif patience is not None and bad_epochs >= patience:
            stop = "early_stopping"
        history.stop_reason = stop or "epochs"
        history.epoch_seconds.append(time.perf_counter() - t_epoch)

        # checkpoints: snapshots of the state after this epoch, each one resumable
        if ckpt_dir is not None and save_best and improved:
            checkpoint("best.invnet", params, params, epoch)
        if ckpt_dir is not None and checkpoint_every and (epoch + 1) % checkpoint_every == 0:
            checkpoint(f"epoch_{epoch + 1:04d}.invnet", params, params, epoch)
        postfix = {"train": f"{history.train_loss[-1]:.4f}"}
        if history.val_loss:
            postfix["val"] = f"{history.val_loss[-1]:.4f}"
        bar.set_postfix(postfix, refresh=False)
        if stop:
            break
    bar.close()

    final = params
    if restore_best and history.val_loss and best_params is not None:
        final = best_params
    if ckpt_dir is not None:
        checkpoint("last.invnet", final, params, epoch)
    nnx.update(model, placement.host(final))
    history.seconds = seconds_before + time.perf_counter() - t_start
    return history
