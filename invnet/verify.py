"""Verify a model: round trips both ways, per-layer errors, log-dets, float64 drift, conditioning.

`verify(model, x)` runs, in one `jax.jit`-compiled pass (``nnx.split`` once + ``jax.jit`` of
a function that calls ``nnx.merge``), every check below and returns a `VerifyReport`:

* **Round trips.** ``x -> y = f(x) -> f^{-1}(y)`` and ``y -> x' = f^{-1}(y) -> f(x')``, each
  direction recomputed from its own input (nothing is cached, so a wrong inverse cannot hide
  behind a stored forward result). Per sample ``i`` the relative error is
  ``||x_i - f^{-1}(f(x_i))||_inf / max(||x_i||_inf, ||y_i||_inf)``: the scale of both ends,
  so a large bias (``y`` far from 0) or an input near 0 does not turn rounding into a fake
  failure. Max and mean of the absolute and relative errors are reported.
* **Per layer.** The model is flattened into its leaf layers (nested `Sequential` and
  `Inverse` included) and each layer is round-tripped on the intermediate states that reach
  it (``h_k = f_k(h_{k-1})``, then ``f_k^{-1}(h_k)`` against ``h_{k-1}``; and the same from
  the output side), so the report names the layer that loses precision.
* **Log-det.** ``log|det J|`` from ``slogdet(jax.jacrev(f))`` on a small subsample, against
  the model's ``log_det``, for ``forward`` and for ``inverse``; and ``forward`` + ``inverse``
  log-dets summing to 0.
* **float64 drift.** The same parameters cast to float64 (under ``jax.enable_x64``) re-run
  forward and inverse; the report gives the float32-vs-float64 difference of outputs and
  log-dets and the float64 round-trip error.
* **Conditioning.** An error-amplification bound per layer: ``cond(W)`` (2-norm) of every
  `LULinear`, ``1 / slope`` of every `LeakyReLU`, ``exp(2 * clamp)`` of every `AffineCoupling`
  (its scales lie in ``exp(+-clamp)``), ``max / min`` scale of an `ActNorm`, 1 for
  permutations and additive couplings; the overall bound is their product.
* **Tolerance.** ``tol = min(SAFETY * D * eps * bound, sqrt(eps))`` with ``SAFETY = 10``,
  ``D`` the feature size and ``eps`` the machine epsilon of the input's dtype: ``D * eps *
  bound`` is the textbook rounding bound of a D-term product or triangular solve (Higham,
  "Accuracy and Stability of Numerical Algorithms", ch. 3 and 8), the factor 10 covers the
  forward and inverse each adding their own. The ``sqrt(eps)`` cap (3.5e-4 in float32) says
  that a model whose conditioning allows it to lose more than half its digits fails, however
  well that loss is explained. Each layer is checked against the same rule with its own
  bound; ``tol=`` overrides the round-trip tolerance of the model and of every layer.
  Log-dets are checked per sample against ``SAFETY * eps * (D * cond(J) + |log_det| + 1)``.
* **Non-finite values.** Samples with NaN/inf inputs (or conditions) are counted and left out
  of the statistics; NaN/inf outputs of finite inputs are counted and fail the check.

Example:
    >>> import jax, invnet
    >>> from flax import nnx
    >>> model = invnet.Sequential(invnet.LULinear(4, rngs=nnx.Rngs(0)), invnet.LeakyReLU(0.5))
    >>> report = invnet.verify(model, jax.random.normal(jax.random.key(0), (64, 4)))
    >>> report.ok, [layer.kind for layer in report.layers]
    (True, ['LULinear', 'LeakyReLU'])
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from invnet.core import Bijector, steps

__all__ = ["verify", "VerifyReport", "ErrorStats", "LayerCheck", "SAFETY", "layer_bound"]

SAFETY = 10.0  # tolerance = min(SAFETY * D * eps * bound, sqrt(eps)); see the module docs


# --------------------------------------------------------------------------- report types
@dataclass(frozen=True)
class ErrorStats:
    """Round-trip errors over the finite samples (``nan`` when there were none)."""

    max_abs: float
    mean_abs: float
    max_rel: float
    mean_rel: float


@dataclass(frozen=True)
class LayerCheck:
    """One leaf layer: its amplification bound, tolerance and the round-trip error it adds."""

    name: str  # how to reach it: model[2], model[3].bijector[0], ...
    kind: str  # class name; "Inverse(LULinear)" for an inverted layer
    bound: float
    bound_rule: str
    tol: float
    forward: ErrorStats  # f_k^{-1}(f_k(h_{k-1})) vs h_{k-1}
    inverse: ErrorStats  # f_k(f_k^{-1}(g_k)) vs g_k
    nonfinite: int  # samples whose state became NaN/inf at this layer
    ok: bool

    @property
    def max_rel(self) -> float:
        return _nanmax(self.forward.max_rel, self.inverse.max_rel)


@dataclass
class VerifyReport:
    """Everything `verify` measured. ``ok`` is the verdict; ``table()`` and ``to_json()``
    render it; ``failures`` lists the reasons when it fails."""

    model: str
    dim: int
    dtype: str
    platform: str
    n_samples: int
    n_finite: int
    tol: float
    tol_rule: str
    condition_bound: float
    forward: ErrorStats  # x -> y -> x
    inverse: ErrorStats  # y -> x -> y
    layers: list[LayerCheck]
    log_det: dict[str, Any]
    float64: dict[str, Any]
    nonfinite: dict[str, int]
    notes: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    def worst_layer(self) -> LayerCheck | None:
        """The layer with the largest round-trip error relative to its tolerance."""
        if not self.layers:
            return None

        def ratio(layer: LayerCheck) -> float:
            r = layer.max_rel / layer.tol if layer.tol > 0 else layer.max_rel
            return math.inf if (layer.nonfinite or not np.isfinite(r)) else r

        return max(self.layers, key=ratio)

    def failing_layers(self) -> list[str]:
        return [layer.name for layer in self.layers if not layer.ok]

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["ok"] = self.ok
        worst = self.worst_layer()
        out["worst_layer"] = None if worst is None else worst.name
        return _json_safe(out)

    def to_json(self, **kwargs) -> str:
        """The report as JSON (NaN/inf written as ``null``)."""
        return json.dumps(self.to_dict(), **{"indent": 2, **kwargs})

    def __str__(self) -> str:
        return self.table()

    def table(self) -> str:
        """A readable multi-line text report."""
        lines = [
            f"invnet.verify: {self.model}, {len(self.layers)} layers, D={self.dim}, "
            f"{self.n_samples} samples ({self.n_finite} finite), {self.dtype}, {self.platform}",
            f"tolerance {self.tol:.2e}  ({self.tol_rule})",
            "",
            f"  {'round trip':<16}{'max abs':>10}{'mean abs':>10}{'max rel':>10}{'mean rel':>10}",
        ]
        for label, s in (("x -> y -> x", self.forward), ("y -> x -> y", self.inverse)):
            lines.append(
                f"  {label:<16}{_f(s.max_abs):>10}{_f(s.mean_abs):>10}"
                f"{_f(s.max_rel):>10}{_f(s.mean_rel):>10}"
            )
        lines += [
            "",
            "  per layer: the relative round-trip error each layer adds (max over samples)",
        ]
        width = max([len(x.name) for x in self.layers] + [5])
        kwidth = max([len(x.kind) for x in self.layers] + [4])
        lines.append(
            f"  {'layer':<{width}}  {'type':<{kwidth}}  {'bound':>9}  {'x->y->x':>9}  "
            f"{'y->x->y':>9}  {'tol':>9}"
        )
        for layer in self.layers:
            status = "ok" if layer.ok else "FAIL"
            if layer.nonfinite:
                status += f" ({layer.nonfinite} non-finite)"
            lines.append(
                f"  {layer.name:<{width}}  {layer.kind:<{kwidth}}  {_f(layer.bound):>9}  "
                f"{_f(layer.forward.max_rel):>9}  {_f(layer.inverse.max_rel):>9}  "
                f"{_f(layer.tol):>9}  {status}"
            )
        ld = self.log_det
        lines.append("")
        if ld.get("n", 0):
            lines.append(
                f"  log-det vs slogdet(jacobian), {ld['n']} samples: forward max err "
                f"{_f(ld['forward_max_err'])}, inverse {_f(ld['inverse_max_err'])}, "
                f"max |fwd + inv| {_f(ld['sum_max_err'])}  "
                f"({'ok' if ld['ok'] else 'FAIL'}, worst err/tol {_f(ld['worst_ratio'])})"
            )
        else:
            lines.append("  log-det: not checked (no finite samples)")
        f64 = self.float64
        if f64.get("available"):
            lines.append(
                f"  float64 drift: outputs {_f(f64['forward_drift_rel'])} rel, inputs (via "
                f"inverse) {_f(f64['inverse_drift_rel'])} rel, log-det "
                f"{_f(f64['log_det_drift_abs'])} abs; float64 round trip "
                f"{_f(f64['roundtrip_rel'])} rel (info)"
            )
        else:
            lines.append(f"  float64 drift: not measured ({f64.get('reason', 'skipped')})")
        lines.append(
            f"  conditioning: overall bound {_f(self.condition_bound)} (product of the layer "
            "bounds)"
        )
        nf = self.nonfinite
        lines.append(
            f"  non-finite: {nf['inputs']} input samples (skipped), {nf['outputs']} outputs "
            f"of finite inputs"
        )
        lines += [f"  note: {n}" for n in self.notes]
        lines.append("")
        if self.ok:
            lines.append(
                f"PASS  (max rel round-trip error {_f(self._max_rel())} <= {self.tol:.2e})"
            )
        else:
            lines.append("FAIL")
            lines += [f"  - {msg}" for msg in self.failures]
        return "\n".join(lines)

    def _max_rel(self) -> float:
        return _nanmax(self.forward.max_rel, self.inverse.max_rel)


def _nanmax(*values: float) -> float:
    """The largest value that is not NaN (NaN when all are)."""
    kept = [v for v in values if not math.isnan(v)]
    return max(kept) if kept else math.nan


def _f(v: float) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{v:.2e}"


def _json_safe(obj):
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, float | np.floating):
        return float(obj) if np.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


# ---------------------------------------------------------------------- model structure
def layer_bound(layer: Bijector) -> tuple[float, str]:
    """``(bound, rule)``: how much ``layer`` can amplify relative rounding errors in a round
    trip; each layer states its own in `Bijector.error_bound`."""
    return layer.error_bound()


def _x64_context():
    """A context manager that enables float64, or ``None`` if this jax has none."""
    if hasattr(jax, "enable_x64"):
        return jax.enable_x64(True)
    legacy = getattr(jax.experimental, "enable_x64", None)
    return legacy() if legacy is not None else None


# ------------------------------------------------------------------------ jitted checks
def _inf_norm(a):
    return jnp.max(jnp.abs(a), axis=-1)


def _errors(got, want, other):
    """Per sample: (max abs, mean abs, rel) error of ``got`` against ``want``."""
    diff = jnp.abs(got - want)
    scale = jnp.maximum(jnp.maximum(_inf_norm(want), _inf_norm(other)), jnp.finfo(want.dtype).tiny)
    return jnp.max(diff, axis=-1), jnp.mean(diff, axis=-1), jnp.max(diff, axis=-1) / scale


def _make_checks(graphdef, fixed, n_leaves: int):
    """The jitted function: everything per sample, reductions happen in NumPy afterwards."""

    def checks(params, x, cond, jac_idx):
        model = nnx.merge(graphdef, params, fixed)
        leaves = steps(model)
        assert len(leaves) == n_leaves
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
                "fwd": _errors(x_back, x, y),
                "inv": _errors(y_again, y, x_back),
            }
            h, fwd_layers = x, []
            for leaf in leaves:
                h_next, _ = leaf.forward(h, cond)
                h_back, _ = leaf.inverse(h_next, cond)
                fwd_layers.append(_errors(h_back, h, h_next) + (_inf_norm(h_next),))
                h = h_next
            g, inv_layers = y, []
            for leaf in reversed(leaves):
                g_prev, _ = leaf.inverse(g, cond)
                g_again, _ = leaf.forward(g_prev, cond)
                inv_layers.append(_errors(g_again, g, g_prev) + (_inf_norm(g_prev),))
                g = g_prev
            out["fwd_layers"] = jax.tree.map(lambda *a: jnp.stack(a), *fwd_layers)
            out["inv_layers"] = jax.tree.map(lambda *a: jnp.stack(a[::-1]), *inv_layers)

            def jac_logdet(fn, points, conds):
                def single(p, c):
                    return fn(p, cond=c)[0]

                jac = jax.vmap(jax.jacrev(single))(points, conds)  # rev: works through custom VJPs
                return jnp.linalg.slogdet(jac)[1], jnp.linalg.cond(jac)

            if jac_idx.shape[0]:
                cs = None if cond is None else cond[jac_idx]
                if cs is None:
                    cs = jnp.zeros((jac_idx.shape[0], 0), x.dtype)
                    fwd_fn = lambda p, cond: model.forward(p)  # noqa: E731
                    inv_fn = lambda p, cond: model.inverse(p)  # noqa: E731
                else:
                    fwd_fn, inv_fn = model.forward, model.inverse
                out["jac_fwd"] = jac_logdet(fwd_fn, x[jac_idx], cs)
                out["jac_inv"] = jac_logdet(inv_fn, y[jac_idx], cs)
        return out

    return jax.jit(checks)


def _make_float64_run(graphdef, fixed):
    def run(params, x, y, cond):
        model = nnx.merge(graphdef, params, fixed)
        y64, ld64 = model.forward(x, cond=cond)
        x64, _ = model.inverse(y, cond=cond)
        x_rt, _ = model.inverse(y64, cond=cond)
        return y64, ld64, x64, _errors(x_rt, x, y64)[2]

    return jax.jit(run)


# ------------------------------------------------------------------------------ verify
def _stats(max_abs, mean_abs, rel, mask) -> ErrorStats:
    if not mask.any():
        return ErrorStats(math.nan, math.nan, math.nan, math.nan)
    return ErrorStats(
        float(np.max(max_abs[mask])),
        float(np.mean(mean_abs[mask])),
        float(np.max(rel[mask])),
        float(np.mean(rel[mask])),
    )


def _cast_floats(state, dtype):
    return jax.tree.map(
        lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, state
    )


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
        model: any invnet `Bijector` (a `Sequential` is checked layer by layer).
        x: inputs ``(..., D)``, floating; their dtype sets the precision checked.
        cond: the condition of a conditional model, ``(..., cond_dim)`` or ``(cond_dim,)``.
        tol: relative round-trip tolerance; default ``min(10 * D * eps * bound, sqrt(eps))``
            (see the module docs), applied to the model and to each layer with its own bound.
        jacobian_samples: how many (finite) samples get the ``slogdet(jacobian)`` check.
        check_float64: re-run the model in float64 and report the drift.

    Returns:
        a `VerifyReport`; ``report.ok`` is the verdict, ``print(report)`` the table. The model
        is not modified (an uninitialised `ActNorm` is checked as the identity it is).

    Raises ``TypeError`` for a non-floating ``x`` and ``ValueError`` for a wrong shape;
    NaN/inf values are reported, never raised.
    """
    with np.errstate(all="ignore"):  # NaN/inf are data here: counted, not warned about
        return _verify(model, x, cond, tol, jacobian_samples, check_float64)


