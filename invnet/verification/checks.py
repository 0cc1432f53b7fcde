"""The checks of `invnet.verify` (the method is described in `invnet.verification`).

The model's own input validation (`Bijector._check_input`, `Bijector._check_cond`) decides
what a sample is; everything per sample is computed in one jitted function, and the
reductions to statistics happen in NumPy afterwards.

Example:
    >>> import jax, invnet
    >>> from flax import nnx
    >>> model = invnet.Sequential(invnet.LULinear(4, rngs=nnx.Rngs(0)), invnet.LeakyReLU(0.5))
    >>> report = invnet.verify(model, jax.random.normal(jax.random.key(0), (64, 4)))
    >>> report.ok, [layer.kind for layer in report.layers]
    (True, ['LULinear', 'LeakyReLU'])
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from invnet import _runtime
from invnet.core import Bijector
from invnet.verification.numerics import check_log_det, errors, flat, float64_drift, inf_norm
from invnet.verification.report import ErrorStats, LayerCheck, VerifyReport, nanmax
from invnet.walk import layers, nodes, steps

__all__ = ["verify", "SAFETY", "layer_bound"]

SAFETY = 10.0  # tolerance = min(SAFETY * D * eps * bound, sqrt(eps)); see invnet.verification


def layer_bound(layer: Bijector) -> tuple[float, str]:
    """``(bound, rule)``: how much ``layer`` can amplify relative rounding errors in a round
    trip; each layer states its own in `Bijector.error_bound`. A bound that cannot be
    computed (non-finite parameters: an SVD that does not converge) is infinite, and the
    rule says why, so the report names the layer instead of `verify` raising."""
    try:
        return layer.error_bound()
    except (np.linalg.LinAlgError, ValueError, FloatingPointError) as err:
        return float("inf"), f"not computable ({type(err).__name__}: {err})"


# ------------------------------------------------------------------------ jitted checks
def _certify(step, part, cond):
    """The `Certificate` of a leaf's iterative inverse (a layer with
    ``inverse_with_certificate``, e.g. a jacobi `invnet.TransformerAutoregressive`) on the
    part of the state its inverse meets in the model."""
    layer = step.layer
    return layer.inverse_with_certificate(part, cond=cond if layer.cond_dim else None)[2]


def _per_layer(walk, x, y, cond, certificates):
    """Each leaf layer round-tripped on the part of the state that reaches it, from the input
    and the output side; the moves between parts (`invnet.walk.Move`) only carry the state.
    ``certificates[k]``: leaf ``k``'s inverse certificate, for leaves that have one."""
    index, k = [], 0
    for step in walk:
        index.append(None if step.move is not None else k)
        k += step.move is None
    h, fwd_layers = x, []
    for step, k in zip(walk, index, strict=True):
        part = step.part(h)
        certified = k is not None and hasattr(step.layer, "inverse_with_certificate")
        if certified and step.inverted:  # its inverse runs in the model's forward
            certificates[k] = _certify(step, part, cond)
        nxt, _ = step.forward(part, cond)
        if k is not None:
            back, _ = step.inverse(nxt, cond)
            fwd_layers.append(errors(back, part, nxt) + (inf_norm(nxt),))
        h = step.put(h, nxt)
    g, inv_layers = y, []
    for step, k in reversed(list(zip(walk, index, strict=True))):
        part = step.part(g)
        if k is not None and not step.inverted and hasattr(step.layer, "inverse_with_certificate"):
            certificates[k] = _certify(step, part, cond)
        prev, _ = step.inverse(part, cond)
        if k is not None:
            again, _ = step.forward(prev, cond)
            inv_layers.append(errors(again, part, prev) + (inf_norm(prev),))
        g = step.put(g, prev)
    return (
        jax.tree.map(lambda *a: jnp.stack(a), *fwd_layers),
        jax.tree.map(lambda *a: jnp.stack(a[::-1]), *inv_layers),
    )


def _jacobian(fn, points, conds, conditional: bool):
    """``(slogdet, jacobian)`` of the ``D x D`` Jacobian of ``fn`` on each flattened point
    (its condition number is taken on the host, `_condition_numbers`)."""
    shape = points.shape[1:]

    def single(v, c):
        return fn(v.reshape(shape), cond=c if conditional else None)[0].reshape(-1)

    jac = jax.vmap(jax.jacrev(single))(flat(points), conds)  # rev: works through custom VJPs
    return jnp.linalg.slogdet(jac)[1], jac


