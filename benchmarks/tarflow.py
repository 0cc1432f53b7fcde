"""TarFlow inverse: sequential (token by token, key/value cache) vs jacobi (parallel sweeps).

The digits model of examples/10_tarflow_digits.py (``--model PATH`` from its ``--save``;
without it the script trains the same architecture for ``--epochs`` on the 8x8 digits) is
inverted on a batch of latents ``z = f(x)`` of held-out digits, once per method, each as
one jitted call (median of interleaved repeats, `_util.timeit_many`). For each: seconds,
speed-up over sequential, the round-trip error ``max |f^-1(f(x)) - x| / max |x|``, the
sweeps the jacobi blocks used (mean / max over samples, summed over blocks) and the
unconverged samples (must be 0: those would be NaN).

Run: python benchmarks/tarflow.py [--model tarflow.invnet] [--batch 256] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from _util import env_info, timeit_many
from flax import nnx

import invnet

MEAN, STD, LEVELS = 0.5, 0.35, 17


def digits(seed: int = 0) -> np.ndarray:
    from sklearn.datasets import load_digits

    pixels = load_digits().data.reshape(-1, 8, 8, 1)
    order = np.random.default_rng(seed).permutation(len(pixels))
    x = (np.asarray(invnet.dequantize(seed, pixels[order], levels=LEVELS)) / LEVELS - MEAN) / STD
    return x.astype(np.float32)


def build(args, x_train) -> invnet.Flow:
    if args.model:
        return invnet.load(args.model)
    import optax

    flow = invnet.tarflow((8, 8, 1), patch=2, blocks=4, depth=1, width=32, heads=4,
                          rngs=nnx.Rngs(0))  # fmt: skip
    invnet.fit(flow, x_train, epochs=args.epochs, batch_size=100, optimizer=optax.adam(1e-3),
               progress=False)  # fmt: skip
    return flow


def blocks(flow):
    return [n for n in invnet.core.nodes(flow) if isinstance(n, invnet.TransformerAutoregressive)]


def inverse_fn(flow, method: str, tol: float):
    for b in blocks(flow):
        b.inverse_method, b.tol, b.max_sweeps = method, tol, None
    graphdef, state = nnx.split(flow)
    return jax.jit(lambda s, z: nnx.merge(graphdef, s).inverse(z)[0]), state


def sweeps_used(flow, z, method: str, tol: float) -> tuple[float, int, int]:
    """Per sample, the sweeps of all blocks summed: mean, max; unconverged samples."""
    total, bad = jnp.zeros(z.shape[0], jnp.int32), jnp.zeros(z.shape[0], bool)
    for b in reversed(blocks(flow)):
        z, _, cert = b.inverse_with_certificate(z, method=method, tol=tol)
        total, bad = total + cert.sweeps, bad | ~cert.converged
    return float(total.mean()), int(total.max()), int(bad.sum())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a saved TarFlow (examples/10 --save)")
    parser.add_argument("--epochs", type=int, default=30, help="training without --model")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--tols", default="0,1e-6,1e-5,1e-4", help="jacobi tolerances")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args(argv)
    x_all = digits(0)
    flow = build(args, x_all[:1500])
    x = jnp.asarray(x_all[1500 : 1500 + args.batch])
    z = flow.forward(x)[0]
    methods = [("sequential", 0.0)] + [("jacobi", float(t)) for t in args.tols.split(",")]
    fns = [inverse_fn(flow, m, t) for m, t in methods]
    outs = []
    for (m, t), (fn, state) in zip(methods, fns, strict=True):  # settings live in each graphdef
        outs.append((np.asarray(fn(state, z)), sweeps_used(flow, z, m, t)))
    times = timeit_many([(fn, (state, z)) for fn, state in fns], repeats=args.repeats)
    scale = float(jnp.max(jnp.abs(x)))
    rows = []
    for (m, t), secs, (x_back, (mean_s, max_s, bad)) in zip(methods, times, outs, strict=True):
        err = float(np.nanmax(np.abs(x_back - np.asarray(x)))) / scale
        rows.append(dict(method=m, tol=t, seconds=secs, speedup=times[0] / secs,
                         roundtrip_rel=err, sweeps_mean=mean_s, sweeps_max=max_s,
                         unconverged=bad))  # fmt: skip
    tokens = sum(b.n_tokens() for b in blocks(flow))
    print(f"TarFlow inverse, batch {args.batch}, {len(blocks(flow))} blocks x "
          f"{blocks(flow)[0].n_tokens()} tokens ({tokens} sequential steps), float32, "
          f"{jax.devices()[0].platform}")  # fmt: skip
    print("| method | tol | ms | speed-up | round trip (rel) | sweeps mean / max | unconverged |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['tol']:g} | {1e3 * r['seconds']:.1f} | {r['speedup']:.2f}x"
              f" | {r['roundtrip_rel']:.1e} | {r['sweeps_mean']:.1f} / {r['sweeps_max']} | "
              f"{r['unconverged']} |")  # fmt: skip
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"env": env_info(jax.devices()[0].platform), "rows": rows,
                       "time": time.strftime("%Y-%m-%d %H:%M")}, fh, indent=1)  # fmt: skip
    return rows


if __name__ == "__main__":
    main()
