"""09 - A Glow on natural-image patches: bits/dim beside a flat coupling flow, samples.

Random 8x8 colour patches (256 levels) of the two photographs that scikit-learn ships
(`sklearn.datasets.load_sample_images`, no download). Patches for training come from the
left 3/4 of each photograph, held-out patches from the right quarter, so no held-out pixel
was seen in training. Both flows see ((pixels + u) / 256 - MEAN) / STD with u ~ U[0, 1),
and are trained the same way (adam, same steps and batch): `invnet.glow` (squeeze,
ActNorm, Conv1x1, conv couplings, factor-out) and a flat flow (AffineCoupling + Permute on
192-D vectors) of similar parameter count. Held-out bits/dim of the discrete pixels with
`invnet.bits_per_dim`; the trivial baseline (uniform over 256 levels) is 8.

Writes real patches and samples at temperatures 1.0 and 0.7 to OUT/09_glow_patches.png.

Run: python examples/09_glow_patches.py [--quick] [--out out/]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax
import numpy as np
import optax
from flax import nnx
from sklearn.datasets import load_sample_images

import invnet

LEVELS, P = 256, 8  # 8-bit pixels, 8x8 patches
SHAPE = (P, P, 3)
DIM = P * P * 3


def patches(rng: np.random.Generator, n: int, held_out: bool) -> np.ndarray:
    """``n`` random PxP patches (integers 0..255), from the left 3/4 or the right 1/4."""
    out = []
    for i, image in enumerate(load_sample_images().images):
        h, w, _ = image.shape
        edge = (3 * w) // 4
        lo, hi = (edge, w - P) if held_out else (0, edge - P)
        rows = rng.integers(0, h - P + 1, n // 2 + (i == 0) * (n % 2))
        cols = rng.integers(lo, hi + 1, rows.size)
        out += [image[r : r + P, c : c + P] for r, c in zip(rows, cols, strict=True)]
    return np.stack(out).astype(np.float64)


def n_params(model) -> int:
    return sum(int(np.size(p)) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))


def flat_flow(blocks: int, hidden: int, seed: int) -> invnet.Flow:
    rngs = nnx.Rngs(seed)
    layers = []
    for i in range(blocks):
        if i:
            layers.append(invnet.Permute(DIM, rngs=rngs))
        layers.append(invnet.AffineCoupling(DIM, hidden=(hidden, hidden), rngs=rngs))
    return invnet.Flow(invnet.Sequential(*layers))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few seconds (for tests)")
    parser.add_argument("--out", default="out", help="folder for the PNG (default out/)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    rng = np.random.default_rng(args.seed)
    n_train, n_test, epochs, steps, hidden, flat_hidden, blocks = (
        (1000, 200, 3, 1, 16, 16, 4) if args.quick else (8000, 1000, 8, 3, 32, 32, 6)
    )
    train, test = patches(rng, n_train, False), patches(rng, n_test, True)
    u = np.asarray(invnet.dequantize(args.seed, train, levels=LEVELS)) / LEVELS
    mean, std = float(u.mean()), float(u.std())
    x_train = (u - mean) / std
    glow = invnet.glow(SHAPE, levels=2, steps=steps, hidden=hidden, rngs=nnx.Rngs(args.seed))
    flat = flat_flow(blocks, flat_hidden, args.seed)
    results = {"mean": mean, "std": std}
    for name, flow, shape in [("glow", glow, SHAPE), ("flat", flat, (DIM,))]:
        t = time.perf_counter()
        invnet.fit(flow, x_train.reshape(-1, *shape), epochs=epochs, batch_size=100,
                   optimizer=optax.adam(1e-3), key=args.seed, progress=False)  # fmt: skip
        bpd = invnet.bits_per_dim(flow, test.reshape(-1, *shape), key=args.seed,
                                  scale=1.0 / (LEVELS * std), offset=-mean / std,
                                  levels=LEVELS)  # fmt: skip
        results[f"{name}_bpd"] = float(bpd.mean())
        results[f"{name}_params"] = n_params(flow)
        bpd, size, secs = results[f"{name}_bpd"], results[f"{name}_params"], time.perf_counter() - t
        print(f"  {name:5} {size:>8} params  held-out {bpd:.3f} bits/dim  ({secs:.1f} s)")
    results["uniform_bpd"] = float(np.log2(LEVELS))
    print(f"  uniform baseline {results['uniform_bpd']:.3f} bits/dim; {len(train)} training "
          f"patches, {epochs} epochs, batch 100, adam 1e-3 for both")  # fmt: skip

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [("held out", test[:10] / LEVELS)]
    for r, temp in enumerate([1.0, 1.0, 0.7]):
        x = np.asarray(glow.sample(jax.random.key(r), 10, temperature=temp))
        rows.append((f"T={temp}", x * std + mean))
    fig, axes = plt.subplots(len(rows), 10, figsize=(8, 0.85 * len(rows)))
    for r, (label, imgs) in enumerate(rows):
        for c in range(10):
            ax = axes[r, c]
            ax.imshow(np.clip(imgs[c].reshape(SHAPE), 0, 1), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
    fig.suptitle(f"Glow on 8x8 photo patches ({results['glow_bpd']:.2f} bits/dim held out, "
                 f"flat flow {results['flat_bpd']:.2f})", fontsize=9)  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / "09_glow_patches.png", dpi=80, bbox_inches="tight")
    plt.close(fig)
    print(f"picture: {out / '09_glow_patches.png'}  ({time.perf_counter() - t0:.1f} s)")
    return results


if __name__ == "__main__":
    main()
