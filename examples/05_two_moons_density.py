"""05 - A 2-D density: learn two moons, then evaluate p(x) and sample by the inverse.

A flow maps data x to a latent z = f(x) that should look standard normal; then
``log p(x) = log N(f(x); 0, I) + log|det df/dx|`` is exact, and samples are
``f^{-1}(z)`` with ``z ~ N(0, I)``. Trained by maximum likelihood with `invnet.fit`
(validation split, early stopping). Writes the density and samples to
OUT/05_two_moons_density.png.

Run: python examples/05_two_moons_density.py [--quick] [--out out/]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from sklearn.datasets import make_moons

import invnet


def build_flow(blocks: int, hidden: int, seed: int = 0) -> invnet.Flow:
    """ActNorm, then blocks of (LULinear, affine coupling): the LULinear mixes the features."""
    rngs = nnx.Rngs(seed)
    layers: list[invnet.Bijector] = [invnet.ActNorm(2)]
    for _ in range(blocks):
        layers += [
            invnet.LULinear(2, rngs=rngs),
            invnet.AffineCoupling(2, hidden=(hidden, hidden), rngs=rngs),
        ]
    return invnet.Flow(invnet.Sequential(*layers))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few seconds (for tests)")
    parser.add_argument("--out", default="out", help="folder for the PNG (default out/)")
    args = parser.parse_args(argv)

    x, _ = make_moons(3000, noise=0.06, random_state=0)
    x = x.astype(np.float32)
    blocks, hidden, epochs = (3, 32, 10) if args.quick else (8, 64, 300)
    flow = build_flow(blocks, hidden)
    steps = epochs * int(0.8 * len(x)) // 256
    history = invnet.fit(
        flow,
        x,
        validation=0.2,
        epochs=epochs,
        batch_size=256,
        optimizer=optax.adam(optax.cosine_decay_schedule(3e-3, max(steps, 1), alpha=0.05)),
        early_stopping=40,
        progress=not args.quick,
    )
    print(
        f"flow: {len(flow.bijector)} layers, {history.epochs} epochs ({history.stop_reason}), "
        f"best validation NLL {history.best_loss:.3f} nats at epoch {history.best_epoch}"
    )

    graphdef, state = nnx.split(flow)
    log_prob = jax.jit(lambda s, v: nnx.merge(graphdef, s).log_prob(v))
    sample = jax.jit(lambda s, key: nnx.merge(graphdef, s).sample(key, 3000))
    samples = np.asarray(sample(state, jax.random.key(1)))
    g0, g1 = np.linspace(-1.6, 2.6, 200), np.linspace(-1.1, 1.6, 140)
    grid = np.stack(np.meshgrid(g0, g1), -1).reshape(-1, 2).astype(np.float32)
    density = np.exp(np.asarray(log_prob(state, jnp.asarray(grid)))).reshape(140, 200)
    cell = (g0[1] - g0[0]) * (g1[1] - g1[0])
    mass = float(density.sum() * cell)  # probability mass inside the plotted window
    print(f"density integrates to {mass:.3f} over the plotted window (1 = all of it)")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4), sharex=True, sharey=True)
    axes[0].scatter(x[:, 0], x[:, 1], s=1, alpha=0.4)
    axes[0].set_title("training data")
    axes[1].imshow(density, origin="lower", extent=(g0[0], g0[-1], g1[0], g1[-1]), cmap="magma")
    axes[1].set_title(f"p(x) (mass in view {mass:.2f})")
    axes[2].scatter(samples[:, 0], samples[:, 1], s=1, alpha=0.4, color="C2")
    axes[2].set_title("samples f⁻¹(z), z ~ N(0, I)")
    for ax in axes:
        ax.set_aspect("equal")
    axes[0].set_xlim(g0[0], g0[-1])
    axes[0].set_ylim(g1[0], g1[-1])
    fig.tight_layout()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / "05_two_moons_density.png", dpi=80)
    plt.close(fig)
    print(f"picture: {out / '05_two_moons_density.png'}")
    return {"best_val_nll": history.best_loss, "mass_in_view": mass}


if __name__ == "__main__":
    main()
