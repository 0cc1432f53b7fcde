"""`invnet.fit`: train any invnet model with optax.

One entry point covers the four jobs (the objective says which; see `invnet.objectives`):

==========================  ===============================  ==========================
job                          call                             objective (default)
==========================  ===============================  ==========================
density p(x)                 ``fit(flow, x)``                 `MaximumLikelihood`
conditional density p(x|c)   ``fit(flow, x, cond=c)``         `MaximumLikelihood`
bijective regression x -> y  ``fit(model, x, y)``, same size  `Regression`
inverse problem x -> [y, z]  ``fit(model, x, y, objective=``  `InverseProblem(y_dim)`
                             ``InverseProblem(y_dim))``       (always given)
==========================  ===============================  ==========================

How a run goes (each step is a module of `invnet.training`): the data is checked and
arranged (``data``: rows, ``cond`` against the model, the objective, the validation split,
the batch size); the model is split once (``nnx.split``) into its graph, its trainable
``nnx.Param`` state and the rest (buffers), which with the optimizer state, keys, best
parameters, counters and history form the `TrainState` (``state``). Each epoch
(``epoch``), the training set is shuffled with an explicit key
(``jax.random.permutation``), cut into full batches, and one jitted optimizer step,
compiled once and dispatched asynchronously from a Python loop, runs each batch (compiling
one step is several times faster than compiling a ``lax.scan`` of it; the progress bar says
"compiling..." meanwhile, see ``progress``); it is cached, so a second `fit` of the same
structure, or with another learning rate, does not compile again. A step whose loss,
gradients or update are not finite is not applied: parameters and optimizer state keep
their last finite values; ``on_nonfinite`` says whether training then goes on
(``"skip"``), ends (``"stop"``) or raises (``"raise"``), and the history counts them.
A Ctrl-C keeps the work: the model holds the last completed step's parameters,
``last.invnet`` is written first with a checkpoint directory, and the
``KeyboardInterrupt`` is re-raised carrying the `History` as ``err.history``.
After each epoch (``decision``): the validation loss, the best parameters, early
stopping; then checkpoints with `invnet.save` (``checkpoints``).

Data parallelism is a placement question only: `Placement` (``placement``) decides where
the training arrays and the state live. Without a mesh everything sits on the default
device. With ``mesh=`` (see `invnet.data_mesh`) each batch is split along its batch axis
over the mesh's ``"data"`` axis and the parameters, optimizer state and keys are
replicated; the same jitted step runs unchanged and XLA inserts the gradient
all-reduce (``jax.sharding``, no hand-written communication).

Resuming: every checkpoint `fit` writes also holds its optimizer state, keys, epoch counter,
early-stopping counter, best parameters and history (see `invnet.resume`);
``fit(..., resume_from=path)`` with the original arguments continues that run and ends with
the parameters the uninterrupted run would have had.
"""

from __future__ import annotations

import math
import operator
import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from invnet import resume
from invnet.core import Bijector, nodes
from invnet.io import save
from invnet.layers.norm import data_init
from invnet.training import checkpoints as _ckpt
from invnet.training import data, epoch, interrupts, options
from invnet.training.decision import end_epoch
from invnet.training.options import Checkpoints, EarlyStopping
from invnet.training.placement import placement_for
from invnet.training.progress import Progress
from invnet.training.state import History, NonFiniteStepWarning, TrainState

__all__ = ["fit", "History", "NonFiniteStepWarning", "EarlyStopping", "Checkpoints"]


