"""Bases for two common kinds of layer: `Elementwise` (``y_i = f(x_i)``, any event) and
`Delegate` (a wrapper that runs one inner bijector as it is)."""

from __future__ import annotations

from typing import Any

from invnet.core import Bijector, Shape

__all__ = ["Elementwise", "Delegate"]


class Elementwise(Bijector):
    """Base of elementwise bijections ``y_i = f(x_i)``: any event size, and an event rank
    (the axes the log-det sums over) that is either given (``event_ndim=k``) or, when left
    at ``None``, taken from the neighbouring layers in a `Sequential` (1 on its own)."""

    def _init_event(self, event_ndim: int | None) -> None:
        if event_ndim is not None and (not isinstance(event_ndim, int) or event_ndim < 1):
            raise ValueError(
                f"{type(self).__name__}: event_ndim must be a positive integer or None, "
                f"got {event_ndim!r}"
            )
        self._auto_rank = event_ndim is None
        self.event_ndim = 1 if event_ndim is None else int(event_ndim)

    def flexible_rank(self) -> bool:
        return self._auto_rank

    def _adopt_event_ndim(self, ndim: int) -> bool:
        if ndim != self.event_ndim and self._auto_rank:
            self.event_ndim = ndim
        return ndim == self.event_ndim

    def _event_config(self) -> dict[str, Any]:
        return {"event_ndim": None if self._auto_rank else self.event_ndim}


class Delegate(Bijector):
    """Base of wrappers that run one inner bijector as it is (`invnet.Flow`,
    `invnet.reversible`): events, hooks and the chain come from the inner one."""

    def inner(self) -> Bijector:  # pragma: no cover - abstract
        raise NotImplementedError

    def _copy_shape(self) -> None:
        inner = self.inner()
        self.cond_dim = inner.cond_dim
        self.event_ndim = len(inner.event_pattern())
        self.dim = inner.dim

    def event_pattern(self) -> Shape:
        return self.inner().event_pattern()

    def output_shape(self, shape: Shape) -> Shape:
        return self.inner().output_shape(shape)

    def input_shape(self, shape: Shape) -> Shape:
        return self.inner().input_shape(shape)

    def flexible_rank(self) -> bool:
        return self.inner().flexible_rank()

    def _adopt_event_ndim(self, ndim: int) -> bool:
        ok = self.inner()._adopt_event_ndim(ndim)
        self._copy_shape()
        return ok

    def error_bound(self) -> tuple[float, str]:
        return self.inner().error_bound()
