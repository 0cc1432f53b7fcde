"""Markdown tables and a PNG plot from ``results.json`` (``python benchmarks/report.py DIR``)."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if v != v:
            return "-"
        if v == 0:
            return "0"
        if abs(v) >= 100:
            return f"{v:.0f}"
        if abs(v) >= 0.01:
            return f"{v:.3g}"
        return f"{v:.1e}"
    return str(v)


def _table(rows, cols, headers=None) -> list[str]:
    headers = headers or cols
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        out.append("| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |")
    return out


def markdown(results: dict) -> str:
    env, sec = results["env"], results["sections"]
    lines = [
        f"Device: {env['backend']} ({env['device_kind']}, {env['cpu_count']} CPU cores seen), "
        f"{env['platform']}; python {env['python']}, jax {env['jax']}, flax {env['flax']}, "
        f"invnet {env.get('invnet')} ({env.get('git')}); float32, precision "
        f"{env['precision']}; mode {env['mode']}; {env['date']}.",
        f"Command: `{env['command']}`. Times: median ms per call after compilation.",
        "",
    ]
    if sec.get("lu"):
        lines += ["### LULinear: forward, inverse, log-det", ""]
        lines += _table(
            sec["lu"],
            [
                "dim",
                "batch",
                "method",
                "forward_ms",
                "inverse_ms",
                "log_det_ms",
                "inverse/forward",
                "roundtrip_rel_err",
            ],
        )
        lines += [
            "",
            "inverse/forward of a method without its own forward is taken against "
            "the fastest forward at that size.",
            "",
        ]
    if sec.get("models"):
        lines += ["### Whole models", ""]
        lines += _table(
            sec["models"],
            [
                "model",
                "dim",
                "batch",
                "method",
                "forward_ms",
                "inverse_ms",
                "log_det_ms",
                "inverse/forward",
                "roundtrip_rel_err",
            ],
        )
        lines.append("")
    if sec.get("gd"):
        lines += ["### Exact inverse vs gradient-descent reconstruction (LU+LeakyReLU x2)", ""]
        lines += _table(
            sec["gd"], ["method", "dim", "batch", "time_ms", "rel_err", "slowdown_vs_exact"]
        )
        lines.append("")
    if sec.get("accuracy"):
        r0 = sec["accuracy"][0]
        lines += [
            f"### LU inverse accuracy (float32, D={r0['dim']}, batch {r0['batch']}; "
            "relative error max|x_hat - x| / max|x|)",
            "",
        ]
        lines += _table(
            sec["accuracy"],
            ["kappa", "solve", "matrix", "matrix+refine", "np.linalg.solve (f64)"],
            [
                "condition number",
                "solve",
                "matrix",
                "matrix+refine",
                "f64 solve of the f32 y (floor)",
            ],
        )
        lines.append("")
    if sec.get("precision"):
        lines += ["### Precision modes", ""]
        lines += _table(
            sec["precision"],
            [
                "precision",
                "model",
                "dim",
                "batch",
                "forward_ms",
                "inverse_ms",
                "inverse/forward",
                "roundtrip_rel_err",
                "forward_rel_diff_vs_highest",
            ],
        )
        lines.append("")
    if sec.get("reversible"):
        r0 = sec["reversible"][0]
        lines += [
            f"### Reversible backprop (AffineCoupling+Permute blocks, D={r0['dim']}, "
            f"hidden {r0['hidden']}x2, batch {r0['batch']}; XLA temp memory of one "
            "loss+grad step)",
            "",
        ]
        rows = [
            dict(r, **{k: r[k] / 1e6 for k in r if k.endswith("_bytes")}) for r in sec["reversible"]
        ]
        lines += _table(
            rows,
            [
                "depth",
                "ordinary_temp_bytes",
                "reversible_temp_bytes",
                "reversible_scan_temp_bytes",
                "ordinary_step_ms",
                "reversible_step_ms",
                "step_time_ratio",
                "reversible_grad_rel_diff",
            ],
            [
                "depth",
                "ordinary MB",
                "reversible MB",
                "reversible (scan) MB",
                "ordinary step ms",
                "reversible step ms",
                "time ratio",
                "grad rel diff",
            ],
        )
        lines.append("")
    if sec.get("peers"):
        lines += ["### Peers: one LU layer (y = L U x + b), same weights", ""]
        lines += _table(
            sec["peers"],
            [
                "lib",
                "dim",
                "batch",
                "forward_ms",
                "inverse_ms",
                "inverse/forward",
                "roundtrip_rel_err",
            ],
        )
        lines.append("")
    lines += _fastpath(sec)
    for name, why in results.get("skipped", {}).items():
        lines.append(f"- {name}: {why}")
    return "\n".join(lines) + "\n"


def _fastpath(sec) -> list[str]:
    """Tables of the ``flows``, ``layers`` and ``flow_peers`` sections."""
    lines: list[str] = []
    if sec.get("flows"):
        lines += ["### Sampling and densities: compiled by default vs hand-jitted vs eager", ""]
        lines += _table(
            sec["flows"],
            ["call", "model", "dim", "n", "default_ms", "hand_jit_ms", "default/hand_jit",
             "eager_ms", "first_call_default_s", "first_call_hand_jit_s"],
        )  # fmt: skip
        lines.append("")
    layer_rows = [r for r in sec.get("layers", []) if "compiled/jit forward" in r]
    if layer_rows:
        lines += ["### Per layer: invnet.freeze vs plain jit, and the default calls", ""]
        cols = [k for k in layer_rows[0] if k not in ("layer", "dim", "batch")]
        lines += _table(layer_rows, ["layer", "dim", "batch", *cols])
        lines.append("")
    for r in sec.get("layers", []):
        if "overhead us" in r or "bias before GEMM ms" in r:
            lines.append("- " + ", ".join(f"{k}: {_fmt(v)}" for k, v in r.items()))
    if sec.get("flow_peers"):
        r0 = sec["flow_peers"][0]
        lines += [
            "",
            f"### Peers: RealNVP-style flow (n={r0['n']} samples / densities, training batch "
            f"{r0['train_batch']})",
            "",
        ]
        lines += _table(
            sec["flow_peers"], ["lib", "dim", "sample_ms", "log_prob_ms", "train_step_ms"]
        )
    lines.append("")
    return lines


def plot(results: dict, path) -> str | None:
    """Write the summary figure; returns a message instead when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "plot skipped: matplotlib is not installed"
    sec, env = results["sections"], results["env"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    series = {}
    for r in sec.get("lu", []):
        if r["method"].startswith(("jit", "compiled (matrix)")):
            us = r["inverse_ms"] * 1e3 / r["batch"]
            series.setdefault(f"invnet {r['method']}: inverse", []).append((r["dim"], us))
        if r["method"] == "compiled (matrix)":
            us = r["forward_ms"] * 1e3 / r["batch"]
            series.setdefault("invnet compiled: forward", []).append((r["dim"], us))
    for r in sec.get("peers", []):
        if not r["lib"].startswith("invnet"):
            us = r["inverse_ms"] * 1e3 / r["batch"]
            series.setdefault(f"{r['lib']}: inverse", []).append((r["dim"], us))
    for label, pts in series.items():
        ax.plot(*zip(*pts, strict=True), "--" if "forward" in label else "o-", label=label)
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="D",
        ylabel="microseconds per sample",
        title="LU layer: inverse time per sample",
    )
    ax.legend(fontsize=7)
    ax = axes[1]
    for key, label in (
        ("ordinary_temp_bytes", "ordinary backprop"),
        ("reversible_temp_bytes", "reversible"),
        ("reversible_scan_temp_bytes", "reversible (scan)"),
    ):
        pts = [(r["depth"], r[key] / 1e6) for r in sec.get("reversible", [])]
        if pts:
            ax.plot(*zip(*pts, strict=True), "o-", label=label)
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="blocks",
        ylabel="XLA temp memory (MB)",
        title="training step memory vs depth",
    )
    ax.legend(fontsize=7)
    ax = axes[2]
    acc = sec.get("accuracy", [])
    for key in ("solve", "matrix", "matrix+refine", "np.linalg.solve (f64)"):
        pts = [(r["kappa"], r[key]) for r in acc]
        if pts:
            ax.plot(*zip(*pts, strict=True), "o-", label=key)
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="condition number",
        ylabel="relative round-trip error",
        title="LU inverse accuracy (float32)",
    )
    ax.legend(fontsize=7)
    fig.suptitle(
        f"invnet benchmarks: {env['backend']} {env['device_kind']}, jax {env['jax']}, "
        f"{env['mode']} mode",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


if __name__ == "__main__":
    folder = Path(sys.argv[1])
    res = json.loads((folder / "results.json").read_text())
    (folder / "table.md").write_text(markdown(res))
    print(plot(res, folder / "plot.png") or f"wrote {folder}/table.md, plot.png")
