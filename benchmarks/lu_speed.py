"""LU layers: the default inverse against the forward, `invnet.freeze` time at large D, and
the accuracy of the prepared inverse.

    python benchmarks/lu_speed.py --only ratio      # 2 x LULinear(64), batch 4096
    python benchmarks/lu_speed.py --only compile --dim 4096 --layers 4
    python benchmarks/lu_speed.py --only accuracy --dims 64 512

* ``ratio``: ``model.forward(x)``, ``model.inverse(y)`` and ``invnet.freeze(model)``'s
  inverse, each call ended by ``block_until_ready``, timed one after another round by round
  (so load drift hits them alike); prints the median and quartiles of each and the medians'
  ratio inverse / forward.
* ``compile``: seconds for ``invnet.freeze`` of a stack of ``LULinear(dim)`` (float32) and
  its first forward and inverse (batch 256; each forms its direction's matrices), then on
  one layer ``prepare`` per direction and, for comparison, the previous way of forming the
  matrices (float64 GEMM for ``W``, two float64 ``scipy.linalg.solve_triangular`` calls for
  ``W^{-1}``).
* ``accuracy``: the round-trip error ``max|x_hat - x| / max|x|`` of the prepared float32
  inverse (``x_hat = (y - b) W^{-T}``, ``y = W x + b`` formed in float64 and rounded to
  float32) for the current `LULinear.prepare` and the previous float64 solves, on a random
  (well-conditioned), an orthogonal-init (ill-conditioned LU factors) and a condition-1e4
  layer; ``floor`` is a float64 solve of the same float32 ``y``.
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg
from flax import nnx

import invnet


def _quartiles(samples) -> str:
    q1, med, q3 = np.percentile(np.asarray(samples) * 1e3, [25, 50, 75])
    return f"median {med:7.3f} ms  (quartiles {q1:.3f} - {q3:.3f})"


def ratio(dim: int = 64, batch: int = 4096, rounds: int = 40) -> None:
    model = invnet.Sequential(
        invnet.LULinear(dim, rngs=nnx.Rngs(0)), invnet.LULinear(dim, rngs=nnx.Rngs(1))
    )
    x = jax.random.normal(jax.random.key(0), (batch, dim), jnp.float32)
    y = model.forward(x)[0]
    fast = invnet.freeze(model)
    calls = {
        "model.forward": lambda: model.forward(x),
        "model.inverse": lambda: model.inverse(y),
        "freeze(model).inverse": lambda: fast.inverse(y),
    }
    for fn in calls.values():  # compile and warm up
        jax.block_until_ready(fn())
        jax.block_until_ready(fn())
    samples = {name: [] for name in calls}
    for _ in range(rounds):
        for name, fn in calls.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            samples[name].append(time.perf_counter() - t0)
    print(f"2 x LULinear({dim}), batch {batch}, float32, {rounds} interleaved rounds")
    for name, s in samples.items():
        print(f"  {name:24s} {_quartiles(s)}")
    med = {k: float(np.median(v)) for k, v in samples.items()}
    print(f"  inverse / forward: {med['model.inverse'] / med['model.forward']:.2f}")


def _previous_prepare(layer):
    """What `LULinear.prepare` did before: a float64 GEMM and two float64 solves."""
    perm, lower, upper = layer._float64_factors()
    solve = scipy.linalg.solve_triangular
    lower_inv = solve(lower, np.eye(layer.dim), lower=True, unit_diagonal=True)
    weight_inv = solve(upper, lower_inv, lower=False, overwrite_b=True)
    return {
        "weight": jnp.asarray((lower @ upper)[perm], layer.param_dtype),
        "weight_inv": jnp.asarray(weight_inv[:, perm], layer.param_dtype),
    }


def compile_time(dim: int = 4096, layers: int = 4, previous: bool = True) -> None:
    t0 = time.perf_counter()
    model = invnet.Sequential(*(invnet.LULinear(dim, rngs=nnx.Rngs(i)) for i in range(layers)))
    jax.block_until_ready(nnx.state(model))
    print(f"{layers} x LULinear({dim}), float32: built in {time.perf_counter() - t0:.1f} s")
    t0 = time.perf_counter()
    fast = invnet.freeze(model)
    print(f"  invnet.freeze: {time.perf_counter() - t0:.1f} s")
    x = jax.random.normal(jax.random.key(0), (256, dim), jnp.float32)
    t0 = time.perf_counter()
    y = jax.block_until_ready(fast.forward(x))[0]
    print(f"  first forward (forms every W): {time.perf_counter() - t0:.1f} s")
    t0 = time.perf_counter()
    jax.block_until_ready(fast.inverse(y))
    print(f"  first inverse (forms every W^-1): {time.perf_counter() - t0:.1f} s")
    layer = model.layers[0]
    for run in (("forward",), ("inverse",)):
        t0 = time.perf_counter()
        jax.block_until_ready(layer.prepare(run=run))
        print(f"  one layer's prepare(run={run}): {time.perf_counter() - t0:.2f} s")
    if previous:
        t0 = time.perf_counter()
        jax.block_until_ready(_previous_prepare(layer))
        print(f"  one layer, previous float64 GEMM + solves: {time.perf_counter() - t0:.2f} s")


def _layer(kind: str, dim: int) -> invnet.LULinear:
    if kind == "cond1e4":
        rng = np.random.default_rng(0)
        q1 = np.linalg.qr(rng.normal(size=(dim, dim)))[0]
        q2 = np.linalg.qr(rng.normal(size=(dim, dim)))[0]
        w = (q1 * np.logspace(0, -4, dim)) @ q2.T
        return invnet.LULinear.from_matrix(w, rng.normal(size=dim) * 0.1, param_dtype=jnp.float32)
    return invnet.LULinear(dim, init=kind, rngs=nnx.Rngs(0))


def accuracy(dims=(64, 512), batch: int = 512) -> None:
    print("round-trip error of the prepared float32 inverse, max|x_hat - x| / max|x|")
    print(f"{'D':>5} {'layer':10} {'cond':>8} {'floor':>8} {'current':>8} {'previous':>8}")
    for dim in dims:
        for kind in ("random", "orthogonal", "cond1e4"):
            layer = _layer(kind, dim)
            perm, lower, upper = layer._float64_factors()
            weight = (lower @ upper)[perm]
            bias = np.asarray(layer._bias(jnp.float32), np.float64)
            x = np.random.default_rng(1).normal(size=(batch, dim))
            y = (x @ weight.T + bias).astype(np.float32)
            floor = np.linalg.solve(weight, (y.astype(np.float64) - bias).T).T
            errs = [np.abs(floor - x).max() / np.abs(x).max()]
            for prepared in (layer.prepare(run=("inverse",)), _previous_prepare(layer)):
                v = jnp.asarray(y) - jnp.asarray(bias, jnp.float32)
                x_hat = jnp.matmul(v, prepared["weight_inv"].T, precision="highest")
                errs.append(np.abs(np.asarray(x_hat, np.float64) - x).max() / np.abs(x).max())
            cond = np.linalg.cond(weight)
            print(f"{dim:5d} {kind:10} {cond:8.2g} " + " ".join(f"{e:8.2g}" for e in errs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("ratio", "compile", "accuracy"), action="append")
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--dim", type=int, default=4096, help="compile: layer width")
    parser.add_argument("--layers", type=int, default=4, help="compile: number of layers")
    parser.add_argument("--no-previous", action="store_true", help="compile: skip the old way")
    parser.add_argument("--dims", type=int, nargs="+", default=[64, 512], help="accuracy")
    args = parser.parse_args()
    parts = args.only or ["ratio", "accuracy"]
    print(f"jax {jax.__version__}, {jax.default_backend()}, load average {os.getloadavg()}")
    if "ratio" in parts:
        ratio(rounds=args.rounds)
    if "compile" in parts:
        compile_time(args.dim, args.layers, previous=not args.no_previous)
    if "accuracy" in parts:
        accuracy(args.dims)


if __name__ == "__main__":
    main()