def _condition_numbers(jac) -> np.ndarray:
    """``sigma_max / sigma_min`` of each Jacobian, by numpy's SVD on the host (NaN for one
    that holds NaN/inf). Not in the jitted checks: XLA:CPU's SVD inside them left verify
    waiting forever on a trained TarFlow model (jax 0.10.2; no thread running, a lost
    completion), while the same program without the SVD finished. One matrix at a time
    comes to the host in float64 (all of them at once: 600 MB at D = 3072)."""
    result = np.full(jac.shape[0], np.nan)
    for i in range(jac.shape[0]):
        matrix = np.asarray(jac[i], np.float64)
        if np.all(np.isfinite(matrix)):
            s = np.linalg.svd(matrix, compute_uv=False)
            result[i] = s[0] / s[-1] if s[-1] > 0 else np.inf
    return result


def _make_checks(graphdef, n_leaves: int):
    """The jitted function: everything per sample. Built once per model structure and
    kept in the runtime's cache, so a second `verify` of the same structure (e.g. after
    more training) does not compile again."""

    def checks(params, fixed, x, cond, jac_idx):
        model = nnx.merge(graphdef, params, fixed)
        walk = steps(model)
        assert sum(step.move is None for step in walk) == n_leaves
        with jax.default_matmul_precision("highest"):
            y, ld_fwd = model.forward(x, cond=cond)
            x_back, ld_inv = model.inverse(y, cond=cond)  # recomputed from y
            y_again, _ = model.forward(x_back, cond=cond)  # recomputed from x_back
            out = {
                "y": y,
                "ld_fwd": ld_fwd,
                "ld_inv": ld_inv,
                "x_back": x_back,
                "y_again": y_again,
                "fwd": errors(x_back, x, y),
                "inv": errors(y_again, y, x_back),
            }
            out["certificates"] = {}
            out["fwd_layers"], out["inv_layers"] = _per_layer(walk, x, y, cond, out["certificates"])
            if jac_idx.shape[0]:
                conditional = cond is not None
                cs = cond[jac_idx] if conditional else jnp.zeros((jac_idx.shape[0], 0), x.dtype)
                out["jac_fwd"] = _jacobian(model.forward, x[jac_idx], cs, conditional)
                out["jac_inv"] = _jacobian(model.inverse, y[jac_idx], cs, conditional)
        return out

    return jax.jit(checks)


# ------------------------------------------------------------------------------ inputs
@dataclass(frozen=True)
class _Inputs:
    x: jax.Array  # (n, *event)
    cond: jax.Array | None  # (n, cond_dim)
    event: tuple[int, ...]
    out_event: tuple[int, ...]
    finite: np.ndarray  # (n,) bool: input and condition finite

    @property
    def dim(self) -> int:
        return math.prod(self.event)


def _inputs(model, x, cond) -> _Inputs:
    """Validate with the model's own checks (same messages as ``model.forward``), then
    flatten the batch axes to one."""
    if not isinstance(model, Bijector):
        raise TypeError(f"invnet.verify: expected an invnet Bijector, got {type(model).__name__}")
    try:
        x = model._check_input(x, "x")
        cond = model._check_cond(cond, x)
    except (TypeError, ValueError) as err:
        raise type(err)(f"invnet.verify: {err}") from None
    k = len(model.event_pattern())
    event = tuple(int(s) for s in x.shape[x.ndim - k :])
    if x.size == 0:
        raise ValueError(
            f"invnet.verify: x has no samples (shape {tuple(x.shape)}); pass at least one"
        )
    n = math.prod(x.shape[: x.ndim - k])
    x = x.reshape(n, *event)
    finite = np.array(jnp.all(jnp.isfinite(flat(x)), axis=-1))
    if cond is not None:
        cond = cond.reshape(n, model.cond_dim)
        finite &= np.asarray(jnp.all(jnp.isfinite(cond), axis=-1))
    out_event = tuple(int(s) for s in model.output_shape(event))
    return _Inputs(x, cond, event, out_event, finite)


def _ready_copy(model):
    """A private copy: an uninitialised ActNorm must not re-initialise from data mid-check."""
    graphdef, state = nnx.split(model)
    copy = nnx.merge(graphdef, state)
    notes = []
    names = {id(step.layer): step.name for step in steps(copy)}
    for node in nodes(copy):
        problem = node.not_ready()
        if problem is not None and not node.children():  # a container: its leaves say it
            node.mark_ready()
            name = names.get(id(node), type(node).__name__)
            notes.append(f"{name}: {problem}; checked with its current parameters")
    return copy, notes