def _verify(model, x, cond, tol, jacobian_samples, check_float64) -> VerifyReport:
    if not isinstance(model, Bijector):
        raise TypeError(f"invnet.verify: expected an invnet Bijector, got {type(model).__name__}")
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(
            f"invnet.verify: x must be a floating array, got dtype {x.dtype}; "
            "convert with x.astype(jnp.float32)"
        )
    if x.ndim == 0 or x.size == 0:
        raise ValueError(f"invnet.verify: x must be a non-empty (..., D) array, got {x.shape}")
    dim = int(x.shape[-1])
    if model.dim is not None and dim != model.dim:
        raise ValueError(
            f"invnet.verify: the model maps vectors of size {model.dim}, got x of shape "
            f"{tuple(x.shape)}"
        )
    x = x.reshape(-1, dim)
    n = x.shape[0]
    finite = np.array(jnp.all(jnp.isfinite(x), axis=-1))
    if model.cond_dim:
        if cond is None:
            raise ValueError(
                f"invnet.verify: the model is conditional (cond_dim={model.cond_dim}); pass cond="
            )
        cond = jnp.asarray(cond, x.dtype)
        if cond.ndim == 0 or cond.shape[-1] != model.cond_dim:
            raise ValueError(
                f"invnet.verify: cond must have last axis {model.cond_dim}, got {cond.shape}"
            )
        if cond.ndim == 1:
            cond = jnp.broadcast_to(cond, (n, model.cond_dim))
        elif cond.size // model.cond_dim != n:
            raise ValueError(
                f"invnet.verify: cond has {cond.size // model.cond_dim} rows, x has {n}"
            )
        cond = cond.reshape(n, model.cond_dim)
        finite &= np.asarray(jnp.all(jnp.isfinite(cond), axis=-1))
    else:
        cond = None

    # A private copy: an uninitialised ActNorm must not re-initialise from data mid-check.
    graphdef, state = nnx.split(model)
    copy = nnx.merge(graphdef, state)
    notes = []
    for step in steps(copy):
        problem = step.layer.not_ready()
        if problem is not None:
            step.layer.mark_ready()
            notes.append(f"{step.name}: {problem}; checked with its current parameters")
    leaves = steps(copy)
    graphdef, params, fixed = nnx.split(copy, nnx.Param, ...)

    dtype = jnp.dtype(x.dtype)
    eps = float(jnp.finfo(dtype).eps)
    cap = math.sqrt(eps)

    def derived(bound: float) -> float:
        return min(SAFETY * dim * eps * bound, cap)

    bounds = [layer_bound(leaf.layer) for leaf in leaves]
    overall = float(np.prod([b for b, _ in bounds])) if bounds else 1.0
    if tol is None:
        tol_value = derived(overall)
        tol_rule = (
            f"derived: min({SAFETY:g} * D * eps * bound, sqrt(eps)) = "
            f"min({SAFETY:g} * {dim} * {eps:.2e} * {overall:.3g}, {cap:.2e})"
        )
    else:
        tol_value = float(tol)
        if not tol_value > 0:
            raise ValueError(f"invnet.verify: tol must be positive, got {tol}")
        tol_rule = "user override (tol=)"

    finite_idx = np.flatnonzero(finite)
    jac_idx = jnp.asarray(finite_idx[: max(int(jacobian_samples), 0)], jnp.int32)
    checks = _make_checks(graphdef, fixed, len(leaves))
    out = jax.device_get(checks(params, x, cond, jac_idx))

    failures: list[str] = []
    y_ok = np.all(np.isfinite(out["y"]), axis=-1)
    back_ok = np.all(np.isfinite(out["x_back"]), axis=-1) & np.all(
        np.isfinite(out["y_again"]), axis=-1
    )
    out_ok = y_ok & back_ok & np.isfinite(out["ld_fwd"]) & np.isfinite(out["ld_inv"])
    bad_outputs = int(np.sum(finite & ~out_ok))
    mask = finite & out_ok
    fwd = _stats(*out["fwd"], mask)
    inv = _stats(*out["inv"], mask)
    nonfinite = {"inputs": int(n - finite.sum()), "outputs": bad_outputs}
    if not finite.any():
        failures.append("no finite input samples: nothing could be verified")
    if bad_outputs:
        failures.append(f"{bad_outputs} finite input samples gave NaN/inf outputs or log-dets")
    for label, s in (("x -> y -> x", fwd), ("y -> x -> y", inv)):
        if s.max_rel > tol_value:
            failures.append(
                f"{label}: max relative error {s.max_rel:.2e} exceeds tolerance {tol_value:.2e}"
            )

    layer_checks = []
    for k, (leaf, (bound, rule)) in enumerate(zip(leaves, bounds, strict=True)):
        f_abs, f_mean, f_rel, f_next = (a[k] for a in out["fwd_layers"])
        i_abs, i_mean, i_rel, i_prev = (a[k] for a in out["inv_layers"])
        layer_mask = finite & np.isfinite(f_rel) & np.isfinite(i_rel)
        layer_mask &= np.isfinite(f_next) & np.isfinite(i_prev)
        n_bad = int(np.sum(finite & ~layer_mask))
        lf, li = _stats(f_abs, f_mean, f_rel, layer_mask), _stats(i_abs, i_mean, i_rel, layer_mask)
        ltol = tol_value if tol is not None else derived(bound)
        worst = _nanmax(lf.max_rel, li.max_rel)
        layer_ok = n_bad == 0 and not worst > ltol
        kind = type(leaf.layer).__name__
        layer_checks.append(
            LayerCheck(
                name=leaf.name,
                kind=f"Inverse({kind})" if leaf.inverted else kind,
                bound=bound,
                bound_rule=rule,
                tol=ltol,
                forward=lf,
                inverse=li,
                nonfinite=n_bad,
                ok=layer_ok,
            )
        )
        if not layer_ok:
            why = (
                f"{n_bad} samples became NaN/inf"
                if n_bad
                else f"relative round-trip error {worst:.2e} > tolerance {ltol:.2e}"
            )
            failures.append(f"layer {leaf.name} ({kind}, {rule} = {bound:.3g}): {why}")

    log_det = _check_log_det(out, jac_idx, mask, dim, eps, tol_value)
    if not log_det["ok"]:
        failures.append(log_det["message"])

    float64 = _float64_drift(graphdef, params, fixed, x, cond, out, mask, dtype, check_float64)
    return VerifyReport(
        model=type(model).__name__,
        dim=dim,
        dtype=dtype.name,
        platform=jax.devices()[0].platform,
        n_samples=int(n),
        n_finite=int(finite.sum()),
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
    )