def fit(
    model: Bijector,
    x,
    y=None,
    *,
    cond=None,
    objective: Callable | None = None,
    optimizer: optax.GradientTransformation | None = None,
    learning_rate: float = 1e-3,
    epochs: int = 100,
    batch_size: int = 128,
    shuffle: bool = True,
    key: jax.Array | int | None = 0,
    validation: float | dict | None = None,
    early_stopping: int | EarlyStopping | None = None,
    checkpoints: str | os.PathLike | Checkpoints | None = None,
    resume_from: str | os.PathLike | None = None,
    mesh: Mesh | str | None = None,
    on_nonfinite: str = "skip",
    progress: bool = True,
    eval_batch_size: int = 4096,
    **renamed,
) -> History:
    r"""Train ``model`` in place with optax; returns the `History`.

    Args:
        model: any invnet `Bijector` (a `invnet.Flow` for densities).
        x, y, cond: training arrays, one row per sample. ``y`` for supervised jobs,
            ``cond`` for conditional models (cINN): given exactly when the model has a
            conditional layer, of width ``model.cond_dim`` (else a ``ValueError`` before
            training). See the module docs for which ``objective`` is chosen when none is
            given; a ``y`` not of ``x``'s shape needs an explicit objective.
        objective: ``objective(model, batch, key) -> loss``; `invnet.MaximumLikelihood`,
            `invnet.Regression`, `invnet.InverseProblem` or your own. It is traced once per
            model structure and reused by later calls with the same objective object: a
            Python value it reads from outside is fixed at that trace, as under
            ``jax.jit`` (`invnet.training.epoch.clear_cache` forgets the traces).
        optimizer: an optax transformation (``optax.adam(1e-3)``, not ``optax.adam``);
            default ``optax.adam(learning_rate)`` with the rate kept in its state, so a
            new ``learning_rate`` reuses the compiled step. The compiled step is reused by
            later calls with the same optimizer object (and model structure, objective,
            batch size and shapes).
        learning_rate: a finite number > 0 (or an optax schedule) for the default
            optimizer.
        epochs, batch_size, shuffle: ``epochs`` and ``batch_size`` are ints (a float
            such as ``32.0`` is a ``TypeError``); each epoch runs ``n // batch_size`` steps on full
            batches of a fresh permutation of the ``n`` training rows (the remainder rows
            wait for the next epoch); ``batch_size > n`` is a ``ValueError``.
            ``epochs`` is the total, counting the epochs of a resumed run.
        key: int seed or PRNG key: the split, the shuffles and the per-step keys.
        validation: a fraction of the training rows to hold out (``0.1``, drawn with
            ``key``), or held-out arrays ``{"x": ..., "y": ..., "cond": ...}`` (only the
            keys the job uses). Its loss is reported each epoch and monitored for early
            stopping and ``best.invnet``.
        early_stopping: ``patience`` (an int: stop after that many epochs without the
            monitored loss, validation else training, improving) or an
            `invnet.EarlyStopping` (``patience``, ``min_delta``, ``restore_best``). By
            default training runs all ``epochs`` and, with validation data, the model is
            left at its best-validation parameters (``restore_best=True``).
        checkpoints: a directory, or an `invnet.Checkpoints` (``directory``, ``every``,
            ``save_best``): ``last.invnet`` at the end, ``epoch_NNNN.invnet`` every
            ``every`` epochs, ``best.invnet`` whenever the monitored loss improves (all
            with `invnet.save`; metadata holds epoch and losses, and each file can be
            resumed from).
        resume_from: a checkpoint written by `fit`: continue that run. Pass the arguments
            of the original call (same model architecture, data, key, batch size, shuffle,
            kind of optimizer); parameters, buffers, optimizer state, keys, epoch counter,
            early-stopping state and history come from the file, so the data order and
            per-step keys are the uninterrupted run's. A different architecture, data
            fingerprint, batch size or optimizer structure is a ``ValueError``.
        mesh: ``None`` (one device), ``"all"`` (every local device) or a
            `jax.sharding.Mesh` with a ``"data"`` axis (`invnet.data_mesh`): each batch is
            split over that axis, parameters and optimizer state are replicated. The batch
            size must be a multiple of the number of devices on the axis. On a multi-core
            CPU, ``jax.config.update("jax_num_cpu_devices", cores)`` before any JAX
            operation and ``mesh="all"`` train an image model data-parallel over the
            cores (a 32x32x3 Glow 1.3-1.4x faster on 2 cores); small models get slower.
        on_nonfinite: a step with a non-finite loss, gradient or update (new parameters
            or optimizer state) is never applied. Then
            ``"skip"`` goes on, ``"stop"`` ends training, ``"raise"`` raises
            ``FloatingPointError``. Each epoch with such steps issues a
            `NonFiniteStepWarning`.
        progress: show a tqdm bar over epochs (``False`` for none); it reads
            "compiling... Ns" while the first step compiles, then shows the compile time
            (also in `History.compile_seconds`).
        eval_batch_size: validation runs in chunks of this many rows.
        **renamed: the keyword names before the grouping (``val_data``, ``val_fraction``,
            ``patience``, ``min_delta``, ``restore_best``, ``checkpoint_dir``,
            ``checkpoint_every``, ``save_best``) still work, with a ``DeprecationWarning``.

    Ctrl-C (``KeyboardInterrupt``) during training leaves the model at the parameters of
    the last completed step, writes ``last.invnet`` first when ``checkpoints`` is set
    (resumable; the interrupted epoch's data order is replayed), and re-raises with the
    `History` as the exception's ``history`` (``stop_reason == "interrupted"``).

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
    _check_arguments(model, optimizer, on_nonfinite, epochs, batch_size, learning_rate,
                     eval_batch_size)  # fmt: skip
    opts = options.resolve(validation, early_stopping, checkpoints, renamed)
    clock = _Clock()
    placement = placement_for(mesh)
    prepared = data.prepare(
        model, x, y, cond, objective=objective, val_data=opts.val_data,
        val_fraction=opts.val_fraction, batch_size=batch_size, key=key,
        devices=placement.devices,
    )  # fmt: skip
    ckpt_dir = opts.checkpoint_dir
    run = _run_info(prepared, shuffle, ckpt_dir is not None or resume_from is not None)
    ckpt = _open_checkpoint(resume_from, model, run)
    _initialise_from_data(model, prepared.train, eval_batch_size)

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    # nnx.split's states share storage with the model's variables, and checkpoint writes
    # update the model: the loop keeps copies of its own (else a resumed run's best
    # parameters, which start as the split state, would follow every checkpoint written)
    params, rest = jax.tree.map(lambda a: a, (params, rest))
    tx, state = _start(params, rest, optimizer, learning_rate, prepared.key, ckpt)
    clock.before = state.history.seconds
    state.place(placement)
    epochs_run = epoch.Epochs(graphdef, prepared, tx, placement, shuffle=shuffle,
                              halt=on_nonfinite != "skip", eval_batch_size=eval_batch_size,
                              val_key=state.val_key)  # fmt: skip

    def write(name: str, model_params) -> None:
        _write_checkpoint(ckpt_dir / name, model, state, model_params, run, placement, clock())

    shown = Progress(range(state.next_epoch, epochs), state.history, enabled=progress)
    with interrupts.Guard() as guard:
        try:
            for _ in shown:
                t_epoch = time.perf_counter()
                losses, finite, val_loss = epochs_run.run(state, shown.compiling, guard)
                end = end_epoch(state, losses, finite, val_loss, on_nonfinite=on_nonfinite,
                                patience=opts.stopping.patience,
                                min_delta=opts.stopping.min_delta)  # fmt: skip
                if end.nonfinite and on_nonfinite == "raise":
                    nnx.update(model, placement.host(state.params))
                    raise FloatingPointError(end.nonfinite)
                if end.nonfinite:
                    warnings.warn(end.nonfinite, NonFiniteStepWarning, stacklevel=2)
                state.history.epoch_seconds.append(time.perf_counter() - t_epoch)
                _epoch_checkpoints(write, opts.checkpoints, state.next_epoch, end.improved,
                                   state.params)  # fmt: skip
                guard.settle()  # the epoch is recorded: a Ctrl-C held meanwhile lands now
                shown.epoch_done()
                if end.stop:
                    break
        except (epoch.Interrupted, KeyboardInterrupt) as stopped:
            shown.close()
            _keep_interrupted_work(stopped, model, state, placement,
                                   write if ckpt_dir else None, clock)  # fmt: skip
    shown.close()

    final = state.params
    if opts.stopping.restore_best and state.history.val_loss and state.best is not None:
        final = state.best
    if ckpt_dir is not None:
        write("last.invnet", final)
    nnx.update(model, placement.host(final))
    state.history.seconds = clock()
    return state.history


def _epoch_checkpoints(write, every_and_best, epoch_done: int, improved: bool, params) -> None:
    """``best.invnet`` when the monitored loss improved (``save_best``) and
    ``epoch_NNNN.invnet`` every ``every`` epochs, after epoch ``epoch_done``."""
    if every_and_best is None:
        return
    if every_and_best.save_best and improved:
        write("best.invnet", params)
    if every_and_best.every and epoch_done % every_and_best.every == 0:
        write(f"epoch_{epoch_done:04d}.invnet", params)


def _start(params, rest, optimizer, learning_rate, key, ckpt):
    """The optimizer and the loop state: fresh, or taken from the checkpoint ``ckpt``.

    The default optimizer keeps its learning rate in its state (one compiled step for every
    rate); a checkpoint written before that (plain ``optax.adam`` state) resumes with plain
    ``optax.adam(learning_rate)``."""
    if optimizer is not None:
        tx = optimizer
    else:
        tx = epoch.default_optimizer(learning_rate, params)
    state = TrainState.start(params, rest, tx, key)
    if ckpt is not None:
        try:
            state.restore(ckpt)
        except ValueError:
            if optimizer is not None or not epoch.injects(learning_rate):
                raise
            tx = optax.adam(learning_rate)
            state = TrainState.start(params, rest, tx, key)
            state.restore(ckpt)
    if optimizer is None and hasattr(state.opt_state, "hyperparams"):
        state.opt_state = epoch.set_learning_rate(state.opt_state, learning_rate)
    return tx, state


def _keep_interrupted_work(stopped, model, state, placement, write, clock) -> None:
    """Ctrl-C: record where the run stopped, write ``last.invnet`` (with a checkpoint
    directory), leave the model at the last completed step and re-raise
    ``KeyboardInterrupt`` carrying the `History` (``err.history``)."""
    history = state.history
    if isinstance(stopped, epoch.Interrupted):  # inside an epoch: its steps so far count
        bad = np.flatnonzero(~stopped.finite)
        history.nonfinite_at.extend(int(history.steps + i) for i in bad)
        history.nonfinite_steps += len(bad)
        history.steps += len(stopped.finite)
        state.key = stopped.epoch_key  # a resume replays the interrupted epoch's order
    history.stop_reason = "interrupted"
    where = (f"after {history.epochs} complete epoch(s) and {history.steps} step(s) in all; "
             "the model holds the parameters of the last completed step")  # fmt: skip
    if write is not None:
        write("last.invnet", state.params)
        where += f", saved in {history.checkpoints[-1]}"
    nnx.update(model, placement.host(state.params))
    history.seconds = clock()
    err = KeyboardInterrupt()
    err.history = history
    err.add_note(f"invnet.fit was interrupted {where} (the History is the exception's .history)")
    raise err from None


class _Clock:
    """Seconds of this run: this call's wall time plus those of the calls it resumes."""

    def __init__(self):
        self.start, self.before = time.perf_counter(), 0.0

    def __call__(self) -> float:
        return self.before + time.perf_counter() - self.start


