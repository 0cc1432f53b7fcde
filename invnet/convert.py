"""Bring a trained network: build an invnet `Sequential` from plain weight arrays.

A dense network can run backwards only if every layer is a bijection: square, well-conditioned
weight matrices and activations that are one-to-one onto R. `from_dense` checks that, builds
`LULinear.from_matrix` and `LeakyReLU` layers, and otherwise raises `NotInvertibleError`
(a ``ValueError``) that says, layer by layer, why the network cannot be inverted and what
would be needed instead.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from invnet.core import Bijector, Sequential
from invnet.layers import LeakyReLU, LULinear

__all__ = ["from_dense", "NotInvertibleError"]


class NotInvertibleError(ValueError):
    """A network (or layer) that is not a bijection, with the reason and what to do instead."""


_RELU = (
    "ReLU sets every negative pre-activation to 0, so all inputs that differ only there give "
    "the same output: that information is gone and no inverse exists. Use a leaky ReLU "
    "(e.g. slope 0.1) and retrain or fine-tune; from_dense then inverts it exactly"
)
_SATURATING = (
    "{name} squashes R into a bounded interval: outputs at (or rounded to) the ends have no "
    "finite preimage, and the inverse amplifies errors without bound near them (float32 "
    "already rounds {name}(x) to its limit for moderate |x|). invnet refuses it; use "
    "leaky_relu, or invnet's coupling blocks, which take any non-invertible activation inside "
    "their conditioner"
)
_REFUSED = {
    "relu": _RELU,
    "tanh": _SATURATING.format(name="tanh"),
    "sigmoid": _SATURATING.format(name="sigmoid"),
    "softmax": (
        "softmax outputs sum to 1, so one dimension is lost (and the map is shift-invariant): "
        "it cannot be inverted"
    ),
}
_ACCEPTED = "'dense' (or 'linear'), 'leaky_relu' (with a slope in (0, 1]), 'identity'"


def _normalise(item: Any, index: int) -> tuple[str, dict[str, Any]]:
    """One layer description -> (kind, fields)."""
    if isinstance(item, str):
        return item.lower(), {}
    if isinstance(item, Mapping):
        fields = dict(item)
        kind = fields.pop("type", None)
        if not isinstance(kind, str):
            raise ValueError(f"from_dense: layer {index} is a dict without a 'type' string")
        return kind.lower(), fields
    if isinstance(item, tuple | list) and item and isinstance(item[0], str):
        kind, args = item[0].lower(), list(item[1:])
        if kind in ("dense", "linear"):
            if len(args) not in (1, 2):
                raise ValueError(
                    f"from_dense: layer {index} must be ('dense', W) or ('dense', W, b)"
                )
            return kind, {"weight": args[0], "bias": args[1] if len(args) == 2 else None}
        if kind in ("leaky_relu", "leakyrelu"):
            if len(args) != 1:
                raise ValueError(f"from_dense: layer {index} must be ('leaky_relu', slope)")
            return kind, {"negative_slope": args[0]}
        return kind, {"args": args}
    raise ValueError(
        f"from_dense: layer {index} ({type(item).__name__}) is not understood; give a tuple "
        "like ('dense', W, b) or ('leaky_relu', 0.1), a dict like {'type': 'dense', "
        "'weight': W, 'bias': b}, or a string like 'identity'"
    )


def _dense_problem(w: np.ndarray, index: int) -> str | None:
    """Why a dense layer with matrix ``w`` (out x in) cannot be inverted, or None."""
    if w.ndim != 2:
        return f"layer {index} (dense): weight must be a 2-D matrix, got shape {w.shape}"
    n_out, n_in = w.shape
    if n_out < n_in:
        return (
            f"layer {index} (dense {n_in}->{n_out}): the output holds only {n_out} of the "
            f"{n_in} input dimensions, so {n_in - n_out} directions of the input are erased and "
            "every output has infinitely many inputs that produce it. pinv(W) picks the "
            "minimum-norm one, which has nothing to do with your data (for an image "
            "classifier it looks like noise). What would be needed: an invertible network "
            f"that maps x -> [y, z], with z holding the {n_in - n_out} dimensions y drops, "
            "trained so that z is standard normal; then x ~ p(x | y) is sampled by drawing z "
            "and running the model backwards (invnet's conditional flows: AffineCoupling "
            "with cond_dim=)"
        )
    if n_out > n_in:
        return (
            f"layer {index} (dense {n_in}->{n_out}): the outputs fill only a {n_in}-dimensional "
            f"subspace of R^{n_out}, so almost no output has an input at all; pinv returns a "
            "least-squares guess. What would be needed: keep every layer square (pad the input "
            f"with {n_out - n_in} extra latent dimensions and train the padded network)"
        )
    if not np.all(np.isfinite(w)):
        return f"layer {index} (dense {n_in}->{n_out}): weight has NaN/inf entries"
    rank = int(np.linalg.matrix_rank(w.astype(np.float64)))
    if rank < n_in:
        return (
            f"layer {index} (dense {n_in}->{n_in}): the weight has rank {rank} < {n_in}, so "
            f"{n_in - rank} input directions are mapped to 0 and cannot be recovered. What "
            "would be needed: a full-rank matrix (retrain with invnet.LULinear, which cannot "
            "become singular, or regularise W + eps*I and accept the changed function)"
        )
    return None


def from_dense(
    layers: Iterable[Any],
    *,
    weight_layout: str = "out_in",
    param_dtype: Any = None,
    max_condition: float | None = None,
) -> Sequential:
    """Build an invertible `Sequential` from a trained square dense network.

    ``layers`` lists the network in order; each item is one of

    * ``("dense", W, b)`` or ``("dense", W)``, or ``{"type": "dense", "weight": W, "bias": b}``
      (``"linear"`` is a synonym): ``y = W x + b`` with ``W`` square, full rank, finite;
    * ``("leaky_relu", slope)`` or ``{"type": "leaky_relu", "negative_slope": slope}``, slope in
      (0, 1];
    * ``"identity"`` (or ``("identity",)``): no layer.

    ``weight_layout="out_in"`` (default) reads ``W`` as PyTorch's ``nn.Linear.weight``,
    shape ``(out, in)``, ``y = W x + b``; ``"in_out"`` as a Keras/Flax kernel, ``y = x @ W +
    b``. Each dense layer becomes `LULinear.from_matrix` (``param_dtype`` and
    ``max_condition`` are passed on), each leaky ReLU a `LeakyReLU`.

    Raises `NotInvertibleError` (a ``ValueError``) listing every layer that makes the network
    non-invertible — a non-square layer (e.g. 784->10), a rank-deficient or
    ill-conditioned matrix, ``relu``, ``tanh``, ``sigmoid``, ``softmax`` — with why and what
    would be needed instead.

    Example:
        >>> import numpy as np, jax.numpy as jnp, invnet
        >>> rng = np.random.default_rng(0)
        >>> W1, b1, W2 = rng.normal(size=(3, 3)), rng.normal(size=3), rng.normal(size=(3, 3))
        >>> model = invnet.from_dense([("dense", W1, b1), ("leaky_relu", 0.1), ("dense", W2)])
        >>> x = jnp.ones((2, 3))
        >>> bool(jnp.allclose(model.inverse(model(x))[0], x, atol=1e-4))
        True
        >>> try:
        ...     invnet.from_dense([("dense", rng.normal(size=(10, 784)))])
        ... except invnet.NotInvertibleError as err:
        ...     print(str(err).splitlines()[1][:50])
          - layer 0 (dense 784->10): the output holds only
    """
    if weight_layout not in ("out_in", "in_out"):
        raise ValueError(
            f"from_dense: weight_layout must be 'out_in' or 'in_out', got {weight_layout!r}"
        )
    built: list[Bijector] = []
    problems: list[str] = []
    width = None
    for index, item in enumerate(layers):
        kind, fields = _normalise(item, index)
        if kind in ("dense", "linear"):
            w = np.asarray(fields.get("weight"))
            if weight_layout == "in_out" and w.ndim == 2:
                w = w.T
            problem = _dense_problem(w, index)
            if problem is None and width is not None and w.shape[1] != width:
                problem = f"layer {index} (dense): takes {w.shape[1]} inputs, previous size {width}"
            if problem is not None:
                problems.append(problem)
                if w.ndim == 2:
                    width = w.shape[0]
                continue
            width = w.shape[0]
            bias = fields.get("bias")
            try:
                built.append(
                    LULinear.from_matrix(
                        w, bias, param_dtype=param_dtype, max_condition=max_condition
                    )
                )
            except ValueError as err:  # ill-conditioned, bad bias
                problems.append(f"layer {index} (dense {width}->{width}): {err}")
        elif kind in ("leaky_relu", "leakyrelu"):
            slope = fields.get("negative_slope", fields.get("slope"))
            try:
                built.append(LeakyReLU(float(slope)))
            except (TypeError, ValueError) as err:
                problems.append(f"layer {index} (leaky_relu): {err}")
        elif kind == "identity":
            continue
        elif kind in _REFUSED:
            problems.append(f"layer {index} ({kind}): {_REFUSED[kind]}")
        else:
            problems.append(
                f"layer {index} ({kind}): not a supported invertible layer; accepted: {_ACCEPTED}"
            )
    if problems:
        raise NotInvertibleError(
            "from_dense: this network cannot be inverted exactly:\n  - " + "\n  - ".join(problems)
        )
    if not built:
        raise ValueError("from_dense: no layers given (only identities)")
    return Sequential(*built)