def _check_log_det(out, jac_idx, mask, dim, eps, tol_value) -> dict[str, Any]:
    n = int(jac_idx.shape[0])
    ld_fwd, ld_inv = out["ld_fwd"], out["ld_inv"]
    sum_err = np.abs(ld_fwd + ld_inv)
    sum_tol = SAFETY * dim * eps * (1.0 + np.abs(ld_fwd)) + dim * tol_value
    result: dict[str, Any] = {
        "n": n,
        "forward_max_err": math.nan,
        "inverse_max_err": math.nan,
        "sum_max_err": float(np.max(sum_err[mask])) if mask.any() else math.nan,
        "worst_ratio": math.nan,
        "ok": True,
        "message": "",
    }
    ratios = [sum_err[mask] / sum_tol[mask]] if mask.any() else []
    idx = np.asarray(jac_idx)
    keep = mask[idx] if n else np.zeros(0, bool)
    for key, model_ld in (("forward", ld_fwd), ("inverse", ld_inv)):
        if not n:
            continue
        ref, cond_j = out["jac_fwd" if key == "forward" else "jac_inv"]
        err = np.abs(model_ld[idx] - ref)
        cond_j = np.nan_to_num(np.asarray(cond_j, np.float64), nan=np.inf)
        tol = SAFETY * eps * (dim * cond_j + np.abs(np.asarray(ref, np.float64)) + 1.0)
        err, tol = err[keep], tol[keep]
        if err.size:
            result[f"{key}_max_err"] = float(np.max(err))
            ratios.append(np.where(np.isfinite(err), err / tol, np.inf))
    worst = float(np.max(np.concatenate(ratios))) if ratios and mask.any() else math.nan
    result["worst_ratio"] = worst
    if worst > 1.0:
        result["ok"] = False
        result["message"] = (
            f"log-det disagrees with slogdet(jacobian) or forward + inverse log-dets do not sum "
            f"to 0 (forward err {result['forward_max_err']:.2e}, inverse err "
            f"{result['inverse_max_err']:.2e}, |fwd + inv| {result['sum_max_err']:.2e}; "
            f"worst error/tolerance {worst:.2f})"
        )
    return result