# ------------------------------------------------------------------------------ verify
def verify(
    model: Bijector,
    x,
    *,
    cond=None,
    tol: float | None = None,
    jacobian_samples: int = 8,
    check_float64: bool = True,
) -> VerifyReport:
    """Check that ``model`` inverts ``x`` exactly (to rounding) and that its log-dets are right.

    Args:
        model: any invnet `Bijector` (containers are checked layer by layer).
        x: inputs ``(..., *event)`` as ``model.forward`` takes them (vectors ``(..., D)``,
            images ``(..., H, W, C)``, ...), float32 or float64; their dtype sets the
            precision checked.
        cond: the condition of a conditional model, ``(..., cond_dim)`` or ``(cond_dim,)``.
        tol: relative round-trip tolerance; default ``min(10 * D * eps * bound, sqrt(eps))``
            with ``D`` the event size (see `invnet.verification`), applied to the model and
            to each layer with its own bound.
        jacobian_samples: how many (finite) samples get the ``slogdet(jacobian)`` check.
        check_float64: re-run the model in float64 and report the drift.

    Returns:
        a `VerifyReport`; ``report.ok`` is the verdict, ``print(report)`` the table. The model
        is not modified (an uninitialised `ActNorm` is checked as the identity it is).

    Raises the model's own errors, prefixed ``invnet.verify:``: ``TypeError`` for an ``x``
    that is not float32/float64 (integers, float16, bfloat16, ...), ``ValueError`` for a
    wrong event shape or ``cond``. NaN/inf values are reported, never raised.
    """
    with np.errstate(all="ignore"):  # NaN/inf are data here: counted, not warned about
        inputs = _inputs(model, x, cond)
        copy, notes = _ready_copy(model)
        leaves = layers(copy)
        bounds = [layer_bound(leaf.layer) for leaf in leaves]
        dtype = jnp.dtype(inputs.x.dtype)
        rule = _Rule(inputs.dim, float(jnp.finfo(dtype).eps), tol)
        overall = float(np.prod([b for b, _ in bounds])) if bounds else 1.0
        tol_value, tol_rule = rule.model_tol(overall)

        graphdef, params, fixed = nnx.split(copy, nnx.Param, ...)
        finite_idx = np.flatnonzero(inputs.finite)
        jac_idx = jnp.asarray(finite_idx[: max(int(jacobian_samples), 0)], jnp.int32)
        checks = _runtime.cached(
            ("verify", graphdef, len(leaves)), lambda: _make_checks(graphdef, len(leaves))
        )
        out = jax.device_get(checks(params, fixed, inputs.x, inputs.cond, jac_idx))
        for key in ("jac_fwd", "jac_inv"):
            if key in out:
                out[key] = (out[key][0], _condition_numbers(out[key][1]))

        failures: list[str] = []
        mask, fwd, inv, nonfinite = _model_stats(out, inputs.finite, tol_value, failures)
        layer_checks = [
            _layer_check(k, leaf, bound, out, inputs.finite, rule, failures)
            for k, (leaf, bound) in enumerate(zip(leaves, bounds, strict=True))
        ]
        certificates = {
            leaves[k].name: _certificate_check(leaves[k], cert, inputs.finite, failures)
            for k, cert in sorted(out["certificates"].items())
        }
        log_det = check_log_det(out, jac_idx, mask, inputs.dim, rule.eps, tol_value, SAFETY)
        if not log_det["ok"]:
            failures.append(log_det["message"])
        float64 = float64_drift(graphdef, params, fixed, inputs, out, mask, check_float64)
    return VerifyReport(
        model=type(model).__name__,
        dim=inputs.dim,
        event_shape=inputs.event,
        output_event_shape=inputs.out_event,
        dtype=dtype.name,
        platform=jax.devices()[0].platform,
        n_samples=int(inputs.x.shape[0]),
        n_finite=int(inputs.finite.sum()),
        tol=tol_value,
        tol_rule=tol_rule,
        condition_bound=overall,
        forward=fwd,
        inverse=inv,
        layers=layer_checks,
        log_det=log_det,
        float64=float64,
        nonfinite=nonfinite,
        notes=notes,
        failures=failures,
        certificates=certificates,
    )


@dataclass(frozen=True)
class _Rule:
    """The tolerance rule ``min(SAFETY * D * eps * bound, sqrt(eps))``, or the user's tol."""

    dim: int
    eps: float
    user_tol: float | None

    def __post_init__(self):
        if self.user_tol is not None and not float(self.user_tol) > 0:
            raise ValueError(f"invnet.verify: tol must be positive, got {self.user_tol}")

    def derived(self, bound: float) -> float:
        return min(SAFETY * self.dim * self.eps * bound, math.sqrt(self.eps))

    def layer_tol(self, bound: float) -> float:
        return float(self.user_tol) if self.user_tol is not None else self.derived(bound)

    def model_tol(self, overall: float) -> tuple[float, str]:
        if self.user_tol is not None:
            return float(self.user_tol), "user override (tol=)"
        return self.derived(overall), (
            f"derived: min({SAFETY:g} * D * eps * bound, sqrt(eps)) = "
            f"min({SAFETY:g} * {self.dim} * {self.eps:.2e} * {overall:.3g}, "
            f"{math.sqrt(self.eps):.2e})"
        )


