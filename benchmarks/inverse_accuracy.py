"""Accuracy of the LULinear inverse methods on well- and ill-conditioned matrices.

For each condition number kappa, a float32 `LULinear` is built from ``W = Q1 diag(s) Q2^T``
(s log-spaced from 1 to 1/kappa). The exact image ``y = W x + b`` of random ``x`` is formed in
float64 from the layer's own float32 factors and rounded to float32; each method then
inverts it in float32 at precision "highest":

* ``solve``: the eager layer's two triangular solves (jitted);
* ``matrix``: `invnet.freeze` with one GEMM by the precomputed inverse;
* ``matrix+refine``: the same plus one refinement step;
* ``np.linalg.solve (f64)``: a float64 LAPACK solve of the rounded y (a floor: the error the
  rounding of y to float32 already forces).

Reported: relative error ``max|x_hat - x| / max|x|``.

    python benchmarks/inverse_accuracy.py [--dim 256] [--batch 512]
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np

import invnet

METHODS = ("solve", "matrix", "matrix+refine")


def conditioned_layer(dim: int, kappa: float, seed: int = 0) -> invnet.LULinear:
    rng = np.random.default_rng(seed)
    q1, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    q2, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    s = np.logspace(0, -np.log10(kappa), dim)
    bias = rng.standard_normal(dim)
    return invnet.LULinear.from_matrix((q1 * s) @ q2.T, bias, param_dtype=jnp.float32)


def measure(dim: int = 256, batch: int = 512, kappas=(1.0, 1e2, 1e4, 1e6)) -> list[dict]:
    rows = []
    for kappa in kappas:
        layer = conditioned_layer(dim, kappa)
        perm, lower, upper = (np.asarray(a, np.float64) for a in layer.factors(jnp.float32))
        w64 = (lower @ upper)[perm.astype(int)]
        x = np.random.default_rng(1).standard_normal((batch, dim))
        x32 = x.astype(np.float32).astype(np.float64)
        y = (x32 @ w64.T + np.asarray(layer.bias[...], np.float64)).astype(np.float32)
        row = {"dim": dim, "batch": batch, "kappa": float(np.linalg.cond(w64))}
        for method in METHODS:
            fast = invnet.freeze(layer, lu_inverse=method)
            x_hat = np.asarray(fast.inverse(jnp.asarray(y))[0], np.float64)
            row[method] = float(np.abs(x_hat - x32).max() / np.abs(x32).max())
        ref = np.linalg.solve(w64, (y.astype(np.float64) - np.asarray(layer.bias[...])).T).T
        row["np.linalg.solve (f64)"] = float(np.abs(ref - x32).max() / np.abs(x32).max())
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    cols = [*METHODS, "np.linalg.solve (f64)"]
    out = ["| condition number | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for r in rows:
        out.append(f"| {r['kappa']:.1e} | " + " | ".join(f"{r[c]:.1e}" for c in cols) + " |")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args()
    rows = measure(args.dim, args.batch)
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print(
            f"float32, precision=highest, D={args.dim}, batch={args.batch}, "
            f"backend={jax.default_backend()}; relative error max|x_hat - x| / max|x|"
        )
        print(table(rows))


if __name__ == "__main__":
    main()
