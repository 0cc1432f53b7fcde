"""`fit`'s grouped options: validation, early stopping, checkpoints.

Each group is one argument of `invnet.fit`, given in its short form (a number, a path) or as
a small frozen dataclass when more than one setting is wanted:

* ``validation=0.1`` holds out 10% of the training rows; ``validation={"x": ..., ...}``
  passes held-out arrays (only the keys the job uses);
* ``early_stopping=10`` stops after 10 epochs without improvement;
  `EarlyStopping` adds ``min_delta`` and ``restore_best``;
* ``checkpoints="runs/a"`` writes ``last.invnet`` there at the end; `Checkpoints` adds
  periodic files (``every``) and ``best.invnet`` (``save_best``).

The keyword names of invnet 0.x before this grouping (``val_data``, ``val_fraction``,
``patience``, ``min_delta``, ``restore_best``, ``checkpoint_dir``, ``checkpoint_every``,
``save_best``) still work, with a ``DeprecationWarning`` that names the new spelling.
"""

from __future__ import annotations

import dataclasses
import math
import operator
import os
import warnings
from pathlib import Path

__all__ = ["EarlyStopping", "Checkpoints", "Options", "resolve"]


@dataclasses.dataclass(frozen=True)
class EarlyStopping:
    """When `invnet.fit` stops early, and which parameters it leaves in the model.

    Args:
        patience: stop after this many epochs in a row without the monitored loss
            (validation, else training) falling by more than ``min_delta``; ``None``
            never stops early.
        min_delta: the fall that counts as an improvement (>= 0).
        restore_best: with validation data, leave the model at its best-validation
            parameters rather than the last ones.

    Example:
        >>> import invnet
        >>> invnet.EarlyStopping(patience=10, min_delta=1e-3)
        EarlyStopping(patience=10, min_delta=0.001, restore_best=True)
    """

    patience: int | None = None
    min_delta: float = 0.0
    restore_best: bool = True

    def __post_init__(self):
        if self.patience is not None:
            _whole("early_stopping patience", self.patience, low=1)
        delta = float(self.min_delta)
        if not math.isfinite(delta) or delta < 0:
            raise ValueError(
                f"invnet.EarlyStopping: min_delta must be >= 0, got {self.min_delta!r}"
            )
        if not isinstance(self.restore_best, bool):
            raise TypeError(
                "invnet.EarlyStopping: restore_best must be True or False, got "
                f"{self.restore_best!r}"
            )


@dataclasses.dataclass(frozen=True)
class Checkpoints:
    """Where and when `invnet.fit` writes checkpoints (each one resumable with
    ``fit(..., resume_from=path)``).

    Args:
        directory: a folder (created if missing); ``last.invnet`` is written there at the
            end of training and when it is interrupted.
        every: also write ``epoch_NNNN.invnet`` every this many epochs (``None``: never).
        save_best: also write ``best.invnet`` whenever the monitored loss improves.

    Example:
        >>> import invnet
        >>> invnet.Checkpoints("runs/a", every=5).every
        5
    """

    directory: str | os.PathLike
    every: int | None = None
    save_best: bool = False

    def __post_init__(self):
        if not isinstance(self.directory, (str, os.PathLike)):
            raise TypeError(
                "invnet.Checkpoints: directory must be a path (str or os.PathLike), got "
                f"{type(self.directory).__name__}"
            )
        if self.every is not None:
            _whole("Checkpoints every", self.every, low=1)


@dataclasses.dataclass(frozen=True)
class Options:
    """The groups as `fit` uses them, every short form expanded."""

    val_data: dict | None
    val_fraction: float
    stopping: EarlyStopping
    checkpoints: Checkpoints | None

    @property
    def checkpoint_dir(self) -> Path | None:
        return None if self.checkpoints is None else Path(self.checkpoints.directory)


_RENAMED = {
    "val_data": "validation={...}",
    "val_fraction": "validation=<fraction>",
    "patience": "early_stopping=<patience> (or invnet.EarlyStopping(patience=...))",
    "min_delta": "early_stopping=invnet.EarlyStopping(min_delta=...)",
    "restore_best": "early_stopping=invnet.EarlyStopping(restore_best=...)",
    "checkpoint_dir": "checkpoints=<directory> (or invnet.Checkpoints(directory))",
    "checkpoint_every": "checkpoints=invnet.Checkpoints(directory, every=...)",
    "save_best": "checkpoints=invnet.Checkpoints(directory, save_best=True)",
}


def resolve(validation, early_stopping, checkpoints, renamed: dict) -> Options:
    """The three groups from their short forms, and from the old keyword names in
    ``renamed`` (each with a ``DeprecationWarning``); a clear error for anything else."""
    unknown = sorted(set(renamed) - set(_RENAMED))
    if unknown:
        raise TypeError(f"invnet.fit() got unexpected keyword argument(s) {', '.join(unknown)}")
    if renamed:
        spelled = "; ".join(f"{name}= is now {_RENAMED[name]}" for name in renamed)
        warnings.warn(f"invnet.fit: {spelled}", DeprecationWarning, stacklevel=3)
    validation = _old_validation(validation, renamed)
    early_stopping = _old_stopping(early_stopping, renamed)
    checkpoints = _old_checkpoints(checkpoints, renamed)

    val_data, val_fraction = _validation(validation)
    if early_stopping is None:
        early_stopping = EarlyStopping()
    elif not isinstance(early_stopping, EarlyStopping):
        early_stopping = EarlyStopping(patience=early_stopping)
    if checkpoints is not None and not isinstance(checkpoints, Checkpoints):
        checkpoints = Checkpoints(checkpoints)
    return Options(val_data, val_fraction, early_stopping, checkpoints)


def _validation(validation) -> tuple[dict | None, float]:
    if validation is None:
        return None, 0.0
    if isinstance(validation, dict):
        return validation, 0.0
    if isinstance(validation, bool) or not isinstance(validation, (int, float)):
        raise TypeError(
            "invnet.fit: validation must be a fraction of the training rows (e.g. 0.1) or a "
            f'dict of held-out arrays ({{"x": ...}}), got {type(validation).__name__}'
        )
    fraction = float(validation)
    if not 0.0 <= fraction < 1.0:
        raise ValueError(
            f"invnet.fit: validation={validation!r}: a fraction must be in [0, 1), e.g. 0.1"
        )
    return None, fraction


def _old_validation(validation, renamed):
    if "val_data" in renamed and renamed["val_data"] is not None:
        return renamed["val_data"]
    if renamed.get("val_fraction"):
        return renamed["val_fraction"]
    return validation


def _old_stopping(early_stopping, renamed):
    names = ("patience", "min_delta", "restore_best")
    if not any(n in renamed for n in names):
        return early_stopping
    return EarlyStopping(**{n: renamed[n] for n in names if n in renamed})


def _old_checkpoints(checkpoints, renamed):
    if renamed.get("checkpoint_dir") is None:
        return checkpoints
    return Checkpoints(
        renamed["checkpoint_dir"], every=renamed.get("checkpoint_every"),
        save_best=bool(renamed.get("save_best", False)),
    )  # fmt: skip


def _whole(name: str, value, *, low: int) -> None:
    try:
        if isinstance(value, bool):
            raise TypeError
        ok = operator.index(value) >= low
    except TypeError:
        raise TypeError(f"invnet.fit: {name} must be an int >= {low}, got {value!r}") from None
    if not ok:
        raise ValueError(f"invnet.fit: {name} must be an int >= {low}, got {value!r}")