def _check_arguments(model, optimizer, on_nonfinite: str, epochs, batch_size, learning_rate,
                     eval_batch_size) -> None:  # fmt: skip
    if not isinstance(model, Bijector):
        raise TypeError(f"invnet.fit: expected an invnet Bijector, got {type(model).__name__}")
    if on_nonfinite not in ("skip", "stop", "raise"):
        raise ValueError(f"invnet.fit: on_nonfinite must be skip|stop|raise, got {on_nonfinite!r}")
    _check_optimizer(optimizer)
    _whole_number("epochs", epochs, low=0)
    _whole_number("batch_size", batch_size, low=1)
    _whole_number("eval_batch_size", eval_batch_size, low=1)
    _check_learning_rate(learning_rate)


def _check_optimizer(optimizer) -> None:
    if optimizer is None or isinstance(optimizer, optax.GradientTransformation):
        return
    if hasattr(optimizer, "init") and hasattr(optimizer, "update"):
        return  # duck-typed: an optax-like object
    name = getattr(optimizer, "__qualname__", None)
    module = (getattr(optimizer, "__module__", None) or "").split(".")[0]
    if callable(optimizer) and name:
        shown = f"{module}.{name}" if module else name
        raise TypeError(
            f"invnet.fit: optimizer={shown} is the optimizer's factory, not an optimizer; "
            f"call it: optimizer={shown}(1e-3) (or leave optimizer out and pass learning_rate)"
        )
    raise TypeError(
        "invnet.fit: optimizer must be an optax GradientTransformation such as "
        f"optax.adam(1e-3), got {type(optimizer).__name__}"
    )


