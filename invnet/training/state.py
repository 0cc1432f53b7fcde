"""`invnet.fit`'s state between epochs: what a checkpoint stores and a resume restores."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import jax
import optax

from invnet import resume


class NonFiniteStepWarning(RuntimeWarning):
    """A training step had a non-finite loss, gradient or update and was not applied."""


@dataclass
class History:
    """What `invnet.fit` did, epoch by epoch.

    ``train_loss[e]``: mean loss of epoch ``e``'s applied (finite) steps. ``val_loss[e]``:
    the validation loss after epoch ``e`` (empty without validation data). ``best_epoch``
    and ``best_loss`` refer to the monitored loss (validation if given, else training).
    ``nonfinite_steps`` counts steps not applied (a non-finite loss, gradient or update);
    ``nonfinite_at`` lists their global step numbers (0-based). ``stop_reason`` is
    ``"epochs"``, ``"early_stopping"``, ``"nonfinite"`` or ``"interrupted"`` (Ctrl-C: then
    ``epochs`` counts the completed epochs and ``steps`` every step run, those of the
    interrupted epoch included). ``epoch_seconds[e]``: wall time of epoch ``e`` (the first
    includes compilation); ``compile_seconds``: how long the first training step took to
    return, i.e. tracing plus XLA compilation (near 0 when the step was compiled by an
    earlier call; summed over resumed calls); ``seconds``: the whole call (after a resume:
    plus the earlier calls).
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
    compile_seconds: float = 0.0

    @property
    def stopped_early(self) -> bool:
        return self.stop_reason == "early_stopping"


@dataclass
class TrainState:
    """Everything the training loop carries from one epoch to the next.

    ``params``/``opt_state``/``rest`` (buffers) live where the placement put them; ``key``
    draws each epoch's order and step keys, ``val_key`` is the validation objective's key.
    ``best`` holds the best parameters so far, ``None`` before any improvement; it *is*
    ``params`` (the same object) while the loop's parameters are the best ones, which the
    checkpoint uses to store them once. ``next_epoch`` counts epochs done (resumed ones
    included), ``bad_epochs`` those since the last improvement.
    """

    params: Any
    opt_state: Any
    rest: Any
    key: jax.Array
    val_key: jax.Array
    best: Any = None
    bad_epochs: int = 0
    next_epoch: int = 0
    history: History = field(default_factory=History)

    @classmethod
    def start(cls, params, rest, tx: optax.GradientTransformation, key) -> TrainState:
        """A fresh run: ``tx.init(params)``, the key split into the loop's and validation's."""
        key, val_key = jax.random.split(key)
        return cls(params, tx.init(params), rest, key, val_key)

    def restore(self, ckpt: resume.Checkpoint) -> None:
        """Take the loop state of a fit checkpoint (whose model this state was split from)."""
        self.opt_state = ckpt.opt_state(self.opt_state)
        self.best = ckpt.params("best", self.params)
        loop_params = ckpt.params("params", self.params)
        if loop_params is not None:  # the file's model holds the best, the loop went on
            self.params = loop_params
        self.key, self.val_key = ckpt.key("key"), ckpt.key("val_key")
        names = {f.name for f in fields(History)}
        self.history = History(**ckpt.history(names, optional=frozenset({"compile_seconds"})))
        self.bad_epochs, self.next_epoch = ckpt.state["bad_epochs"], ckpt.state["next_epoch"]
        if ckpt.state["has_best"] and self.best is None:
            self.best = self.params  # the best were the loop's parameters

    def place(self, placement) -> None:
        """Move parameters, optimizer state, buffers and best to the placement's devices."""
        best_is_loop = self.best is self.params
        self.params, self.opt_state, self.rest = placement.state(
            (self.params, self.opt_state, self.rest)
        )
        if self.best is not None:
            self.best = self.params if best_is_loop else placement.state(self.best)

    @property
    def epoch(self) -> int:
        """The last epoch done (``-1`` before the first)."""
        return self.next_epoch - 1
