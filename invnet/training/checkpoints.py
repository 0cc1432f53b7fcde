"""What an `invnet.fit` checkpoint holds besides the model (see `invnet.resume`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import jax
import numpy as np

from invnet import resume
from invnet.training.state import TrainState


@dataclass(frozen=True)
class RunInfo:
    """What a resume must match: batch size, shuffle, row count, the data's fingerprint."""

    batch_size: int
    shuffle: bool
    n_train: int
    data_sha256: str | None


def contents(
    state: TrainState, model_params, run: RunInfo, placement
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """``(metadata, extra_arrays)`` of a checkpoint after epoch ``state.epoch`` whose model
    holds ``model_params`` (the loop's parameters, or the best ones for ``last.invnet``)."""
    history = state.history
    meta = {
        "epoch": state.epoch,
        "train_loss": history.train_loss[-1] if history.train_loss else None,
        "fit": {
            "version": resume.STATE_VERSION,
            "next_epoch": state.next_epoch,
            "history": asdict(history),
            "bad_epochs": state.bad_epochs,
            "has_best": state.best is not None,
            "batch_size": run.batch_size,
            "shuffle": run.shuffle,
            "n_train": run.n_train,
            "data_sha256": run.data_sha256,
            "key_impl": str(jax.random.key_impl(state.key)),
        },
    }
    if history.val_loss:
        meta["val_loss"] = history.val_loss[-1]
    keep_best = state.best is not None and state.best is not state.params
    extra = resume.pack(
        opt_state=placement.host(state.opt_state),
        key=state.key,
        val_key=state.val_key,
        loop_params=None if model_params is state.params else placement.host(state.params),
        best_params=placement.host(state.best) if keep_best else None,
    )
    return meta, extra