def _whole_number(name: str, value, *, low: int) -> None:
    try:
        if isinstance(value, bool):
            raise TypeError
        ok = operator.index(value) >= low
    except TypeError:
        hint = ""
        if isinstance(value, float) and value.is_integer():
            hint = f"; pass {name}={int(value)}"
        raise TypeError(
            f"invnet.fit: {name} must be a whole number (an int) >= {low}, got {value!r}{hint}"
        ) from None
    if not ok:
        raise ValueError(f"invnet.fit: {name} must be an int >= {low}, got {value!r}")


def _check_learning_rate(learning_rate) -> None:
    if callable(learning_rate):  # an optax schedule
        return
    try:
        rate = float(learning_rate)
    except (TypeError, ValueError):
        raise TypeError(
            f"invnet.fit: learning_rate must be a positive number or an optax schedule, "
            f"got {type(learning_rate).__name__}"
        ) from None
    if not math.isfinite(rate):
        raise ValueError(
            f"invnet.fit: learning_rate must be a finite number, got {learning_rate!r}"
        )
    if rate <= 0:
        raise ValueError(
            f"invnet.fit: learning_rate must be > 0 (the step goes downhill by "
            f"learning_rate x the update), got {learning_rate!r}; e.g. learning_rate=1e-3"
        )


