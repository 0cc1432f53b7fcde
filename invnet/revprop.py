"""Reversible backprop: train deep invertible models without storing activations.

Ordinary backprop keeps every block's input (and the conditioner's hidden activations) from
the forward pass until the backward pass reaches it: memory grows linearly with depth.
An invertible block does not need them: its input can be recomputed from its output.

`Reversible` wraps a model (a `Sequential` of blocks, or one block) in a
``jax.custom_vjp`` that keeps only the model's output. The backward pass walks the blocks
last to first; for block ``k`` with output ``y_k`` and cotangents ``(g_y, g_logdet)`` it

1. recomputes the input ``x_k = f_k^{-1}(y_k)`` with the block's exact inverse,
2. re-runs ``f_k`` at ``x_k`` under ``jax.vjp`` and pulls ``(g_y, g_logdet)`` back to the
   block's parameters, to ``x_k`` (the next ``g_y``) and to ``cond``,
3. frees everything of block ``k`` before moving to block ``k - 1``.

Activation memory is then one block's worth, whatever the depth; the price is one extra
inverse and one extra forward per block (memcnn, RevNets: Gomez et al., "The Reversible
Residual Network", NeurIPS 2017). When all blocks share one structure (e.g.
``Sequential(*[Sequential(coupling, permute) for _ in range(n)])``) their parameters are
stacked and ``scan=True`` runs both passes as a ``lax.scan``: compile time stays flat in
depth, at the price of one stacked copy of the parameters and of their gradients (XLA
temp memory grows by about twice the parameter bytes). The default (``scan=False``)
unrolls the blocks and keeps the temp memory flat in depth.

Accuracy: the recomputed inputs carry the model's round-trip error, so the gradients differ
from ordinary backprop by about that much: to rounding (~1e-12) in float64, and about 1e-5
relative in float32 for a well-conditioned 8-block coupling flow (tests state the bounds).
A badly conditioned model (e.g. 16 coupling blocks that each scale by up to e^2) cannot be
recomputed accurately in float32 and its reversible gradients are wrong by as much as its
round trip: check ``invnet.verify``-style round-trip errors before relying on it. The
error is also multiplied by each gradient's own sensitivity to the input: on a 32-step
16x16x3 Glow with ReLU conditioners (float32, `benchmarks/images.py`) the gradients agree to
4e-4 over all parameters but only to 5.6% on the worst single parameter array (whose
ordinary gradient moves ~3% for a 1e-6 change of the input). Use float64 when every
parameter's gradient must be exact to more digits.
Parameters that the forward pass mutates (an `ActNorm` still waiting for data) are refused:
initialise with `invnet.data_init` first.

Example:
    >>> import jax, jax.numpy as jnp, invnet
    >>> from flax import nnx
    >>> rngs = nnx.Rngs(0)
    >>> blocks = [invnet.Sequential(invnet.AffineCoupling(4, hidden=(8,), rngs=rngs),
    ...                             invnet.Permute(4, rngs=rngs)) for _ in range(3)]
    >>> model = invnet.reversible(invnet.Sequential(*blocks))
    >>> x = jnp.ones((2, 4))
    >>> loss = lambda m: jnp.sum(m.forward(x)[0] ** 2)
    >>> grads = nnx.grad(loss)(model)      # computed without stored activations
    >>> y, log_det = model.forward(x)      # same outputs as the wrapped model
    >>> bool(jnp.allclose(y, model.model.forward(x)[0]))
    True
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from invnet.bases import Delegate
from invnet.containers import Sequential
from invnet.core import Bijector, nodes, prepared_active

__all__ = ["Reversible", "reversible"]


def _float_mask(state) -> list[bool]:
    return [jnp.issubdtype(leaf.dtype, jnp.inexact) for leaf in jax.tree.leaves(state)]


def _split_float(state):
    leaves, treedef = jax.tree.flatten(state)
    floats = [leaf for leaf in leaves if jnp.issubdtype(leaf.dtype, jnp.inexact)]
    others = [leaf for leaf in leaves if not jnp.issubdtype(leaf.dtype, jnp.inexact)]
    return floats, others, treedef


def _join_float(floats, others, treedef, mask):
    fi, oi = iter(floats), iter(others)
    return jax.tree.unflatten(treedef, [next(fi) if m else next(oi) for m in mask])


def _apply(graphdef, state, x, cond, inverse: bool):
    # rebuild the state's variables in the current trace: a layer that writes to its own
    # variables during a call (ActNorm's in-trace init guard) may then do so harmlessly
    leaves, treedef = jax.tree.flatten(state)
    block = nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))
    cond = cond if block.cond_dim else None
    return block.inverse(x, cond=cond) if inverse else block.forward(x, cond=cond)


def _block_vjp(graphdef, state, x, cond, g_y, g_ld, inverse: bool):
    """Recompute the block's input from its output ``x`` (sic: the output is passed in) and
    pull the cotangents back. Returns ``(input, g_input, g_state_floats, g_cond)``."""
    x_in = _apply(graphdef, state, x, cond, not inverse)[0]
    floats, others, treedef = _split_float(state)
    mask = _float_mask(state)

    def f(fl, xi, c):
        return _apply(graphdef, _join_float(fl, others, treedef, mask), xi, c, inverse)

    if cond is None:
        _, pull = jax.vjp(lambda fl, xi: f(fl, xi, None), floats, x_in)
        g_fl, g_x = pull((g_y, g_ld))
        g_c = None
    else:
        _, pull = jax.vjp(f, floats, x_in, cond)
        g_fl, g_x, g_c = pull((g_y, g_ld))
    return x_in, g_x, g_fl, g_c


def _run(spec, states, x, cond):
    graphdefs, scanned, inverse, batch_ndim = spec
    log_det = jnp.zeros(x.shape[:batch_ndim], x.dtype)
    if scanned:

        def body(carry, state):
            h, ld = carry
            h, step_ld = _apply(graphdefs[0], state, h, cond, inverse)
            return (h, ld + step_ld), None

        (x, log_det), _ = jax.lax.scan(body, (x, log_det), states, reverse=inverse)
        return x, log_det
    order = range(len(graphdefs))
    for k in reversed(order) if inverse else order:
        x, step_ld = _apply(graphdefs[k], states[k], x, cond, inverse)
        log_det = log_det + step_ld
    return x, log_det


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _chain(spec, states, x, cond):
    return _run(spec, states, x, cond)


def _chain_fwd(spec, states, x, cond):
    y, log_det = _run(spec, states, x, cond)
    return (y, log_det), (states, y, cond)  # no intermediate activations kept


def _zero_cotangent(leaf):
    return np.zeros(leaf.shape, dtype=jax.dtypes.float0)


def _chain_bwd(spec, residuals, cotangents):
    graphdefs, scanned, inverse, _ = spec
    states, y, cond = residuals
    g_y, g_ld = cotangents
    g_cond = None if cond is None else jnp.zeros_like(cond)
    if scanned:
        mask = _float_mask(states)

        def body(carry, state):
            h, g_h, g_c = carry
            h, g_h, g_fl, g_ck = _block_vjp(graphdefs[0], state, h, cond, g_h, g_ld, inverse)
            if g_c is not None:
                g_c = g_c + g_ck
            return (h, g_h, g_c), g_fl

        (_, g_x, g_cond), g_floats = jax.lax.scan(
            body, (y, g_y, g_cond), states, reverse=not inverse
        )
        _, others, treedef = _split_float(states)
        g_states = _join_float(g_floats, [_zero_cotangent(o) for o in others], treedef, mask)
        return g_states, g_x, g_cond
    g_states = [None] * len(graphdefs)
    order = range(len(graphdefs))
    h = y
    for k in order if inverse else reversed(order):
        h, g_y, g_fl, g_ck = _block_vjp(graphdefs[k], states[k], h, cond, g_y, g_ld, inverse)
        _, others, treedef = _split_float(states[k])
        g_states[k] = _join_float(
            g_fl, [_zero_cotangent(o) for o in others], treedef, _float_mask(states[k])
        )
        if g_cond is not None:
            g_cond = g_cond + g_ck
    return tuple(g_states), g_y, g_cond


_chain.defvjp(_chain_fwd, _chain_bwd)


class Reversible(Delegate):
    """A model whose gradients are computed by reversible backprop (see module docstring).

    ``forward`` and ``inverse`` return the wrapped model's outputs and log-dets; their
    gradients with respect to parameters, inputs and ``cond`` are computed by recomputing
    each block's input with its inverse instead of storing it. The blocks are the steps of
    the model's top-level chain (the layers of a `Sequential`, or the model itself); put
    each group of layers that should be recomputed together in a nested `Sequential`.
    ``scan=True`` runs blocks that share one structure as a ``lax.scan`` (flat compile time,
    +2x parameter bytes of temp memory); ``"auto"`` does so when they do; ``False``
    (default) unrolls them (flat activation memory). A single block needs no scan and runs
    as it is.
    """

    def __init__(self, model: Bijector, *, scan: str | bool = False):
        if not isinstance(model, Bijector):
            raise TypeError(f"Reversible: expected an invnet Bijector, got {type(model).__name__}")
        if scan not in ("auto", True, False):
            raise ValueError(f"Reversible: scan must be 'auto', True or False, got {scan!r}")
        self.model = model
        self.scan = scan
        self._copy_shape()

    def inner(self) -> Bijector:
        return self.model

    def chain(self) -> list[tuple[str, Bijector, bool]]:
        return [(".model", self.model, False)]

    def get_config(self) -> dict[str, Any]:
        return {"scan": self.scan}

    @classmethod
    def from_config(cls, config, children, *, rngs):
        return cls(children[0], **config)

    def _blocks(self) -> list[Bijector]:
        parts = self.model.chain()
        if isinstance(self.model, Sequential) and parts:
            return [child for _, child, _ in parts]
        return [self.model]

    def _call(self, x, cond, inverse: bool):
        x = self._check_input(x, "y" if inverse else "x", inverse=inverse)
        cond = self._check_cond(cond, x, inverse=inverse)
        if prepared_active():  # inside invnet.freeze: inference only, run the model as it is
            return self.model.inverse(x, cond=cond) if inverse else self.model.forward(x, cond=cond)
        for node in nodes(self.model):
            problem = node.not_ready()
            if problem is not None:
                raise ValueError(f"Reversible: {problem}")
        blocks = self._blocks()
        graphdefs, states = zip(*(nnx.split(b) for b in blocks), strict=True)
        same = len(blocks) > 1 and all(g == graphdefs[0] for g in graphdefs)
        if self.scan is True and len(blocks) > 1 and not same:
            raise ValueError(
                "Reversible(scan=True): the blocks do not share one structure (the same layer "
                "types, sizes and options); use scan='auto' or scan=False"
            )
        scanned = same and self.scan in ("auto", True)
        if scanned:
            states = jax.tree.map(lambda *leaves: jnp.stack(leaves), *states)
            graphdefs = (graphdefs[0],)
        batch_ndim = len(self.batch_shape(x, inverse=inverse))
        return _chain((tuple(graphdefs), scanned, inverse, batch_ndim), states, x, cond)

    def forward(self, x, *, cond=None):
        """The wrapped model's ``forward``, differentiated reversibly."""
        return self._call(x, cond, inverse=False)

    def inverse(self, y, *, cond=None):
        """The wrapped model's ``inverse``, differentiated reversibly (recomputing with the
        forward)."""
        return self._call(y, cond, inverse=True)


def reversible(model: Bijector, *, scan: str | bool = False) -> Reversible:
    """Wrap ``model`` so its gradients are computed by reversible backprop (no stored
    activations). Train the returned module like the model itself (it shares its
    parameters): ``nnx.grad(loss)(rev)``, ``nnx.Optimizer(rev, tx, wrt=nnx.Param)``.

    The blocks recomputed one at a time are the steps of the model's top-level chain (the
    layers of a `Sequential`); group layers in a nested `Sequential` to recompute them
    together. ``scan=True`` runs blocks that share one structure as a ``lax.scan`` (flat
    compile time, +2x parameter bytes of temp memory), ``"auto"`` does so when they do, and
    ``False`` (default) unrolls them (flat activation memory). The returned module is a
    ``invnet.revprop.Reversible``; it saves and loads like any model."""
    return Reversible(model, scan=scan)
