"""Command line: ``invnet demo``, ``invnet verify``."""

from __future__ import annotations

import argparse
import sys
import time

from invnet import verify_cli


def _demo(args: argparse.Namespace) -> int:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    import invnet

    dim, batch = args.dim, args.batch
    rngs = nnx.Rngs(args.seed)
    model = invnet.Sequential(
        invnet.LULinear(dim, rngs=rngs),
        invnet.LeakyReLU(0.2),
        invnet.AffineCoupling(dim, hidden=(64, 64), rngs=rngs),
        invnet.Permute(dim, rngs=rngs),
        invnet.AffineCoupling(dim, hidden=(64, 64), rngs=rngs),
        invnet.LULinear(dim, rngs=rngs),
    )
    # move the couplings away from their identity init so the demo shows real work
    params = nnx.state(model, nnx.Param)
    keys = iter(jax.random.split(jax.random.key(args.seed + 1), len(jax.tree.leaves(params))))
    nnx.update(
        model, jax.tree.map(lambda p: p + 0.1 * jax.random.normal(next(keys), p.shape), params)
    )

    graphdef, state = nnx.split(model)
    fwd = jax.jit(lambda s, x: nnx.merge(graphdef, s).forward(x))
    inv = jax.jit(lambda s, y: nnx.merge(graphdef, s).inverse(y))
    x = jax.random.normal(jax.random.key(args.seed + 2), (batch, dim), jnp.float32)

    def timed(fn, *a):
        jax.block_until_ready(fn(*a))  # compile
        t0 = time.perf_counter()
        for _ in range(args.repeats):
            out = jax.block_until_ready(fn(*a))
        return out, (time.perf_counter() - t0) / args.repeats * 1e3

    (y, log_det), t_fwd = timed(fwd, state, x)
    (x_back, inv_log_det), t_inv = timed(inv, state, y)
    err = float(jnp.max(jnp.abs(x_back - x)))
    rel = err / float(jnp.max(jnp.abs(x)))
    ld_err = float(jnp.max(jnp.abs(log_det + inv_log_det)))
    print(
        f"invnet demo: {len(model)} bijective layers, D={dim}, batch={batch}, float32, "
        f"precision=highest, device={jax.devices()[0].platform}"
    )
    print()
    rows = [
        ("forward  x -> y (jit)", f"{t_fwd:.3f} ms"),
        ("inverse  y -> x (jit)", f"{t_inv:.3f} ms"),
        ("inverse / forward time", f"{t_inv / t_fwd:.2f}x"),
        ("max |x - inverse(forward(x))|", f"{err:.2e}"),
        ("relative round-trip error", f"{rel:.2e}"),
        ("max |log_det + inverse log_det|", f"{ld_err:.2e}"),
        ("mean log|det dy/dx|", f"{float(jnp.mean(log_det)):.4f}"),
    ]
    width = max(len(r[0]) for r in rows)
    for name, value in rows:
        print(f"  {name:<{width}}  {value:>12}")
    ok = bool(np.isfinite(rel)) and rel < 1e-4
    print()
    print("round trip OK" if ok else "round trip FAILED")
    return 0 if ok else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="invnet", description="Invertible neural networks")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="build a model, run it forward and backward, report")
    demo.add_argument("--dim", type=int, default=16)
    demo.add_argument("--batch", type=int, default=1024)
    demo.add_argument("--repeats", type=int, default=20)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_demo)
    verify_cli.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
