"""Reversible backprop vs ordinary backprop: activation memory and step time vs depth.

Model: ``Sequential(*[Sequential(AffineCoupling(D, hidden=(H, H)), Permute(D))] * depth)``
trained on a density loss ``mean(0.5 |y|^2 - log_det)``. One step is the jitted
loss-and-gradient with respect to all parameters. Memory is XLA's compiled memory analysis:
``jax.jit(step).lower(...).compile().memory_analysis().temp_size_in_bytes`` (the scratch
memory the step needs beyond its arguments and outputs: activations kept for backprop).

    python benchmarks/reversible_memory.py --depths 4 8 16 32 64
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _util  # noqa: E402

import invnet  # noqa: E402


def _model(depth: int, dim: int, hidden: int):
    rngs = nnx.Rngs(0)
    blocks = [
        invnet.Sequential(
            invnet.AffineCoupling(dim, hidden=(hidden, hidden), rngs=rngs),
            invnet.Permute(dim, rngs=rngs),
        )
        for _ in range(depth)
    ]
    return _util.perturb(invnet.Sequential(*blocks), 0.01)


def _step(module):
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)

    def loss(params, rest, x):
        y, log_det = nnx.merge(graphdef, params, rest).forward(x)
        return jnp.mean(0.5 * jnp.sum(y**2, axis=-1) - log_det)

    return jax.jit(jax.value_and_grad(loss)), (params, rest)


def measure(depths, dim: int = 32, hidden: int = 128, batch: int = 512, repeats: int = 5):
    rows = []
    x = _util.data(batch, dim)
    for depth in depths:
        model = _model(depth, dim, hidden)
        row = {"depth": depth, "dim": dim, "hidden": hidden, "batch": batch}
        steps = {}
        variants = (
            ("ordinary", model),
            ("reversible", invnet.reversible(model)),
            ("reversible_scan", invnet.reversible(model, scan=True)),
        )
        for name, module in variants:
            step, (params, rest) = _step(module)
            t0 = time.perf_counter()
            compiled = step.lower(params, rest, x).compile()
            row[f"{name}_compile_s"] = time.perf_counter() - t0
            row[f"{name}_temp_bytes"] = int(compiled.memory_analysis().temp_size_in_bytes)
            steps[name] = (compiled, (params, rest, x))
        grads = {name: jax.tree.leaves(f(*a)[1]) for name, (f, a) in steps.items()}
        for name in ("reversible", "reversible_scan"):
            row[f"{name}_grad_rel_diff"] = max(
                _util.rel_err(b, a) for a, b in zip(grads["ordinary"], grads[name], strict=True)
            )
        times = _util.timeit_many(list(steps.values()), repeats=repeats)
        for name, t in zip(steps, times, strict=True):
            row[f"{name}_step_ms"] = t * 1e3
        row["step_time_ratio"] = times[1] / times[0]
        rows.append(row)
    base = rows[0]
    for row in rows:
        for name in ("ordinary", "reversible", "reversible_scan"):
            row[f"{name}_temp_vs_first"] = row[f"{name}_temp_bytes"] / max(
                base[f"{name}_temp_bytes"], 1
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description="reversible vs ordinary backprop")
    parser.add_argument("--depths", type=int, nargs="+", default=[4, 8, 16, 32, 64])
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--batch", type=int, default=512)
    args = parser.parse_args()
    for row in measure(args.depths, args.dim, args.hidden, args.batch):
        print(json.dumps(row))


if __name__ == "__main__":
    main()
