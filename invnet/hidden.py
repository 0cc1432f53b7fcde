"""Hidden units of a bijective model: what drives them, and which input produces a given state.

Throughout, ``layer=k`` names the hidden state after the first ``k`` layers of a `Sequential`,
``h_k = model[:k](x)`` (``h_0 = x``, ``h_len(model) = y``); it equals ``hs[k - 1]`` of
``model.forward(x, return_intermediates=True)``. Because ``model[:k]`` is itself a bijection,
``model[:k].inverse(h)`` returns the one input that produces ``h`` exactly (to rounding:
relative error within ``invnet.verify(model[:k], x).tol``, i.e. ``min(10 D eps kappa,
sqrt(eps))`` with ``kappa`` the conditioning bound of those layers).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from invnet.containers import Sequential
from invnet.core import Bijector, fmt, unify_shapes
from invnet.revprop import Reversible

__all__ = ["saliency", "input_for_hidden"]


def _prefix(model: Bijector, layer: int | None) -> Bijector:
    if layer is None:
        return model
    if not isinstance(model, Sequential):
        raise TypeError(
            f"layer={layer} needs an invnet.Sequential (hidden states sit between its layers), "
            f"got {type(model).__name__}"
        )
    if not isinstance(layer, int) or not 0 <= layer <= len(model):
        raise ValueError(
            f"layer must be an integer in [0, {len(model)}] (the state after the first k "
            f"layers), got {layer!r}"
        )
    return model[:layer]


def _units(unit, size: int | None) -> tuple[int, ...] | None:
    if unit is None:
        return None
    single = isinstance(unit, int)
    units = (unit,) if single else tuple(int(u) for u in unit)
    if size is not None:
        for u in units:
            if not -size <= u < size:
                raise ValueError(f"unit {u} is out of range for a state of size {size}")
        units = tuple(u % size for u in units)
    return units


def saliency(
    model: Bijector,
    x,
    *,
    output: int | Sequence[int] | None = None,
    layer: int | None = None,
    cond=None,
) -> jax.Array:
    """Exact Jacobian of output or hidden units with respect to the input, per sample.

    ``layer=None`` differentiates the model's output ``y``; ``layer=k`` the hidden state
    ``h_k = model[:k](x)``. ``output`` picks units of that state: an ``int`` gives the
    gradient of one unit, shape ``(..., D)`` (the classic saliency map: which input
    features move that unit); a sequence of ``n`` units gives ``(..., n, D)``; ``None``
    gives the full Jacobian ``(..., D_out, D)``. Computed with ``jax.jacrev`` when fewer units
    than inputs are asked for (or the model holds an `invnet.reversible` wrapper), else
    ``jax.jacfwd`` (the same numbers, the cheaper mode), ``vmap``-ed over the batch and
    jit-compiled.

    Events of any rank: for a model on images ``(..., H, W, C)`` each map has the image's
    shape (``output=k`` gives ``(..., H, W, C)``: which pixels move unit ``k``), units count
    through the state in row-major order (``h.reshape(-1)``), and ``output=None`` gives
    ``(..., *state_shape, H, W, C)``.

    Example:
        >>> import jax.numpy as jnp, invnet
        >>> from flax import nnx
        >>> model = invnet.Sequential(invnet.LULinear(3, rngs=nnx.Rngs(0)), invnet.LeakyReLU(0.5))
        >>> x = jnp.ones((5, 3))
        >>> invnet.saliency(model, x, output=0).shape          # d y_0 / d x
        (5, 3)
        >>> jac = invnet.saliency(model, x, layer=1)          # d h_1 / d x = W
        >>> bool(jnp.allclose(jac[0], model[0].weight(), atol=1e-6))
        True
    """
    sub = _prefix(model, layer)
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"saliency: x must be a floating array, got dtype {x.dtype}")
    pattern = sub.event_pattern()
    cut = max(x.ndim - len(pattern), 0)
    batch, event = x.shape[:cut], x.shape[cut:]
    if unify_shapes(pattern, event) is None:  # also a rank that does not fit
        raise ValueError(
            f"saliency: the model takes events of shape {fmt(pattern)}, got x of shape {x.shape}"
        )
    state_shape = tuple(sub.output_shape(event))
    size_in, size_out = math.prod(event), math.prod(state_shape)
    units = _units(output, size_out)
    flat = x.reshape(-1, *event)
    conds = None
    if cond is not None and model.cond_dim:
        cond = jnp.asarray(cond, x.dtype)
        conds = jnp.broadcast_to(cond, (*batch, model.cond_dim)).reshape(-1, model.cond_dim)
    elif model.cond_dim:
        raise ValueError(f"the model is conditional (cond_dim={model.cond_dim}); pass cond=")
    graphdef, state = nnx.split(sub)
    # reverse mode when it is cheaper, and always through a Reversible wrapper, whose
    # custom VJP has no forward-mode rule
    has_custom_vjp = any(isinstance(n, Reversible) for _, n in nnx.iter_graph(sub))
    use_rev = has_custom_vjp or (units is not None and len(units) < size_in)

    def unit_values(state, xi, ci):
        h = nnx.merge(graphdef, state).forward(xi, cond=ci)[0].reshape(-1)
        return h if units is None else h[jnp.asarray(units)]

    @jax.jit
    def jacobians(state, xs, cs):
        with jax.default_matmul_precision("highest"):
            jac = (jax.jacrev if use_rev else jax.jacfwd)(unit_values, argnums=1)
            return jax.vmap(jac, in_axes=(None, 0, None if cs is None else 0))(state, xs, cs)

    jac = jacobians(state, flat, conds)  # (N, units or size_out, *event)
    if isinstance(output, int):
        return jac[:, 0].reshape(*batch, *event)
    if units is None:
        return jac.reshape(*batch, *state_shape, *event)
    return jac.reshape(*batch, len(units), *event)


def input_for_hidden(
    model: Sequential,
    x,
    layer: int,
    unit: int | Sequence[int],
    value=0.0,
    *,
    cond=None,
) -> jax.Array:
    """The exact input whose hidden state after ``layer`` layers has ``unit`` set to ``value``.

    Runs ``h = model[:layer](x)``, sets ``h[..., unit] = value`` (every other unit keeps the
    value ``x`` gave it), and returns ``model[:layer].inverse(h)``: the one input that
    produces that hidden state. ``unit`` may be a list of units (``value`` then broadcasts
    against them); ``layer=len(model)`` edits the output itself. Accuracy: the round trip of
    ``model[:layer]``, reported by ``invnet.verify(model[:layer], x)``.

    Example (shut hidden unit 1 off after the first two layers):
        >>> import jax, jax.numpy as jnp, invnet
        >>> from flax import nnx
        >>> rngs = nnx.Rngs(0)
        >>> model = invnet.Sequential(
        ...     invnet.LULinear(4, rngs=rngs), invnet.LeakyReLU(0.2), invnet.LULinear(4, rngs=rngs)
        ... )
        >>> x = jax.random.normal(jax.random.key(0), (3, 4))
        >>> x_off = invnet.input_for_hidden(model, x, layer=2, unit=1, value=0.0)
        >>> h = model[:2](x_off)
        >>> bool(jnp.allclose(h[:, 1], 0.0, atol=1e-6))
        True
        >>> others = jnp.asarray([0, 2, 3])                 # the other units are unchanged
        >>> bool(jnp.allclose(h[:, others], model[:2](x)[:, others], atol=1e-5))
        True
    """
    if layer is None:
        raise ValueError("input_for_hidden: give layer=k, the number of layers before the state")
    sub = _prefix(model, layer)
    x = jnp.asarray(x)
    h, _ = sub.forward(x, cond=cond)
    units = _units(unit, h.shape[-1])
    index = units[0] if isinstance(unit, int) else jnp.asarray(units)
    h = h.at[..., index].set(jnp.asarray(value, h.dtype))
    x_new, _ = sub.inverse(h, cond=cond)
    return x_new