def _run_info(prepared: data.TrainingData, shuffle: bool, fingerprint: bool):
    """What a checkpoint of this run records (the data's sha256 only when it is needed)."""
    sha256 = resume.fingerprint(prepared.train, prepared.val) if fingerprint else None
    return _ckpt.RunInfo(prepared.batch_size, shuffle, prepared.n_train, sha256)


def _initialise_from_data(model: Bijector, train: dict, rows: int) -> None:
    """ActNorm's data-dependent init cannot happen inside a pure jit: do it eagerly now."""
    if any(node.not_ready() for node in nodes(model)):
        head = {k: v[:rows] for k, v in train.items()}
        data_init(model, head["x"], cond=head.get("cond"))


def _open_checkpoint(resume_from, model: Bijector, run: _ckpt.RunInfo):
    """The checkpoint to resume from, checked against this run; the model takes its
    parameters and buffers. ``None`` without ``resume_from``."""
    if resume_from is None:
        return None
    ckpt = resume.Checkpoint(resume_from)
    ckpt.check_run(
        model, batch_size=run.batch_size, shuffle=run.shuffle, data_sha256=run.data_sha256
    )
    nnx.update(model, nnx.state(ckpt.model))
    return ckpt


def _write_checkpoint(
    path: Path, model: Bijector, state: TrainState, model_params, run, placement, seconds: float
) -> None:
    """Write ``path``: the model at ``model_params`` plus the loop state after its epoch."""
    if jax.process_index() != 0:  # multi-host: one writer
        return
    nnx.update(model, placement.host(model_params))
    state.history.seconds = seconds
    if str(path) not in state.history.checkpoints:
        state.history.checkpoints.append(str(path))
    meta, extra = _ckpt.contents(state, model_params, run, placement)
    save(model, path, metadata=meta, extra_arrays=extra)
