"""`fit_variational`'s defaults: the gradient estimator (path, "sticking the landing",
against total) and the learning-rate schedule (``--compare schedule``).

The choice of the default was made on these targets, which the variational example
(examples/11_variational.py: a ring in 2-D, a mixture in 10-D) does not use, with that
example's flow and budget (6 rational-quadratic spline couplings, 8 bins on [-5, 5],
hidden (64, 64), learnable diagonal Gaussian base; adam 1e-3, batch 256, 1500 steps; ESS
from 20,000 fresh samples), split seeds 0-2, float32:

* banana2: ``x1 ~ N(0, 2^2)``, ``x2 | x1 ~ N(x1^2 / 4, 0.5^2)``;
* mix5: two diagonal Gaussians of different shapes in 5-D, weights 0.6 / 0.4;
* funnel4: Neal's funnel, ``v ~ N(0, 1.5^2)``, ``x_i | v ~ N(0, e^v)``, i = 1..3.

Each has log Z = 0. Rows go to benchmarks/results/variational_gradient_<backend>.jsonl
(``--compare schedule``: variational_schedule_<backend>.jsonl, appended).

    python benchmarks/variational_gradient.py [--seeds 0 1 2] [--steps 1500]
    python benchmarks/variational_gradient.py --compare schedule

The gradient comparison ran before the schedule was chosen, at a constant adam 1e-3; it
now runs at the default schedule. The schedule comparison, with the path gradient: adam
at a constant 1e-3 (the default before), and cosine-decayed from 1e-3 to 10% and to 1%
(the default now) over the steps.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import time
from pathlib import Path

import _util
import jax
import jax.numpy as jnp
import numpy as np
import optax

import invnet

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"


def _example():
    spec = importlib.util.spec_from_file_location("ex11", ROOT / "examples" / "11_variational.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def banana(x):
    a, b = x[..., 0], x[..., 1] - 0.25 * x[..., 0] ** 2
    return -0.5 * (a / 2) ** 2 - 0.5 * (b / 0.5) ** 2 - math.log(2 * math.pi * 2 * 0.5)


def mixture5(x):
    def component(mean, scale, weight):
        m, s = jnp.asarray(mean, x.dtype), jnp.asarray(scale, x.dtype)
        z = (x - m) / s
        return (
            math.log(weight) + jnp.sum(-0.5 * z * z - jnp.log(s), -1) - 2.5 * math.log(2 * math.pi)
        )

    return jnp.logaddexp(
        component([2.0, 0, 0, 0, 0], [0.5, 1.0, 1.0, 0.7, 1.2], 0.6),
        component([-2.0, 1, 0, 0, 0], [1.0, 0.4, 0.8, 1.0, 1.0], 0.4),
    )


def funnel4(x):
    v, rest = x[..., 0], x[..., 1:]
    log_v = -0.5 * (v / 1.5) ** 2 - math.log(1.5) - 0.5 * math.log(2 * math.pi)
    log_rest = -0.5 * rest**2 * jnp.exp(-v)[..., None] - 0.5 * v[..., None]
    return log_v + jnp.sum(log_rest - 0.5 * math.log(2 * math.pi), -1)


TARGETS = {"banana2": (banana, 2), "mix5": (mixture5, 5), "funnel4": (funnel4, 4)}


def compare_schedules(args, example):
    """Mean ESS of the path-gradient fits with a constant and two cosine-decayed rates."""
    schedules = {
        "constant": lambda steps: optax.adam(1e-3),
        "cosine-to-10%": lambda steps: optax.adam(optax.cosine_decay_schedule(1e-3, steps, 0.1)),
        "cosine-to-1%": lambda steps: None,  # fit_variational's default optimizer
    }
    ess = {name: [] for name in schedules}
    with _util.jsonl_rows("variational_schedule", vars(args)) as emit:
        for seed in args.seeds:
            for name, (target, dim) in TARGETS.items():
                for label, make in schedules.items():
                    flow = example.invnet_flow(dim, 6, (64, 64), seed)
                    t0 = time.perf_counter()
                    invnet.fit_variational(flow, target, steps=args.steps, batch_size=256,
                                           learning_rate=1e-3, optimizer=make(args.steps),
                                           key=seed, progress=False)  # fmt: skip
                    est = invnet.importance_estimate(flow, target, seed + 100, n=20_000)
                    ess[label].append(est["ess"])
                    emit({"target": name, "schedule": label, "seed": seed, "ess": est["ess"],
                          "log_z": est["log_z"], "seconds": time.perf_counter() - t0,
                          "steps": args.steps})  # fmt: skip
    for label, values in ess.items():
        print(f"{label:14s}: mean ESS {np.mean(values):.3f}, lowest {np.min(values):.3f} "
              f"over {len(values)} fits")  # fmt: skip


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--compare", choices=["gradient", "schedule"], default="gradient")
    args = parser.parse_args(argv)
    example = _example()
    if args.compare == "schedule":
        return compare_schedules(args, example)
    env = _util.env_info("cpu" if jax.default_backend() == "cpu" else jax.default_backend())
    out = RESULTS / f"variational_gradient_{env['backend']}.jsonl"
    rows = []
    for seed in args.seeds:
        for name, (target, dim) in TARGETS.items():
            for gradient in ("total", "path"):
                flow = example.invnet_flow(dim, 6, (64, 64), seed)
                t0 = time.perf_counter()
                invnet.fit_variational(flow, target, steps=args.steps, batch_size=256,
                                       learning_rate=1e-3, key=seed, gradient=gradient,
                                       progress=False)  # fmt: skip
                seconds = time.perf_counter() - t0
                est = invnet.importance_estimate(flow, target, seed + 100, n=20_000)
                row = {"target": name, "gradient": gradient, "seed": seed, "ess": est["ess"],
                       "log_z": est["log_z"], "seconds": seconds, "steps": args.steps}  # fmt: skip
                rows.append(row)
                print(json.dumps(row), flush=True)
    RESULTS.mkdir(exist_ok=True)
    with out.open("w") as fh:
        fh.write(json.dumps({"env": env}) + "\n")
        fh.writelines(json.dumps(r) + "\n" for r in rows)
    for gradient in ("total", "path"):
        ess = [r["ess"] for r in rows if r["gradient"] == gradient]
        print(f"{gradient:5s}: mean ESS {np.mean(ess):.3f} over {len(ess)} fits")
    wins = sum(
        p["ess"] > t["ess"]
        for p in rows if p["gradient"] == "path"
        for t in rows
        if t["gradient"] == "total" and (t["target"], t["seed"]) == (p["target"], p["seed"])
    )  # fmt: skip
    print(f"path ahead in {wins} of {len(rows) // 2} fits; rows in {out}")


if __name__ == "__main__":
    main()
