"""The end of an `invnet.fit` epoch: record it, track the best, decide whether to go on."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from invnet.training.state import TrainState

_ACTIONS = {
    "skip": "skipped them and went on",
    "stop": "stopped training",
    "raise": "raising FloatingPointError",
}


@dataclass(frozen=True)
class EpochEnd:
    """What the loop does next: ``improved`` (write ``best.invnet``), ``stop`` (a
    `History.stop_reason`, or ``None`` to go on), ``nonfinite`` (a message to warn or raise
    with, or ``None``)."""

    improved: bool
    stop: str | None
    nonfinite: str | None


def _record_steps(state: TrainState, losses, finite, on_nonfinite: str) -> int:
    """Add the epoch's steps to the history; returns how many were not applied."""
    history = state.history
    if on_nonfinite != "skip" and not finite.all():
        first = int(np.argmin(finite))  # the steps after it were no-ops: drop them
        losses, finite = losses[: first + 1], finite[: first + 1]
    bad = np.flatnonzero(~finite)
    history.nonfinite_at.extend(int(history.steps + i) for i in bad)
    history.nonfinite_steps += len(bad)
    history.steps += len(finite)
    history.train_loss.append(float(losses[finite].mean()) if finite.any() else math.nan)
    return len(bad)


def _nonfinite_message(state: TrainState, n_bad: int, on_nonfinite: str) -> str:
    history = state.history
    return (
        f"invnet.fit: {n_bad} step(s) in epoch {state.epoch} had a non-finite loss, gradient "
        f"or update (global steps {history.nonfinite_at[-n_bad:][:10]}); their updates were "
        "not applied, parameters and optimizer state keep their last finite values; "
        f"{_ACTIONS[on_nonfinite]} (on_nonfinite={on_nonfinite!r}). "
        f"Non-finite steps so far: {history.nonfinite_steps}."
    )


def end_epoch(
    state: TrainState,
    losses: np.ndarray,
    finite: np.ndarray,
    val_loss: float | None,
    *,
    on_nonfinite: str,
    patience: int | None,
    min_delta: float,
) -> EpochEnd:
    """Record epoch ``state.next_epoch`` (its losses, its non-finite steps, the validation
    loss), update the best parameters and the early-stopping counter, and decide."""
    history = state.history
    n_bad = _record_steps(state, losses, finite, on_nonfinite)
    if val_loss is not None:
        history.val_loss.append(val_loss)
    state.next_epoch += 1
    history.epochs = state.next_epoch
    message = _nonfinite_message(state, n_bad, on_nonfinite) if n_bad else None

    monitored = history.val_loss[-1] if history.val_loss else history.train_loss[-1]
    improved = math.isfinite(monitored) and (
        history.best_loss is None or monitored < history.best_loss - min_delta
    )
    if improved:
        history.best_loss, history.best_epoch = monitored, state.epoch
        state.best, state.bad_epochs = state.params, 0
    else:
        state.bad_epochs += 1
    stop = None
    if n_bad and on_nonfinite == "stop":
        stop = "nonfinite"
    elif patience is not None and state.bad_epochs >= patience:
        stop = "early_stopping"
    history.stop_reason = stop or "epochs"
    return EpochEnd(improved, stop, message)
