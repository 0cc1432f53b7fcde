"""The report of `invnet.verify`: per-layer rows, the verdict, a text table and JSON.

`VerifyReport` holds what `invnet.verification.checks` measured; it computes nothing itself
beyond summaries (the worst layer, the failing ones) and renderings (``table()``,
``to_json()``).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

__all__ = ["ErrorStats", "LayerCheck", "VerifyReport"]


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
        return nanmax(self.forward.max_rel, self.inverse.max_rel)


@dataclass
class VerifyReport:
    """Everything `verify` measured. ``ok`` is the verdict; ``table()`` and ``to_json()``
    render it; ``failures`` lists the reasons when it fails."""

    model: str
    dim: int  # D: the number of elements of one input event
    event_shape: tuple[int, ...]  # one input sample's event, e.g. (4,) or (H, W, C)
    output_event_shape: tuple[int, ...]  # one output sample's event (may differ in shape)
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
    # layer name -> the certificate of its iterative (jacobi) inverse, for layers with one
    certificates: dict[str, dict[str, Any]] = field(default_factory=dict)

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
            f"invnet.verify: {self.model}, {len(self.layers)} layers, "
            f"D={self.dim}{self._events()}, {self.n_samples} samples ({self.n_finite} finite), "
            f"{self.dtype}, {self.platform}",
            f"tolerance {self.tol:.2e}  ({self.tol_rule})",
            "",
            f"  {'round trip':<16}{'max abs':>10}{'mean abs':>10}{'max rel':>10}{'mean rel':>10}",
        ]
        for label, s in (("x -> y -> x", self.forward), ("y -> x -> y", self.inverse)):
            lines.append(
                f"  {label:<16}{_f(s.max_abs):>10}{_f(s.mean_abs):>10}"
                f"{_f(s.max_rel):>10}{_f(s.mean_rel):>10}"
            )
        lines += ["", *self._layer_lines(), "", *self._summary_lines(), ""]
        if self.ok:
            lines.append(
                f"PASS  (max rel round-trip error {_f(self._max_rel())} <= {self.tol:.2e})"
            )
        else:
            lines.append("FAIL")
            lines += [f"  - {msg}" for msg in self.failures]
        return "\n".join(lines)

    def _layer_lines(self) -> list[str]:
        lines = ["  per layer: the relative round-trip error each layer adds (max over samples)"]
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
        return lines

    def _summary_lines(self) -> list[str]:
        ld, f64, nf = self.log_det, self.float64, self.nonfinite
        if ld.get("n", 0):
            lines = [
                f"  log-det vs slogdet(jacobian), {ld['n']} samples: forward max err "
                f"{_f(ld['forward_max_err'])}, inverse {_f(ld['inverse_max_err'])}, "
                f"max |fwd + inv| {_f(ld['sum_max_err'])}  "
                f"({'ok' if ld['ok'] else 'FAIL'}, worst err/tol {_f(ld['worst_ratio'])})"
            ]
        else:
            lines = ["  log-det vs slogdet(jacobian): not checked (no finite samples drawn for it)"]
        if f64.get("available"):
            lines.append(
                f"  float64 drift: outputs {_f(f64['forward_drift_rel'])} rel, inputs (via "
                f"inverse) {_f(f64['inverse_drift_rel'])} rel, log-det "
                f"{_f(f64['log_det_drift_abs'])} abs; float64 round trip "
                f"{_f(f64['roundtrip_rel'])} rel (info)"
            )
        else:
            lines.append(f"  float64 drift: not measured ({f64.get('reason', 'skipped')})")
        lines += [
            f"  conditioning: overall bound {_f(self.condition_bound)} (product of the layer "
            "bounds)",
            f"  non-finite: {nf['inputs']} input samples (skipped), {nf['outputs']} outputs "
            "of finite inputs",
        ]
        for name, c in self.certificates.items():
            lines.append(
                f"  {c['method']} inverse of {name} ({c['kind']}, {c['tokens']} tokens, cap "
                f"{c['max_sweeps']}): {c['samples'] - c['unconverged']}/{c['samples']} "
                f"converged, sweeps max {c['sweeps_max']} mean {c['sweeps_mean']:.1f}, last "
                f"change {_f(c['change_max'])}, residual {_f(c['residual_max'])}"
            )
        return lines + [f"  note: {n}" for n in self.notes]

    def _events(self) -> str:
        """The event shapes, when they say more than D (events of rank > 1, or reshaped)."""
        a, b = tuple(self.event_shape), tuple(self.output_event_shape)
        if len(a) == 1 and a == b:
            return ""
        return f" (event {a} -> {b})" if a != b else f" (event {a})"

    def _max_rel(self) -> float:
        return nanmax(self.forward.max_rel, self.inverse.max_rel)


def nanmax(*values: float) -> float:
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
