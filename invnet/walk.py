"""The one walk of a model: `steps` (the leaf layers in the order ``forward`` applies them,
for per-layer checks) and `nodes` (every bijector, for settings and hooks), both built from
each container's `Bijector.chain` / `Bijector.branches` / `Bijector.children`.

A chain (`invnet.Sequential`, `invnet.Inverse`, `invnet.Flow`, ...) is opened into its
children. A multi-branch layer (`invnet.FactorOut`: part of the channels leave, the rest go
through an inner model) is opened too: its `Bijector.branches` gives a `Move` that splits the
state into parts, the children that act on one part each, and a `Move` that joins the parts.
The state between steps is then a tuple of arrays, and each `Step` knows where its part is
(its ``at``: a path of tuple indices). Moves carry no log-det and are not layers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from invnet import _context

__all__ = ["Move", "Step", "steps", "layers", "nodes", "flipped"]


def flipped():
    """Within this block data runs through layers' ``inverse`` as part of the model's
    ``forward`` (an `invnet.Inverse` wrapper): flips the context's direction."""
    return _context.using(flipped=not _context.current().flipped)


@dataclass(frozen=True)
class Move:
    """A relabelling of the state between steps (a split into parts, or their join): a
    bijection with log-det 0 that is not a layer. ``forward`` and ``inverse`` map states."""

    forward: Callable[[Any], Any]
    inverse: Callable[[Any], Any]


def _get(state, at: tuple[int, ...]):
    for i in at:
        state = state[i]
    return state


def _put(state, at: tuple[int, ...], value):
    if not at:
        return value
    parts = list(state)
    parts[at[0]] = _put(state[at[0]], at[1:], value)
    return tuple(parts)


@dataclass(frozen=True)
class Step:
    """One step of a model's ``forward``: a leaf layer (``layer``), run inverted inside an
    `invnet.Inverse`, or a `Move` between parts (``layer`` is None). ``name`` is the path,
    e.g. ``model[2].bijector``; ``at`` says which part of the state the step acts on."""

    name: str
    layer: Any
    inverted: bool
    at: tuple[int, ...] = ()
    move: Move | None = None

    def part(self, state):
        """The part of ``state`` this step acts on."""
        return _get(state, self.at)

    def forward(self, h, cond=None):
        """This step as the model's ``forward`` applies it to its part ``h``: ``(out,
        log_det)`` (a move returns log-det None)."""
        return self._apply(h, cond, False)

    def inverse(self, h, cond=None):
        """This step as the model's ``inverse`` applies it to its part ``h``."""
        return self._apply(h, cond, True)

    def _apply(self, h, cond, model_inverse: bool):
        if self.move is not None:
            return (self.move.inverse if model_inverse else self.move.forward)(h), None
        cond = cond if self.layer.cond_dim else None
        method = self.layer.inverse if model_inverse != self.inverted else self.layer.forward
        if self.inverted:
            with flipped():
                return method(h, cond=cond)
        return method(h, cond=cond)

    def put(self, state, value):
        """``state`` with this step's part replaced by ``value``."""
        return _put(state, self.at, value)


def steps(model, name: str = "model", inverted: bool = False, at: tuple[int, ...] = ()):
    """The steps of ``model`` in the order its ``forward`` applies them: every leaf layer, and
    the moves between the parts of multi-branch layers.

    Chains (`Sequential`, `Inverse`, `invnet.Flow`, `invnet.reversible`, ...) are opened
    through their `Bijector.chain`, multi-branch layers (`invnet.FactorOut`) through their
    `Bijector.branches`; ``Inverse`` flips the direction and the order."""
    parts = model.chain()
    if parts is not None:
        out: list[Step] = []
        for suffix, child, flip in reversed(parts) if inverted else parts:
            out += steps(child, name + suffix, inverted != flip, at)
        return out
    branches = model.branches()
    if branches is None:
        return [Step(name, model, inverted, at)]
    split, children, join = branches
    inner: list[Step] = []
    for suffix, child, index in children:
        inner += steps(child, name + suffix, inverted, (*at, index))
    if inverted:
        split, join = Move(join.inverse, join.forward), Move(split.inverse, split.forward)
        inner = inner[::-1]
    return [
        Step(name + ".split", None, False, at, split),
        *inner,
        Step(name + ".join", None, False, at, join),
    ]


def layers(model, name: str = "model") -> list[Step]:
    """The leaf layers of ``model`` in the order its ``forward`` applies them (`steps`
    without the moves)."""
    return [s for s in steps(model, name) if s.move is None]


def nodes(model) -> Iterator[Any]:
    """Every bijector in ``model`` (itself first, then its children, depth first)."""
    yield model
    for child in model.children():
        yield from nodes(child)
