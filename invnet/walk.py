"""The one walk of a model: `steps` (the leaf layers in the order ``forward`` applies them,
for per-layer checks) and `nodes` (every bijector, for settings and hooks), both built from
each container's `Bijector.chain` / `Bijector.children`; and what is done through them:
`set_precision` and `from_spec`."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from flax import nnx

from invnet.core import _LAYER_TYPES, Bijector, _flipped, check_precision

__all__ = ["Step", "steps", "nodes", "set_precision", "from_spec"]


@dataclass(frozen=True)
class Step:
    """One leaf layer of a model, as ``forward`` meets it: ``inverted`` when the model runs
    the layer's ``inverse`` there (inside an `Inverse`). ``name`` is its path, e.g.
    ``model[2].bijector``."""

    name: str
    layer: Bijector
    inverted: bool

    def forward(self, h, cond=None):
        """This step as the model's ``forward`` applies it."""
        cond = cond if self.layer.cond_dim else None
        if self.inverted:
            with _flipped():
                return self.layer.inverse(h, cond=cond)
        return self.layer.forward(h, cond=cond)

    def inverse(self, h, cond=None):
        """This step as the model's ``inverse`` applies it."""
        cond = cond if self.layer.cond_dim else None
        if self.inverted:
            with _flipped():
                return self.layer.forward(h, cond=cond)
        return self.layer.inverse(h, cond=cond)


def steps(model: Bijector, name: str = "model", inverted: bool = False) -> list[Step]:
    """The leaf layers of ``model`` in the order its ``forward`` applies them.

    Chains (`Sequential`, `Inverse`, `invnet.Flow`, `invnet.Reversible`, ...) are opened
    through their `Bijector.chain`; ``Inverse`` flips the direction and the order. A layer
    that is not a chain is one step."""
    parts = model.chain()
    if parts is None:
        return [Step(name, model, inverted)]
    out: list[Step] = []
    for suffix, child, flip in reversed(parts) if inverted else parts:
        out += steps(child, name + suffix, inverted != flip)
    return out


def nodes(model: Bijector) -> Iterator[Bijector]:
    """Every bijector in ``model`` (itself first, then its children, depth first)."""
    yield model
    for child in model.children():
        yield from nodes(child)


def set_precision(model: Bijector, precision: str) -> Bijector:
    """Set the matmul precision of every layer in ``model`` (in place); returns ``model``.

    ``"highest"`` (default): full float32 on every platform. ``"default"``: the platform's
    fast mode (TF32-like on NVIDIA GPUs: ~1e-3 relative error per product). ``"bf16x6"``,
    ``"bf16x3"``, ``"tf32x3"`` (GPU only): XLA's multi-pass tensor-core algorithms.
    ``"tf32_corrected"`` / ``"bf16_corrected"``: error-corrected split products
    (`invnet.splitmm`, Ootomo & Yokota 2022) for the GEMMs of `LULinear` and `Conv1x1` (as
    written and compiled) and the products of the conditioners invnet builds (`MLP`,
    `ConvNet`, the masked layers of `MaskedAutoregressive`): float32-level accuracy from
    tensor-core products on GPUs; exact but about 3x slower on CPUs. float64 inputs always
    run at full precision.
    """
    check_precision(precision)
    for node in nodes(model):
        node.precision = precision
    return model


def from_spec(spec: dict[str, Any], *, rngs: nnx.Rngs | None = None) -> Bijector:
    """Rebuild a model (with fresh parameters) from ``Bijector.to_spec()`` output."""
    rngs = rngs if rngs is not None else nnx.Rngs(0)
    kind = spec.get("type")
    cls = _LAYER_TYPES.get(kind)
    if cls is None:
        raise ValueError(f"unknown layer type {kind!r}; known: {sorted(_LAYER_TYPES)}")
    config = dict(spec.get("config", {}))
    children = [from_spec(c, rngs=rngs) for c in spec.get("children", [])]
    layer = cls.from_config(config, children, rngs=rngs)
    layer.precision = check_precision(spec.get("precision", "highest"))
    return layer
