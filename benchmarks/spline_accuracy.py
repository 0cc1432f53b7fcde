"""Round-trip accuracy and NaN counts of the rational-quadratic spline (float32 and float64).

For each scale of the unnormalised spline parameters (the conditioner's output; a trained
conditioner's outputs are typically of scale <= 1), ``n`` random splines with ``bins`` bins on
``[-bound, bound]`` each get one random input, uniform on ``[-1.5 bound, 1.5 bound]``;
then ``n_adv`` adversarial inputs: exactly on a knot, the next float beside a knot, +-bound,
tail points and +-1e6. Reported per dtype and scale:

* ``max_abs`` / ``median_abs``: ``|inverse(forward(x)) - x|`` over the random inputs;
* ``max_scaled``: the same times the local slope ``f'(x)``, in units of ``eps * bound``
  (the error the rounding of ``y`` alone forces is about 1 unit: the inverse's own error);
* ``not_exact``: adversarial points that do not come back bit for bit (knots, +-bound,
  tails, 1e6 must);
* ``nan``: non-finite values, log-dets or gradients (w.r.t. inputs and parameters) over all
  inputs, both directions.

    python benchmarks/spline_accuracy.py [--n 1000000] [--n-adv 10000] [--bins 8]
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np

from invnet.layers.spline import rq_spline_forward, rq_spline_inverse, rq_spline_params


def _functions(bound):
    def run(raw, x):
        p = rq_spline_params(raw, bound=bound)
        y, ld = rq_spline_forward(x, p)
        x_back, ild = rq_spline_inverse(y, p)
        y_back, _ = rq_spline_forward(rq_spline_inverse(x, p)[0], p)

        def loss(raw, x):
            q = rq_spline_params(raw, bound=bound)
            a, la = rq_spline_forward(x, q)
            b, lb = rq_spline_inverse(x, q)
            return jnp.sum(a + la + b + lb)

        g_raw, g_x = jax.grad(loss, argnums=(0, 1))(raw, x)
        bad = sum(jnp.sum(~jnp.isfinite(a)) for a in (y, ld, x_back, ild, y_back, g_raw, g_x))
        return p.x_knots, x_back, y_back, ld, bad

    return jax.jit(run)


def adversarial(knots, rng, bound):
    n = knots.shape[0]
    j = rng.integers(0, knots.shape[1], n)
    on_knot = knots[np.arange(n), j]
    side = rng.choice([-np.inf, np.inf], n)
    beside = np.nextafter(on_knot, side).astype(knots.dtype)
    sign = rng.choice([-1.0, 1.0], n)
    kinds = rng.integers(0, 5, n)
    tail = sign * bound * (1 + rng.uniform(0, 10, n))
    x = np.choose(kinds, [on_knot, beside, sign * bound, tail, sign * 1e6]).astype(knots.dtype)
    must_be_exact = kinds != 1
    return x, must_be_exact


def measure(dtype, scale, n, n_adv, bins, bound, seed=0):
    rng = np.random.default_rng(seed)
    run = _functions(bound)
    eps = float(jnp.finfo(dtype).eps)
    raw = jnp.asarray(rng.normal(scale=scale, size=(n, 3 * bins - 1)), dtype)
    x = jnp.asarray(rng.uniform(-1.5 * bound, 1.5 * bound, n), dtype)
    knots, x_back, _, ld, bad = run(raw, x)
    err = np.abs(np.asarray(x_back, np.float64) - np.asarray(x, np.float64))
    scaled = err * np.exp(np.asarray(ld, np.float64)) / (eps * bound)
    raw_a = raw[:n_adv]
    x_a, exact = adversarial(np.asarray(knots[:n_adv]), rng, bound)
    _, xb_a, yb_a, _, bad_a = run(raw_a, jnp.asarray(x_a))
    not_exact = int(np.sum((np.asarray(xb_a) != x_a)[exact]))
    not_exact += int(np.sum((np.asarray(yb_a) != x_a)[exact & (np.abs(x_a) >= bound)]))
    return {
        "dtype": jnp.dtype(dtype).name,
        "scale": scale,
        "max_abs": float(err.max()),
        "median_abs": float(np.median(err)),
        "max_scaled": float(scaled.max()),
        "nan_random": int(bad),
        "nan_adversarial": int(bad_a),
        "not_exact": not_exact,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--n-adv", type=int, default=10_000)
    parser.add_argument("--bins", type=int, default=8)
    parser.add_argument("--bound", type=float, default=3.0)
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args(argv)
    jax.config.update("jax_enable_x64", True)
    rows = [
        measure(dt, scale, args.n, args.n_adv, args.bins, args.bound)
        for dt in (jnp.float32, jnp.float64)
        for scale in (0.5, 1.0, 3.0)
    ]
    print(f"backend {jax.default_backend()}, bins {args.bins}, bound {args.bound}, n {args.n}")
    print("| dtype | raw scale | max abs | median abs | max err*f'/(eps*bound) | NaN | not exact |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['dtype']} | {r['scale']} | {r['max_abs']:.1e} | {r['median_abs']:.1e} | "
            f"{r['max_scaled']:.0f} | {r['nan_random'] + r['nan_adversarial']} | "
            f"{r['not_exact']} |"
        )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)
    return rows


if __name__ == "__main__":
    main()
