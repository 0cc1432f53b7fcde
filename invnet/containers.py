"""The two composition containers: `Sequential` (a chain) and `Inverse` (a flipped bijector)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from flax import nnx

from invnet import _runtime
from invnet.core import Bijector, Shape, fmt, unify_shapes
from invnet.walk import flipped

__all__ = ["Sequential", "Inverse"]


def _name(i: int, layer: Bijector) -> str:
    return f"layer {i} ({type(layer).__name__})"


def _fit_shapes(layers: list[Bijector]) -> tuple[Shape, Shape]:
    """Check that neighbours fit; return the chain's (input, output) event patterns.

    Layers of flexible rank (elementwise ones) take the rank of the events around them."""
    rigid = [lay for lay in layers if not lay.flexible_rank()]
    if rigid:
        first_rank = len(rigid[0].event_pattern())
        for layer in layers[: layers.index(rigid[0])]:
            layer._adopt_event_ndim(first_rank)
    current: Shape | None = None
    inputs: list[Shape] = []
    for i, layer in enumerate(layers):
        if current is not None and len(layer.event_pattern()) != len(current):
            layer._adopt_event_ndim(len(current))
        pattern = layer.event_pattern()
        merged = pattern if current is None else unify_shapes(current, pattern)
        if merged is None:
            raise ValueError(
                f"Sequential: {_name(i - 1, layers[i - 1])} outputs events of shape "
                f"{fmt(current)} but {_name(i, layer)} takes {fmt(pattern)}: the layers "
                "have different sizes where they meet"
            )
        try:
            current = layer.output_shape(merged)
        except ValueError as err:
            raise ValueError(
                f"Sequential: {_name(i, layer)} cannot take events {fmt(merged)}: {err}"
            ) from None
        inputs.append(merged)
    if current is None:
        return (None,), (None,)
    out = current
    for layer, known in zip(reversed(layers), reversed(inputs), strict=True):
        out = unify_shapes(known, layer.input_shape(out)) or known
    return out, current


class Sequential(Bijector):
    """Compose bijectors: ``forward`` applies them in list order, ``inverse`` in reverse.

    Map: ``y = f_n(... f_2(f_1(x)))``. Log-det: the sum of the layers' log-dets. Inverse:
    ``x = f_1^{-1}(... f_n^{-1}(y))``, each layer's exact inverse. ``cond`` is passed to
    every conditional layer.

    Neighbours must agree on the event shape where they meet (checked when the model is
    built: the error names the pair). Elementwise layers (`invnet.LeakyReLU`, ...) take the
    event rank of the layers around them, so they work between image layers too.

    ``len(model)``, iteration and indexing work like a list; a slice is again a
    ``Sequential`` sharing the same layers, so ``model[:k].inverse(h)`` maps a hidden state
    after layer ``k`` back to the input exactly.

    Example:
        >>> import jax, jax.numpy as jnp, invnet
        >>> from flax import nnx
        >>> model = invnet.Sequential(invnet.LULinear(3, rngs=nnx.Rngs(0)), invnet.LeakyReLU(0.5))
        >>> x = jnp.ones((2, 3))
        >>> y, log_det = model.forward(x)
        >>> x_back, inv_log_det = model.inverse(y)
        >>> bool(jnp.allclose(x_back, x, atol=1e-5)), log_det.shape
        (True, (2,))
    """

    def __init__(self, *layers: Bijector):
        if len(layers) == 1 and isinstance(layers[0], list | tuple):
            layers = tuple(layers[0])
        for i, layer in enumerate(layers):
            if not isinstance(layer, Bijector):
                raise TypeError(
                    f"Sequential: layer {i} is {type(layer).__name__}, not an invnet Bijector; "
                    "only bijective layers can be composed into an invertible model"
                )
        self.cond_dim = max((layer.cond_dim for layer in layers), default=0)
        for layer in layers:
            if layer.cond_dim not in (0, self.cond_dim):
                raise ValueError("Sequential: conditional layers disagree on cond_dim")
        self.layers = nnx.List(list(layers))
        self._set_shapes()

    def _set_shapes(self) -> None:
        self._in_pattern, self._out_pattern = _fit_shapes(list(self.layers))
        self.event_ndim = len(self._in_pattern)
        self.dim = self._in_pattern[0] if self.event_ndim == 1 else None
        if self.dim is None and self.event_ndim == 1:
            self.dim = self._out_pattern[0]

    def event_pattern(self) -> Shape:
        return self._in_pattern

    def output_shape(self, shape: Shape) -> Shape:
        for layer in self.layers:
            shape = layer.output_shape(unify_shapes(shape, layer.event_pattern()) or shape)
        return shape

    def input_shape(self, shape: Shape) -> Shape:
        for layer in reversed(list(self.layers)):
            shape = layer.input_shape(unify_shapes(shape, layer.output_pattern()) or shape)
        return shape

    def flexible_rank(self) -> bool:
        return all(layer.flexible_rank() for layer in self.layers)

    def _adopt_event_ndim(self, ndim: int) -> bool:
        if ndim == self.event_ndim:
            return True
        if not self.flexible_rank():
            return False
        for layer in self.layers:
            layer._adopt_event_ndim(ndim)
        self._set_shapes()
        return True

    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self) -> Iterator[Bijector]:
        return iter(self.layers)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return Sequential(*list(self.layers)[index])
        return self.layers[index]

    def chain(self) -> list[tuple[str, Bijector, bool]]:
        return [(f"[{i}]", layer, False) for i, layer in enumerate(self.layers)]

    def get_config(self) -> dict[str, Any]:
        return {}

    @classmethod
    def from_config(cls, config, children, *, rngs):
        return cls(*children)

    @_runtime.compiled
    def forward(self, x, *, cond=None, return_intermediates: bool = False):
        """Apply every layer in order. With ``return_intermediates=True`` also returns the
        list of each layer's output (``hs[k]`` is the state after layer ``k``). Compiled on
        concrete arrays, as `Bijector.forward`."""
        x = self._check_input(x, "x")
        cond = self._check_cond(cond, x)
        log_det = self._zero_log_det(x)
        hs = []
        for layer in self.layers:
            x, ld = layer.forward(x, cond=cond if layer.cond_dim else None)
            log_det = log_det + ld
            hs.append(x)
        if return_intermediates:
            return x, log_det, hs
        return x, log_det

    @_runtime.compiled(check_finite=True, precompute="inverse")
    def inverse(self, y, *, cond=None):
        y = self._check_input(y, "y", inverse=True)
        cond = self._check_cond(cond, y, inverse=True)
        log_det = self._zero_log_det(y, inverse=True)
        for layer in reversed(list(self.layers)):
            y, ld = layer.inverse(y, cond=cond if layer.cond_dim else None)
            log_det = log_det + ld
        return y, log_det


class Inverse(Bijector):
    """The inverse of a bijector: ``Inverse(b).forward`` is ``b.inverse`` and vice versa.

    Example:
        >>> import jax.numpy as jnp, invnet
        >>> inv = invnet.Inverse(invnet.LeakyReLU(0.5))
        >>> inv.forward(jnp.array([-1.0, 2.0]))[0]
        Array([-2.,  2.], dtype=float32)
    """

    def __init__(self, bijector: Bijector):
        if not isinstance(bijector, Bijector):
            raise TypeError(f"Inverse: expected an invnet Bijector, got {type(bijector).__name__}")
        self.bijector = bijector
        self.cond_dim = bijector.cond_dim
        self._set_shapes()

    def _set_shapes(self) -> None:
        pattern = self.event_pattern()
        self.event_ndim = len(pattern)
        self.dim = pattern[0] if self.event_ndim == 1 else None

    def event_pattern(self) -> Shape:
        return self.bijector.output_pattern()

    def output_shape(self, shape: Shape) -> Shape:
        return self.bijector.input_shape(shape)

    def input_shape(self, shape: Shape) -> Shape:
        return self.bijector.output_shape(shape)

    def flexible_rank(self) -> bool:
        return self.bijector.flexible_rank()

    def _adopt_event_ndim(self, ndim: int) -> bool:
        ok = self.bijector._adopt_event_ndim(ndim)
        self._set_shapes()
        return ok

    def error_bound(self) -> tuple[float, str]:
        return self.bijector.error_bound()

    def chain(self) -> list[tuple[str, Bijector, bool]]:
        return [(".bijector", self.bijector, True)]

    def get_config(self) -> dict[str, Any]:
        return {}

    @classmethod
    def from_config(cls, config, children, *, rngs):
        return cls(children[0])

    def forward(self, x, *, cond=None):
        with flipped():
            return self.bijector.inverse(x, cond=cond)

    def inverse(self, y, *, cond=None):
        with flipped():
            return self.bijector.forward(y, cond=cond)
