"""03 - Reconstruct the input: exact inverse versus gradient descent on x.

The question: "I reconstruct the input by gradient descent on x until the output matches."
That works, slowly and approximately. With a bijective model the exact inverse is one pass
with the same cost as the forward. This script times both on the same model and outputs
and prints a table of error and time; the PNG plots error against time.

Run: python examples/03_exact_vs_gradient_descent.py [--quick] [--out out/]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import invnet


def build_model(dim: int, seed: int = 0) -> invnet.Sequential:
    """A 6-layer model, parameters moved off their identity init (as after training)."""
    rngs = nnx.Rngs(seed)
    model = invnet.Sequential(
        invnet.LULinear(dim, rngs=rngs),
        invnet.LeakyReLU(0.5),
        invnet.AffineCoupling(dim, hidden=(64, 64), rngs=rngs),
        invnet.Permute(dim, rngs=rngs),
        invnet.AffineCoupling(dim, hidden=(64, 64), rngs=rngs),
        invnet.LULinear(dim, rngs=rngs),
    )
    params = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    moved = [p + 0.05 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys, strict=True)]
    nnx.update(model, jax.tree.unflatten(treedef, moved))
    return model


def timed(fn, *args, repeats: int = 3):
    """(result, seconds per call) after one compile-and-warm-up call."""
    jax.block_until_ready(fn(*args))
    t0 = time.perf_counter()
    for _ in range(repeats):
        out = jax.block_until_ready(fn(*args))
    return out, (time.perf_counter() - t0) / repeats


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few seconds (for tests)")
    parser.add_argument("--out", default="out", help="folder for the PNG (default out/)")
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--batch", type=int, default=256)
    args = parser.parse_args(argv)

    model = build_model(args.dim)
    graphdef, state = nnx.split(model)
    x = jax.random.normal(jax.random.key(0), (args.batch, args.dim))
    y = jax.jit(lambda s, v: nnx.merge(graphdef, s)(v))(state, x)

    def rel_error(x_hat):
        return float(jnp.linalg.norm(x_hat - x) / jnp.linalg.norm(x))

    forward = jax.jit(lambda s, v: nnx.merge(graphdef, s)(v))
    _, t_forward = timed(forward, state, x, repeats=20)
    inverse = jax.jit(lambda s, v: nnx.merge(graphdef, s).inverse(v)[0])
    x_exact, t_exact = timed(inverse, state, y, repeats=20)
    rows = [("exact inverse", 1, t_exact, rel_error(x_exact))]

    tx = optax.adam(0.05)

    def descend(s, target, steps):
        def loss(v):
            return jnp.mean((nnx.merge(graphdef, s)(v) - target) ** 2)

        def step(_, carry):
            v, opt_state = carry
            updates, opt_state = tx.update(jax.grad(loss)(v), opt_state, v)
            return optax.apply_updates(v, updates), opt_state

        v0 = jnp.zeros_like(target)
        return jax.lax.fori_loop(0, steps, step, (v0, tx.init(v0)))[0]

    descend_jit = jax.jit(descend, static_argnums=2)
    for steps in (10, 100) if args.quick else (10, 100, 1000, 5000):
        x_gd, t_gd = timed(descend_jit, state, y, steps, repeats=1 if steps >= 1000 else 3)
        rows.append(("gradient descent (Adam)", steps, t_gd, rel_error(x_gd)))

    print(f"Reconstruct x from y = f(x): {len(model)}-layer model, D={args.dim}, "
          f"batch={args.batch}, float32, device={jax.devices()[0].platform}")  # fmt: skip
    print()
    print(f"  {'method':<26} {'passes':>7} {'time (ms)':>10} {'|x_hat - x| / |x|':>18}")
    for name, passes, seconds, err in rows:
        print(f"  {name:<26} {passes:>7} {seconds * 1e3:>10.2f} {err:>18.2e}")
    print(f"  (one forward pass, for scale: {t_forward * 1e3:.2f} ms)")
    print()
    best_gd = min(rows[1:], key=lambda r: r[3])
    print(f"  most accurate gradient descent: {best_gd[1]} steps, {best_gd[3]:.1e} in "
          f"{best_gd[2] * 1e3:.0f} ms; the exact inverse: {rows[0][3]:.1e} in "
          f"{t_exact * 1e3:.1f} ms, with no step size or step count to tune")  # fmt: skip

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    gd = np.array([(r[2] * 1e3, r[3]) for r in rows[1:]])
    ax.loglog(gd[:, 0], gd[:, 1], "o-", label="gradient descent on x (10 ... steps)")
    for (t_ms, err), r in zip(gd, rows[1:], strict=True):
        ax.annotate(f"{r[1]}", (t_ms, err), textcoords="offset points", xytext=(4, 4))
    ax.loglog([t_exact * 1e3], [max(rows[0][3], 1e-9)], "*", ms=14, label="exact inverse")
    ax.set_xlabel("time (ms)")
    ax.set_ylabel("relative error of x")
    ax.set_title("Reconstructing the input", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / "03_exact_vs_gradient_descent.png", dpi=80)
    plt.close(fig)
    print(f"picture: {out / '03_exact_vs_gradient_descent.png'}")
    return {"exact_error": rows[0][3], "gd_errors": {r[1]: r[3] for r in rows[1:]}}


if __name__ == "__main__":
    main()
