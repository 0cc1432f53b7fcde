"""Which layer turned which samples into NaN or inf: `explain_nonfinite`.

An elementwise bijection onto an interval (`invnet.Tanh` onto (-1, 1), `invnet.Sigmoid`,
`invnet.Logit`) has no preimage for a target outside it, and its inverse returns NaN there;
a model's inverse then returns NaN for those samples with nothing to say where it started.
`explain_nonfinite` walks the model's leaf layers (`invnet.walk.steps`, the one walk every
tool uses) in the direction asked, runs each on the states that reach it, and records, per
layer, the samples whose values were all finite going in and are not coming out: the first
such layer of a sample is where it left the model's range. It runs op by op
(`invnet.eager`: no compile), once per layer: a diagnosis, not a hot path.

`warn_nonfinite` is the cheap check around a call: one ``isfinite`` reduction of the output
(concrete arrays only; inside a trace it does nothing), and only when an output of a finite
input is non-finite does it run `explain_nonfinite` and warn with the layer and samples.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from invnet._runtime import eager
from invnet.core import Bijector
from invnet.walk import steps

__all__ = ["NonFiniteLayer", "NonFiniteReport", "explain_nonfinite", "warn_nonfinite"]

_SHOWN = 10  # sample indices listed per layer in messages


@dataclass(frozen=True)
class NonFiniteLayer:
    """One layer that produced NaN/inf from finite values: its ``name`` in the model
    (``model[1]``, ``model.bijector[3]``), its type, the flat indices of those ``samples``
    into the batch, and the range ``(low, high)`` of what reached the layer for them."""

    name: str
    kind: str
    samples: tuple[int, ...]
    low: float
    high: float

    def __str__(self) -> str:
        shown = list(self.samples[:_SHOWN])
        more = " ..." if len(self.samples) > _SHOWN else ""
        return (
            f"{self.name} ({self.kind}): {len(self.samples)} sample(s) {shown}{more} became "
            f"NaN/inf there; their values reaching it span [{self.low:.4g}, {self.high:.4g}]"
        )


@dataclass(frozen=True)
class NonFiniteReport:
    """What `explain_nonfinite` found. ``layers``: every layer that turned finite samples
    non-finite, in the order the direction runs them (``layers[0]`` is the first);
    ``nonfinite_input``: samples already non-finite in the data given; ``inverse``: the
    direction walked. ``ok`` when neither happened."""

    inverse: bool
    batch: int
    layers: tuple[NonFiniteLayer, ...]
    nonfinite_input: tuple[int, ...]

    @property
    def ok(self) -> bool:
        return not self.layers and not self.nonfinite_input

    @property
    def first(self) -> NonFiniteLayer | None:
        return self.layers[0] if self.layers else None

    def __str__(self) -> str:
        direction = "inverse" if self.inverse else "forward"
        if self.ok:
            return f"{direction}: every value of all {self.batch} samples stays finite"
        lines = [f"{direction} of {self.batch} samples:"]
        if self.nonfinite_input:
            shown = list(self.nonfinite_input[:_SHOWN])
            more = " ..." if len(self.nonfinite_input) > _SHOWN else ""
            lines.append(f"  input: {len(self.nonfinite_input)} sample(s) {shown}{more} "
                         "already hold NaN/inf")  # fmt: skip
        lines += [f"  {layer}" for layer in self.layers]
        if self.layers and self.inverse:
            lines.append(
                "  an inverse gives NaN where the target has no preimage, e.g. outside the "
                "(-1, 1) of a Tanh or the (0, 1) of a Sigmoid: check that those targets can "
                "be outputs of the model"
            )
        return "\n".join(lines)


def _finite_samples(a: jax.Array, batch: int) -> np.ndarray:
    return np.asarray(jnp.all(jnp.isfinite(a.reshape(batch, -1)), axis=1))


def explain_nonfinite(model: Bijector, data, *, inverse: bool = True, cond=None) -> NonFiniteReport:
    """Run ``model`` layer by layer on ``data`` and name the layers that turn finite
    samples into NaN/inf, with the samples (flat indices into the batch).

    ``inverse=True`` (default) walks ``model.inverse`` from targets ``data``; ``False`` walks
    ``model.forward``. Each sample is reported at the first layer where it went non-finite.

    Example:
        >>> import jax.numpy as jnp, invnet
        >>> from flax import nnx
        >>> model = invnet.Sequential(invnet.LULinear(2, rngs=nnx.Rngs(0)), invnet.Tanh())
        >>> y = jnp.array([[0.5, -0.2], [1.5, 0.0], [0.1, 0.1]])   # 1.5: outside (-1, 1)
        >>> report = invnet.explain_nonfinite(model, y)
        >>> report.first.name, report.first.samples
        ('model[1]', (1,))
    """
    h = jnp.asarray(data)
    batch_shape = model.batch_shape(h, inverse=inverse)
    batch = int(np.prod(batch_shape, dtype=np.int64))
    finite = _finite_samples(h, batch)
    bad_input = tuple(int(i) for i in np.flatnonzero(~finite))
    walk = steps(model)
    found = []
    with eager():
        for step in reversed(walk) if inverse else walk:
            part = step.part(h)  # a multi-branch layer's parts: the state is a tuple there
            out, _ = step.inverse(part, cond) if inverse else step.forward(part, cond)
            h = step.put(h, out)
            if step.move is not None:
                continue
            now = _finite_state(h, batch)
            lost = finite & ~now
            if lost.any():
                reached = np.asarray(part.reshape(batch, -1))[lost]
                found.append(
                    NonFiniteLayer(
                        step.name,
                        type(step.layer).__name__,
                        tuple(int(i) for i in np.flatnonzero(lost)),
                        float(np.min(reached)),
                        float(np.max(reached)),
                    )
                )
            finite = finite & now
    return NonFiniteReport(inverse, batch, tuple(found), bad_input)


def _finite_state(state, batch: int) -> np.ndarray:
    """Per sample: every part of the state finite."""
    parts = [_finite_samples(leaf, batch) for leaf in jax.tree.leaves(state)]
    return np.logical_and.reduce(parts)


def warn_nonfinite(model: Bijector, data, out, *, inverse: bool, cond=None) -> None:
    """Warn, naming the layer and samples, when ``out`` (the result of ``model.inverse(data)``
    or ``model.forward(data)``) holds NaN/inf for a sample whose ``data`` was finite.

    Cheap when all is well: one ``isfinite`` reduction of ``out``. Does nothing inside a
    trace (``data`` or ``out`` a tracer). Meant for eager calls of the model's methods.
    """
    if isinstance(out, jax.core.Tracer) or isinstance(data, jax.core.Tracer):
        return
    if bool(jnp.all(jnp.isfinite(out))):
        return
    report = explain_nonfinite(model, data, inverse=inverse, cond=cond)
    if report.layers:
        warnings.warn(
            f"invnet: non-finite values in the {'inverse' if inverse else 'forward'}: {report}",
            RuntimeWarning,
            stacklevel=3,
        )
