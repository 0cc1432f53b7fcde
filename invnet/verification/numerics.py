"""Numerical pieces of `invnet.verify`: per-sample errors over events of any rank, the log-det
comparison against ``slogdet`` of the Jacobian, and the float64 re-run."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from invnet import _runtime

__all__ = ["flat", "inf_norm", "errors", "check_log_det", "float64_drift"]


def flat(a):
    """One row per sample: ``(n, *event) -> (n, D)``."""
    return a.reshape(a.shape[0], -1)


def inf_norm(a):
    """Per sample, the largest absolute entry over all event axes."""
    return jnp.max(jnp.abs(flat(a)), axis=-1)


def errors(got, want, other):
    """Per sample, over all event axes: (max abs, mean abs, rel) error of ``got`` against
    ``want``, relative to the larger of ``want`` and ``other`` (the other end of the trip,
    which may have another event shape)."""
    diff = jnp.abs(flat(got) - flat(want))
    scale = jnp.maximum(jnp.maximum(inf_norm(want), inf_norm(other)), jnp.finfo(want.dtype).tiny)
    return jnp.max(diff, axis=-1), jnp.mean(diff, axis=-1), jnp.max(diff, axis=-1) / scale


# ---------------------------------------------------------------------------- log-det
def check_log_det(out, jac_idx, mask, dim, eps, tol_value, safety) -> dict[str, Any]:
    """Model log-dets against ``slogdet(J)`` on the Jacobian subsample (tolerance
    ``safety * eps * (D * cond(J) + |log_det| + 1)``) and ``forward + inverse`` against 0."""
    n = int(jac_idx.shape[0])
    ld_fwd, ld_inv = out["ld_fwd"], out["ld_inv"]
    sum_err = np.abs(ld_fwd + ld_inv)
    sum_tol = safety * dim * eps * (1.0 + np.abs(ld_fwd)) + dim * tol_value
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
        tol = safety * eps * (dim * cond_j + np.abs(np.asarray(ref, np.float64)) + 1.0)
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


# ---------------------------------------------------------------------------- float64
def _x64_context():
    """A context manager that enables float64, or ``None`` if this jax has none."""
    if hasattr(jax, "enable_x64"):
        return jax.enable_x64(True)
    legacy = getattr(jax.experimental, "enable_x64", None)
    return legacy() if legacy is not None else None


def _cast_floats(state, dtype):
    return jax.tree.map(
        lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, state
    )


def _make_float64_run(graphdef):
    def run(params, fixed, x, y, cond):
        model = nnx.merge(graphdef, params, fixed)
        y64, ld64 = model.forward(x, cond=cond)
        x64, _ = model.inverse(y, cond=cond)
        x_rt, _ = model.inverse(y64, cond=cond)
        return y64, ld64, x64, errors(x_rt, x, y64)[2]

    return jax.jit(run)


def _run_float64(graphdef, params, fixed, x, y, cond):
    f64 = jnp.float64
    run = _runtime.cached(("verify-float64", graphdef), lambda: _make_float64_run(graphdef))
    cond = None if cond is None else cond.astype(f64)
    params, fixed = _cast_floats(params, f64), _cast_floats(fixed, f64)
    return jax.device_get(run(params, fixed, x.astype(f64), jnp.asarray(y, f64), cond))


def float64_drift(graphdef, params, fixed, inputs, out, mask, enabled) -> dict[str, Any]:
    """The same parameters re-run in float64: drift of outputs, inputs and log-dets."""
    if not enabled:
        return {"available": False, "reason": "check_float64=False"}
    if inputs.x.dtype == jnp.float64:
        return {"available": False, "reason": "the model already runs in float64"}
    context = _x64_context()
    if context is None:
        return {"available": False, "reason": "this jax has no enable_x64 context"}
    try:
        with context:
            y64, ld64, x64, rt64 = _run_float64(
                graphdef, params, fixed, inputs.x, out["y"], inputs.cond
            )
    except Exception as err:  # a platform without float64 support, for one
        return {"available": False, "reason": f"float64 run failed: {type(err).__name__}: {err}"}
    if not mask.any():
        return {"available": False, "reason": "no finite samples"}
    y32, x32 = np.asarray(out["y"], np.float64), np.asarray(out["x_back"], np.float64)

    def rel(a, b):
        a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
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
