"""Bring a trained network: build an invnet `Sequential` from plain weight arrays.

A dense network can run backwards only if every layer is a bijection: square, well-conditioned
weight matrices and one-to-one activations. `from_dense` checks that, builds
`LULinear.from_matrix`, `LeakyReLU`, `Tanh` and `Sigmoid` layers, and otherwise raises
`NotInvertibleError` (a ``ValueError``) that says, layer by layer, why the network cannot be
inverted and what would be needed instead. It reads a list of layers, a PyTorch
``state_dict``-like mapping of a ``Sequential``'s weights, or Flax/Keras modules.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from invnet.containers import Sequential
from invnet.core import Bijector
from invnet.layers import LeakyReLU, LULinear, Sigmoid, Tanh

__all__ = ["from_dense", "NotInvertibleError"]


class NotInvertibleError(ValueError):
    """A network (or layer) that is not a bijection, with the reason and what to do instead."""


_RELU = (
    "ReLU sets every negative pre-activation to 0, so all inputs that differ only there give "
    "the same output: that information is gone and no inverse exists. Use a leaky ReLU "
    "(e.g. slope 0.1) and retrain or fine-tune; from_dense then inverts it exactly"
)
_REFUSED = {
    "relu": _RELU,
    "softmax": (
        "softmax outputs sum to 1, so one dimension is lost (and the map is shift-invariant): "
        "it cannot be inverted"
    ),
}
_ACCEPTED = (
    "'dense' (or 'linear'), 'leaky_relu' (slope in (0, 1], default 0.01), 'tanh', 'sigmoid', "
    "'identity'"
)
_SQUASH = {"tanh": Tanh, "sigmoid": Sigmoid}


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
            if len(args) > 1:
                raise ValueError(f"from_dense: layer {index} must be ('leaky_relu', slope)")
            return kind, {"negative_slope": args[0]} if args else {}
        return kind, {"args": args}
    raise ValueError(
        f"from_dense: layer {index} ({type(item).__name__}) is not understood; give a tuple "
        "like ('dense', W, b) or ('leaky_relu', 0.1), a dict like {'type': 'dense', "
        "'weight': W, 'bias': b}, or a string like 'identity'"
    )


# activation functions as they appear in an nnx.Sequential (nnx.tanh is jax.nn.tanh)
_FUNCTIONS = {
    jax.nn.tanh: "tanh",
    jnp.tanh: "tanh",
    jax.nn.sigmoid: "sigmoid",
    jax.nn.leaky_relu: "leaky_relu",
    jax.nn.relu: "relu",
    jax.nn.softmax: "softmax",
}
_KERAS_ACTIVATIONS = {"linear": "identity", None: "identity"}
_KERAS_SLOPE = 0.3  # keras.layers.LeakyReLU's default negative_slope (PyTorch's is 0.01)


def _module_items(item: Any) -> list[Any] | None:
    """An ``nnx.Linear``, a Keras-like layer (``get_weights``/``get_config``, no keras import)
    or a known activation function -> layer items with their layout fixed; None otherwise."""
    if isinstance(item, nnx.Linear):  # kernel (in, out): y = x @ kernel + bias
        bias = None if item.bias is None else np.asarray(item.bias[...])
        return [("dense", np.asarray(item.kernel[...]).T, bias)]
    if callable(item) and not isinstance(item, type):
        try:
            kind = _FUNCTIONS.get(item)
        except TypeError:  # unhashable
            kind = None
        if kind is not None:
            return [kind]
    if callable(getattr(item, "get_weights", None)) and callable(getattr(item, "get_config", None)):
        return _keras_items(item)
    return None


def _keras_items(layer: Any) -> list[Any]:
    """A Keras layer: Dense (kernel (in, out), its own activation kept), Activation,
    LeakyReLU (Keras's default slope 0.3)."""
    weights, config = layer.get_weights(), dict(layer.get_config())
    name = type(layer).__name__
    if weights:
        if name != "Dense" or len(weights) not in (1, 2) or np.ndim(weights[0]) != 2:
            raise ValueError(
                f"from_dense: Keras layer {name} is not a Dense layer with (kernel, bias); "
                "only Dense, Activation and LeakyReLU layers can be converted"
            )
        bias = weights[1] if len(weights) == 2 else None
        return [("dense", np.asarray(weights[0]).T, bias), _keras_activation(config)]
    if name == "LeakyReLU":
        slope = config.get("negative_slope", config.get("alpha", _KERAS_SLOPE))
        return [("leaky_relu", slope)]
    if name == "Activation":
        return [_keras_activation(config)]
    raise ValueError(f"from_dense: Keras layer {name} cannot be converted (no weights, unknown)")


def _keras_activation(config: dict) -> Any:
    """A Keras ``activation`` config entry as a layer item (Keras's leaky_relu: slope 0.2)."""
    act = config.get("activation", "linear")
    if act == "leaky_relu":
        return ("leaky_relu", 0.2)
    return _KERAS_ACTIVATIONS.get(act, act)


def _expand(layers: Iterable[Any]) -> list[tuple[Any, bool]]:
    """Each item with whether its layout is known (module objects), modules expanded."""
    out = []
    for item in layers:
        items = _module_items(item)
        out += [(item, False)] if items is None else [(i, True) for i in items]
    return out


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


_KEY = re.compile(r"^(?:(?P<prefix>.*)\.)?(?P<index>\d+)\.(?P<name>weight|bias)$")
_ACTIVATION_HELP = "'tanh', 'sigmoid', 'leaky_relu', ('leaky_relu', 0.2) or 'identity'"


def _activation_map(activations: Any, dense: dict[int, Any]) -> dict[int, Any]:
    """Module index -> activation spec, from ``activations`` (a mapping or one spec)."""
    if activations is None:
        return {}
    if isinstance(activations, Mapping):
        acts = {int(k): v for k, v in activations.items()}
        clash = sorted(set(acts) & set(dense))
        if clash:
            raise ValueError(
                f"from_dense: activations names module(s) {clash}, which hold weights (dense "
                "layers); give the indices of the weightless modules, as print(model) shows"
            )
        return acts
    gaps = [i for i in range(max(dense)) if i not in dense]
    if not gaps:  # e.g. torch Linear, Tanh: the spec can only mean the trailing module
        return {max(dense) + 1: activations}
    end = max(dense) + 1
    between = ", ".join(f"{i}: {activations!r}" for i in gaps)
    raise ValueError(
        "from_dense: a state_dict does not show whether the Sequential ends with an "
        f"activation (modules without weights leave no keys), so activations={activations!r} "
        f"is ambiguous. Give every one by index: activations={{{between}}} if the last module "
        f"is Linear, or activations={{{between}, {end}: {activations!r}}} if an activation "
        "follows it (print(model) shows the indices)"
    )


def _from_state_dict(state: Mapping[str, Any], activations: Any) -> list[Any]:
    """A PyTorch ``Sequential``'s ``state_dict`` (plus its activations) -> layer list."""
    dense: dict[int, dict[str, Any]] = {}
    prefixes = set()
    for key, value in state.items():
        match = _KEY.match(str(key))
        if match is None:
            raise ValueError(
                f"from_dense: state_dict key {key!r} is not '<index>.weight' or '<index>.bias' "
                "of a Sequential's Linear layer (e.g. '0.weight', '2.bias'); only dense "
                "layers and weightless activations can be converted"
            )
        prefixes.add(match["prefix"])
        dense.setdefault(int(match["index"]), {})[match["name"]] = value
    if len(prefixes) > 1:
        raise ValueError(f"from_dense: keys of several modules {sorted(map(str, prefixes))}")
    if not dense:
        raise ValueError("from_dense: the state_dict is empty")
    for index, entry in dense.items():
        if "weight" not in entry:
            raise ValueError(f"from_dense: module {index} has a bias but no weight")
    acts = _activation_map(activations, dense)
    items = []
    for index in range(max([*dense, *acts]) + 1):
        if index in dense:
            items.append(("dense", dense[index]["weight"], dense[index].get("bias")))
        elif index in acts:
            items.append(acts[index])
        else:
            raise ValueError(
                f"from_dense: module {index} of the Sequential has no weights (an activation?); "
                f"say what it is: activations={{{index}: 'tanh'}} (or {_ACTIVATION_HELP})"
            )
    return items


def _layout_hint(w: np.ndarray, bias: Any, width: int | None, weight_layout: str) -> str:
    """A sentence naming ``weight_layout`` when the shapes fit the other layout better."""
    if w.ndim != 2 or w.shape[0] == w.shape[1]:
        return ""
    n_out, n_in = w.shape
    b = None if bias is None else np.asarray(bias)
    bias_says = b is not None and b.shape == (n_in,)
    chain_says = width is not None and width == n_out
    if not (bias_says or chain_says):
        return ""
    other = "in_out" if weight_layout == "out_in" else "out_in"
    read = (
        "(out, in) as PyTorch's nn.Linear.weight"
        if weight_layout == "out_in"
        else ("(in, out) as a Keras/Flax kernel")
    )
    why = f"the bias has {n_in} entries" if bias_says else f"the previous layer gives {n_out}"
    return (
        f". The matrix was read with weight_layout={weight_layout!r}, {read}, but {why}, which "
        f"fits the transposed layout: pass weight_layout={other!r}"
    )


_LAYOUTS = (
    "pass weight_layout='out_in' for PyTorch's nn.Linear.weight (y = W x + b) or "
    "weight_layout='in_out' for a Keras/Flax kernel (y = x @ W + b); a torch state_dict, "
    "nnx.Linear modules and Keras layers passed as they are need no weight_layout"
)


def _layout(w: np.ndarray, index: int, weight_layout: str | None, known: bool) -> str:
    """The layout to read ``w`` with: refuses to guess for a square matrix."""
    if known:
        return "out_in"
    if weight_layout is None:
        if w.ndim == 2 and w.shape[0] == w.shape[1]:
            raise ValueError(
                f"from_dense: layer {index}'s weight is square ({w.shape[0]}x{w.shape[1]}), so "
                "its shape cannot tell whether it is (out, in) or (in, out), and reading it the "
                f"wrong way builds the transposed network without error: {_LAYOUTS}"
            )
        return "out_in"  # refused anyway (not square); the hint names the other layout
    return weight_layout


def _condition_warning(layer: LULinear, w: np.ndarray, index: int) -> None:
    """Warn when ``W`` is so ill-conditioned that round trips in the layer's dtype lose
    more than ``sqrt(eps)`` (relative): `invnet.verify` would then fail the model."""
    singular = np.linalg.svd(w.astype(np.float64), compute_uv=False)
    cond = float(singular[0] / singular[-1]) if singular[-1] > 0 else math.inf
    eps = float(jnp.finfo(layer.param_dtype).eps)
    if cond * math.sqrt(eps) > 1.0:
        warnings.warn(
            f"from_dense: layer {index} (dense {w.shape[0]}->{w.shape[0]}) has condition "
            f"number {cond:.3g}: its inverse in {layer.param_dtype.name} can be off by about "
            f"eps * cond = {eps * cond:.1e} (relative), more than invnet.verify accepts. "
            "Use float64 (jax.config.update('jax_enable_x64', True) and param_dtype="
            "jnp.float64), or retrain with invnet.LULinear / regularise W + eps*I",
            RuntimeWarning,
            stacklevel=3,
        )


def _dense_layer(fields, index, width, weight_layout, param_dtype, max_condition, known):
    """(layer or None, problem or None, new width) for one dense layer."""
    w = np.asarray(fields.get("weight"))
    bias = fields.get("bias")
    weight_layout = _layout(w, index, weight_layout, known)
    if weight_layout == "in_out" and w.ndim == 2:
        w = w.T
    problem = _dense_problem(w, index)
    if problem is None and width is not None and w.shape[1] != width:
        problem = f"layer {index} (dense): takes {w.shape[1]} inputs, previous size {width}"
    if problem is not None:
        hint = _layout_hint(w, bias, width, weight_layout)
        return None, problem + hint, (w.shape[0] if w.ndim == 2 else width)
    try:
        layer = LULinear.from_matrix(w, bias, param_dtype=param_dtype, max_condition=max_condition)
    except ValueError as err:  # ill-conditioned, bad bias
        return None, f"layer {index} (dense {w.shape[0]}->{w.shape[0]}): {err}", w.shape[0]
    _condition_warning(layer, w, index)
    return layer, None, w.shape[0]


def _activation_layer(kind, fields, index) -> tuple[Bijector | None, str | None]:
    if kind in ("leaky_relu", "leakyrelu"):
        slope = fields.get("negative_slope", fields.get("slope", 0.01))  # PyTorch's default
        try:
            return LeakyReLU(float(slope)), None
        except (TypeError, ValueError) as err:
            return None, f"layer {index} (leaky_relu): {err}"
    if kind in _SQUASH:
        return _SQUASH[kind](), None
    if kind in _REFUSED:
        return None, f"layer {index} ({kind}): {_REFUSED[kind]}"
    return None, f"layer {index} ({kind}): not a supported invertible layer; accepted: {_ACCEPTED}"


def from_dense(
    layers: Iterable[Any] | Mapping[str, Any],
    *,
    activations: Any = None,
    weight_layout: str | None = None,
    param_dtype: Any = None,
    max_condition: float | None = None,
) -> Sequential:
    """Build an invertible `Sequential` from a trained square dense network.

    ``layers`` lists the network in order; each item is one of

    * ``("dense", W, b)`` or ``("dense", W)``, or ``{"type": "dense", "weight": W, "bias": b}``
      (``"linear"`` is a synonym): ``y = W x + b`` with ``W`` square, full rank, finite;
    * ``("leaky_relu", slope)`` or ``{"type": "leaky_relu", "negative_slope": slope}``, slope in
      (0, 1]; ``"leaky_relu"`` alone takes PyTorch's default slope 0.01;
    * ``"tanh"`` / ``"sigmoid"``: `Tanh` / `Sigmoid`, bijections onto (-1, 1) / (0, 1) whose
      inverse of an output outside that interval is NaN (``+-inf`` on its ends);
    * ``"identity"`` (or ``("identity",)``): no layer.

    Or ``layers`` is a PyTorch ``state_dict``-like mapping of a ``Sequential``'s weights,
    ``{"0.weight": W0, "0.bias": b0, "2.weight": W2, ...}`` (a common prefix such as
    ``"net.0.weight"`` is fine; torch tensors or arrays). The modules without weights (the
    activations) are named by ``activations``: a mapping from their index in the
    ``Sequential`` to a spec as above (``{1: "tanh"}``), or one spec used for every index
    between dense layers that has no weights (a trailing activation needs the mapping).

    A state_dict must then name every activation: one spec alone is accepted only when no
    module sits between dense layers (e.g. torch's ``Linear, Tanh``: the spec is the
    trailing one); otherwise a state_dict cannot show whether the network ends with an
    activation, and the error spells out both mappings.

    Or ``layers`` is a list of (or an ``nnx.Sequential`` / Keras ``Sequential`` of) modules:
    ``nnx.Linear``, activation functions ``nnx.tanh``, ``nnx.sigmoid``, ``nnx.leaky_relu``
    (``jax.nn`` ones), and Keras-like layers (anything with ``get_weights`` and
    ``get_config``, keras is not imported): ``Dense`` with its own ``activation``,
    ``Activation``, ``LeakyReLU`` (Keras's default slope 0.3). Their layouts are known.

    ``weight_layout`` says how to read a ``W`` given as an array: ``"out_in"`` as PyTorch's
    ``nn.Linear.weight``, shape ``(out, in)``, ``y = W x + b``; ``"in_out"`` as a Keras/Flax
    kernel, ``y = x @ W + b``. It is required for square arrays (every invertible layer):
    read the wrong way, a square kernel gives the transposed network without any error, so
    from_dense refuses to guess. When the shapes of a non-square layer fit the other layout
    (its bias, or the previous layer's width), the error says which ``weight_layout`` to
    pass. Each dense layer becomes `LULinear.from_matrix` (``param_dtype`` and
    ``max_condition`` are passed on); a matrix whose condition number exceeds
    ``1 / sqrt(eps)`` of that dtype (2.9e3 in float32) is built with a ``RuntimeWarning``:
    its round trips lose more than `invnet.verify` accepts.

    Raises `NotInvertibleError` (a ``ValueError``) listing every layer that makes the network
    non-invertible — a non-square layer (e.g. 784->10), a rank-deficient or
    ill-conditioned matrix, ``relu``, ``softmax`` — with why and what would be needed instead.

    Example:
        >>> import numpy as np, jax.numpy as jnp, invnet
        >>> rng = np.random.default_rng(0)
        >>> W1, b1, W2 = rng.normal(size=(3, 3)), rng.normal(size=3), rng.normal(size=(3, 3))
        >>> model = invnet.from_dense(
        ...     [("dense", W1, b1), ("leaky_relu", 0.1), ("dense", W2)], weight_layout="out_in"
        ... )
        >>> x = jnp.ones((2, 3))
        >>> bool(jnp.allclose(model.inverse(model(x))[0], x, atol=1e-4))
        True
        >>> state = {"0.weight": W1, "0.bias": b1}    # torch: Sequential(Linear(3, 3), Tanh())
        >>> model = invnet.from_dense(state, activations={1: "tanh"})
        >>> [type(layer).__name__ for layer in model]
        ['LULinear', 'Tanh']
        >>> from flax import nnx                      # Flax modules: layouts are known
        >>> net = nnx.Sequential(nnx.Linear(3, 3, rngs=nnx.Rngs(0)), nnx.tanh)
        >>> [type(layer).__name__ for layer in invnet.from_dense(net)]
        ['LULinear', 'Tanh']
        >>> try:
        ...     invnet.from_dense([("dense", rng.normal(size=(10, 784)))])
        ... except invnet.NotInvertibleError as err:
        ...     print(str(err).splitlines()[1][:50])
          - layer 0 (dense 784->10): the output holds only
    """
    if weight_layout not in (None, "out_in", "in_out"):
        raise ValueError(
            f"from_dense: weight_layout must be 'out_in' or 'in_out', got {weight_layout!r}"
        )
    if isinstance(layers, Mapping):
        if weight_layout == "in_out":
            raise ValueError(
                "from_dense: a state_dict holds PyTorch's (out, in) weights; weight_layout="
                "'in_out' is for Keras/Flax kernels given as arrays"
            )
        layers, weight_layout = _from_state_dict(layers, activations), "out_in"
    elif activations is not None:
        raise ValueError("from_dense: activations= is for a state_dict; list them in `layers`")
    elif hasattr(layers, "layers") and not isinstance(layers, list | tuple):
        layers = list(layers.layers)  # an nnx.Sequential or a Keras Sequential model
    built: list[Bijector] = []
    problems: list[str] = []
    width = None
    for index, (item, known) in enumerate(_expand(layers)):
        kind, fields = _normalise(item, index)
        if kind in ("dense", "linear"):
            layer, problem, width = _dense_layer(
                fields, index, width, weight_layout, param_dtype, max_condition, known
            )
        elif kind == "identity":
            continue
        else:
            layer, problem = _activation_layer(kind, fields, index)
        if problem is not None:
            problems.append(problem)
        else:
            built.append(layer)
    if problems:
        raise NotInvertibleError(
            "from_dense: this network cannot be inverted exactly:\n  - " + "\n  - ".join(problems)
        )
    if not built:
        raise ValueError("from_dense: no layers given (only identities)")
    return Sequential(*built)
