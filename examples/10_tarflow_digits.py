"""10 - A TarFlow (transformer autoregressive flow) on 8x8 digits, beside a Glow.

scikit-learn's bundled 8x8 digits (17 grey levels, no download), dequantised with uniform
noise and standardised, as (8, 8, 1) images, exactly as example 06. Two flows of similar
parameter count, trained the same way (adam 1e-3, same epochs and batch): `invnet.tarflow`
(2x2 patches -> 16 tokens, causal transformer blocks, token order reversed between blocks)
and `invnet.glow`. Held-out bits/dim of the discrete pixels with `invnet.bits_per_dim`; the
trivial baseline (uniform over 17 levels) is log2(17) = 4.09.

The TarFlow can train on noisier inputs (``--noise-std``, `invnet.NoisyMaximumLikelihood`;
default 0 here: the held-out bits/dim are measured on uniformly dequantised pixels, as for
the Glow) and its samples are shown raw and after one score step (`invnet.tarflow_denoise`
with sigma = the noise the flow saw: the dequantisation's std plus ``--noise-std``).
Then the TarFlow's inverse (the sampler) is timed sequential vs jacobi on 256 latents.

Writes OUT/10_tarflow_digits.png; ``--save PATH`` keeps the trained TarFlow (for
benchmarks/tarflow.py --model PATH).

Run: python examples/10_tarflow_digits.py [--quick] [--out out/] [--save tarflow.invnet]
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import jax
import numpy as np
import optax
from flax import nnx
from sklearn.datasets import load_digits

import invnet

MEAN, STD, LEVELS = 0.5, 0.35, 17
DEQUANT_STD = 1.0 / (LEVELS * STD * math.sqrt(12.0))  # uniform noise, in the flows' units


def n_params(model) -> int:
    return sum(int(np.size(p)) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))


def bits_per_dim(flow, pixels, seed: int) -> float:
    """The flows see x = ((pixels + u) / LEVELS - MEAN) / STD: scale and offset say so."""
    scale = 1.0 / (LEVELS * STD)
    bpd = invnet.bits_per_dim(flow, pixels, key=seed, scale=scale, offset=-MEAN / STD,
                              levels=LEVELS)  # fmt: skip
    return float(bpd.mean())


def set_inverse(flow, method: str, tol: float = 0.0) -> None:
    for node in invnet.core.nodes(flow):
        if isinstance(node, invnet.TransformerAutoregressive):
            node.inverse_method, node.tol = method, tol


def time_inverse(flow, z, method: str, tol: float, repeats: int) -> tuple[float, np.ndarray]:
    set_inverse(flow, method, tol)
    x = flow.inverse(z)[0].block_until_ready()  # compile
    t = time.perf_counter()
    for _ in range(repeats):
        x = flow.inverse(z)[0].block_until_ready()
    return (time.perf_counter() - t) / repeats, np.asarray(x)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few seconds (for tests)")
    parser.add_argument("--out", default="out", help="folder for the PNG (default out/)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=None, help="default 4 quick, 40 full")
    parser.add_argument("--noise-std", type=float, default=0.0)
    parser.add_argument("--save", default=None, help="save the trained TarFlow here")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    digits = load_digits()
    order = np.random.default_rng(args.seed).permutation(len(digits.data))
    train, test = order[:1500], order[1500:]
    pixels = digits.data[train].reshape(-1, 8, 8, 1)
    x_train = (np.asarray(invnet.dequantize(args.seed, pixels, levels=LEVELS)) / LEVELS
               - MEAN) / STD  # fmt: skip
    epochs = args.epochs or (4 if args.quick else 40)
    if args.quick:
        tar_cfg, glow_cfg = dict(blocks=2, depth=1, width=16, heads=2), dict(steps=2, hidden=16)
    else:
        tar_cfg, glow_cfg = dict(blocks=4, depth=1, width=32, heads=4), dict(steps=4, hidden=48)
    rngs = nnx.Rngs(args.seed)
    flows = {
        "tarflow": invnet.tarflow((8, 8, 1), patch=2, **tar_cfg, rngs=rngs),
        "glow": invnet.glow((8, 8, 1), levels=2, **glow_cfg, rngs=nnx.Rngs(args.seed)),
    }
    objectives = {"tarflow": invnet.NoisyMaximumLikelihood(args.noise_std), "glow": None}
    results = {"epochs": epochs}
    for name, flow in flows.items():
        t = time.perf_counter()
        invnet.fit(flow, x_train, epochs=epochs, batch_size=100, optimizer=optax.adam(1e-3),
                   objective=objectives[name], key=args.seed, progress=False)  # fmt: skip
        secs = time.perf_counter() - t
        results[f"{name}_bpd"] = bits_per_dim(flow, digits.data[test].reshape(-1, 8, 8, 1),
                                              args.seed)  # fmt: skip
        results[f"{name}_params"], results[f"{name}_seconds"] = n_params(flow), secs
        print(f"  {name:8} {n_params(flow):>8} params  held-out {results[f'{name}_bpd']:.3f} "
              f"bits/dim  (training {secs:.1f} s)")  # fmt: skip
    results["uniform_bpd"] = float(np.log2(LEVELS))
    print(f"  uniform baseline {results['uniform_bpd']:.3f} bits/dim; {epochs} epochs, batch "
          "100, adam 1e-3 for both")  # fmt: skip

    tar = flows["tarflow"]
    z = jax.random.normal(jax.random.key(1), (256, 8, 8, 1))
    repeats = 1 if args.quick else 5
    seq_s, x_seq = time_inverse(tar, z, "sequential", 0.0, repeats)
    jac_s, x_jac = time_inverse(tar, z, "jacobi", 1e-5, repeats)
    set_inverse(tar, "sequential")
    results.update(inverse_sequential_s=seq_s, inverse_jacobi_s=jac_s,
                   jacobi_vs_sequential=float(np.nanmax(np.abs(x_jac - x_seq))))  # fmt: skip
    print(f"  TarFlow inverse of 256 latents: sequential {1e3 * seq_s:.1f} ms, jacobi "
          f"(tol 1e-5) {1e3 * jac_s:.1f} ms; max |difference| "
          f"{results['jacobi_vs_sequential']:.1e}")  # fmt: skip
    if args.save:
        invnet.save(tar, args.save)

    sigma = math.hypot(DEQUANT_STD, args.noise_std)
    rows = [
        ("Glow", np.asarray(flows["glow"].sample(jax.random.key(0), 10))),
        ("TarFlow", np.asarray(tar.sample(jax.random.key(0), 10))),
        (
            "denoised",
            np.asarray(invnet.tarflow_denoise(tar, tar.sample(jax.random.key(0), 10), sigma)),
        ),  # fmt: skip
        ("T=0.7", np.asarray(tar.sample(jax.random.key(2), 10, temperature=0.7))),
    ]
    _picture(rows, results, Path(args.out))
    print(f"picture: {Path(args.out) / '10_tarflow_digits.png'}  "
          f"({time.perf_counter() - t0:.1f} s)")  # fmt: skip
    return results


def _picture(rows, results, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(rows), 10, figsize=(8, 0.85 * len(rows)))
    for r, (label, imgs) in enumerate(rows):
        for c in range(10):
            ax = axes[r, c]
            ax.imshow(np.clip(imgs[c].reshape(8, 8) * STD + MEAN, 0, 1), cmap="gray_r",
                      vmin=0, vmax=1)  # fmt: skip
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
    fig.suptitle(f"8x8 digits, held out: TarFlow {results['tarflow_bpd']:.2f}, Glow "
                 f"{results['glow_bpd']:.2f} bits/dim", fontsize=9)  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / "10_tarflow_digits.png", dpi=80, bbox_inches="tight")
    plt.close(fig)


if __name__ == "__main__":
    main()
