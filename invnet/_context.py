"""The execution context of invnet models: one context variable, read by the runtime, the
layers and the product-precision helpers.

What a layer's ``forward`` / ``inverse`` computes depends on where it is called from; all of
that is held here, in one frozen `Context`:

* ``eager``: inside ``invnet.eager()``: run op by op, as written (no automatic ``jax.jit``);
* ``inside``: inside a call the runtime compiled: the model's methods called from there run as
  written instead of compiling again;
* ``prepared``: while `invnet.freeze` traces, ``id(layer) -> arrays`` it precomputed; each
  such layer runs its ``forward_prepared`` / ``inverse_prepared``;
* ``flipped``: data runs through a layer's ``inverse`` as part of the model's ``forward``
  (inside an odd number of `invnet.Inverse` wrappers): data-dependent initialisation
  (`invnet.ActNorm`) happens on the data side only;
* ``matmul``: the `invnet.splitmm` mode ``(mode, emulate)`` of the conditioners' products.

Nothing in the package is below this module.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any


@dataclasses.dataclass(frozen=True)
class Context:
    eager: bool = False
    inside: bool = False
    prepared: Mapping[int, Any] | None = None
    flipped: bool = False
    matmul: tuple[str, bool] | None = None


_CONTEXT: contextvars.ContextVar[Context] = contextvars.ContextVar(
    "invnet_context",
    default=Context(),  # noqa: B039 - frozen, never mutated
)


def current() -> Context:
    """The context the calling code runs in."""
    return _CONTEXT.get()


@contextlib.contextmanager
def using(**changes: Any) -> Iterator[Context]:
    """Within this block the context has ``changes`` (field names of `Context`)."""
    token = _CONTEXT.set(dataclasses.replace(_CONTEXT.get(), **changes))
    try:
        yield _CONTEXT.get()
    finally:
        _CONTEXT.reset(token)