def _float64_drift(graphdef, params, fixed, x, cond, out, mask, dtype, enabled):
    if not enabled:
        return {"available": False, "reason": "check_float64=False"}
    if dtype == jnp.float64:
        return {"available": False, "reason": "the model already runs in float64"}
    context = _x64_context()
    if context is None:
        return {"available": False, "reason": "this jax has no enable_x64 context"}
    try:
        with context:
            f64 = jnp.float64
            run = _make_float64_run(graphdef, _cast_floats(fixed, f64))
            y64, ld64, x64, rt64 = jax.device_get(
                run(
                    _cast_floats(params, f64),
                    x.astype(f64),
                    jnp.asarray(out["y"], f64),
                    None if cond is None else cond.astype(f64),
                )
            )
    except Exception as err:  # a platform without float64 support, for one
        return {"available": False, "reason": f"float64 run failed: {type(err).__name__}: {err}"}
    if not mask.any():
        return {"available": False, "reason": "no finite samples"}
    y32, x32 = np.asarray(out["y"], np.float64), np.asarray(out["x_back"], np.float64)

    def rel(a, b):
        scale = np.maximum(np.max(np.abs(b), axis=-1), np.finfo(np.float64).tiny)
        return float(np.max((np.max(np.abs(a - b), axis=-1) / scale)[mask]))

    return {
        "available": True,
        "reason": "",
        "forward_drift_rel": rel(y32, y64),
        "inverse_drift_rel": rel(x32, x64),
        "log_det_drift_abs": float(np.max(np.abs(out["ld_fwd"] - ld64)[mask])),
        "roundtrip_rel": float(np.max(rt64[mask])),
    }