def _stats(max_abs, mean_abs, rel, mask) -> ErrorStats:
    if not mask.any():
        return ErrorStats(math.nan, math.nan, math.nan, math.nan)
    return ErrorStats(
        float(np.max(max_abs[mask])),
        float(np.mean(mean_abs[mask])),
        float(np.max(rel[mask])),
        float(np.mean(rel[mask])),
    )


def _all_finite(a) -> np.ndarray:
    a = np.asarray(a)
    return np.all(np.isfinite(a.reshape(a.shape[0], -1)), axis=-1)


def _model_stats(out, finite, tol_value, failures):
    """The whole model's round trips; appends to ``failures``."""
    out_ok = _all_finite(out["y"]) & _all_finite(out["x_back"]) & _all_finite(out["y_again"])
    out_ok &= np.isfinite(out["ld_fwd"]) & np.isfinite(out["ld_inv"])
    bad_outputs = int(np.sum(finite & ~out_ok))
    mask = finite & out_ok
    fwd, inv = _stats(*out["fwd"], mask), _stats(*out["inv"], mask)
    nonfinite = {"inputs": int(len(finite) - finite.sum()), "outputs": bad_outputs}
    if not finite.any():
        failures.append("no finite input samples: nothing could be verified")
    if bad_outputs:
        failures.append(f"{bad_outputs} finite input samples gave NaN/inf outputs or log-dets")
    for label, s in (("x -> y -> x", fwd), ("y -> x -> y", inv)):
        if s.max_rel > tol_value:
            failures.append(
                f"{label}: max relative error {s.max_rel:.2e} exceeds tolerance {tol_value:.2e}"
            )
    return mask, fwd, inv, nonfinite


def _layer_check(k, leaf, bound_rule, out, finite, rule, failures) -> LayerCheck:
    """Row ``k`` of the per-layer table; appends to ``failures``."""
    bound, how = bound_rule
    f_abs, f_mean, f_rel, f_next = (a[k] for a in out["fwd_layers"])
    i_abs, i_mean, i_rel, i_prev = (a[k] for a in out["inv_layers"])
    layer_mask = finite & np.isfinite(f_rel) & np.isfinite(i_rel)
    layer_mask &= np.isfinite(f_next) & np.isfinite(i_prev)
    n_bad = int(np.sum(finite & ~layer_mask))
    lf, li = _stats(f_abs, f_mean, f_rel, layer_mask), _stats(i_abs, i_mean, i_rel, layer_mask)
    ltol = rule.layer_tol(bound)
    worst = nanmax(lf.max_rel, li.max_rel)
    ok = n_bad == 0 and not worst > ltol
    kind = type(leaf.layer).__name__
    if not ok:
        why = (
            f"{n_bad} samples became NaN/inf"
            if n_bad
            else f"relative round-trip error {worst:.2e} > tolerance {ltol:.2e}"
        )
        failures.append(f"layer {leaf.name} ({kind}, {how} = {bound:.3g}): {why}")
    return LayerCheck(
        name=leaf.name,
        kind=f"Inverse({kind})" if leaf.inverted else kind,
        bound=bound,
        bound_rule=how,
        tol=ltol,
        forward=lf,
        inverse=li,
        nonfinite=n_bad,
        ok=ok,
    )


def _certificate_check(leaf, cert, finite, failures) -> dict:
    """A layer's iterative-inverse certificate over the finite samples; a sample that did not
    converge fails the check, naming the layer."""
    sweeps, change, residual, converged = (np.asarray(a) for a in cert)
    kind = type(leaf.layer).__name__
    method, cap = leaf.layer.inverse_method, leaf.layer.max_sweeps
    bad = int(np.sum(finite & ~converged))
    summary = {
        "kind": kind,
        "method": method,
        "max_sweeps": cap,
        "tol": leaf.layer.tol,
        "tokens": leaf.layer.n_tokens(),
        "samples": int(finite.sum()),
        "unconverged": bad,
        "sweeps_max": int(sweeps[finite].max()) if finite.any() else 0,
        "sweeps_mean": float(sweeps[finite].mean()) if finite.any() else 0.0,
        "change_max": nanmax(*change[finite & converged].tolist()) if finite.any() else 0.0,
        "residual_max": nanmax(*residual[finite].tolist()) if finite.any() else 0.0,
    }
    if bad:
        failures.append(
            f"layer {leaf.name} ({kind}): {bad} of {summary['samples']} samples did not "
            f"converge in its {method} inverse (max_sweeps={cap}, tol={leaf.layer.tol:g}; "
            "they come back as NaN): raise max_sweeps (None: one sweep per token, always "
            "exact) or use inverse_method='sequential'"
        )
    return summary
