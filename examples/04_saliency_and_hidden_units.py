"""04 - Which inputs drive an output, and which exact input shuts a hidden unit off?

The question: "Which input features does a neuron respond to?" Two answers on the 8x8
digits, with a bijective classifier x -> [class scores y, latent z] (trained with
`invnet.InverseProblem`: y supervised, z pushed to a standard normal):

1. saliency: the Jacobian of the top class score with respect to the input pixels,
   from ``jax.jacfwd`` (the Keras users' "gradient of the top score" map);
2. intervention: run the model to the hidden layer after layer k, set one hidden unit to
   0 (shut it off), and invert ``model[:k]``: the exact input that produces that hidden
   state. Every other hidden unit keeps its value, which the script checks.

Writes OUT/04_saliency_and_hidden_units.png.

Run: python examples/04_saliency_and_hidden_units.py [--quick] [--out out/]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from sklearn.datasets import load_digits

import invnet


def build_model(seed: int = 0) -> invnet.Sequential:
    rngs = nnx.Rngs(seed)
    return invnet.Sequential(
        invnet.LULinear(64, rngs=rngs),
        invnet.LeakyReLU(0.2),  # the hidden layer we intervene on is this one's output
        invnet.AffineCoupling(64, hidden=(128, 128), rngs=rngs),
        invnet.Permute(64, rngs=rngs),
        invnet.AffineCoupling(64, hidden=(128, 128), rngs=rngs),
        invnet.LULinear(64, rngs=rngs),
    )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few seconds (for tests)")
    parser.add_argument("--out", default="out", help="folder for the PNG (default out/)")
    parser.add_argument("--layer", type=int, default=2, help="intervene after model[:layer]")
    args = parser.parse_args(argv)

    digits = load_digits()
    pixels = (digits.data / 16.0).astype(np.float32)
    labels = digits.target
    order = np.random.default_rng(0).permutation(len(pixels))
    train, test = order[:1500], order[1500:]
    y = np.eye(10, dtype=np.float32)[labels]

    model = build_model()
    history = invnet.fit(
        model,
        pixels[train],
        y[train],
        objective=invnet.InverseProblem(y_dim=10, y_sigma=0.2),
        epochs=8 if args.quick else 80,
        batch_size=100,
        learning_rate=1e-3,
        progress=not args.quick,
    )
    graphdef, state = nnx.split(model)
    scores = jax.jit(lambda s, v: nnx.merge(graphdef, s)(v)[..., :10])
    accuracy = float(np.mean(np.argmax(scores(state, pixels[test]), -1) == labels[test]))
    print(f"bijective classifier 64 -> [10 scores, 54 latents]: test accuracy {accuracy:.1%} "
          f"(loss {history.train_loss[-1]:.1f})")  # fmt: skip

    examples = pixels[test][:4]
    predicted = np.argmax(scores(state, examples), -1)

    # 1. saliency: d score[c] / d x, from the forward-mode Jacobian (64 x 64 columns)
    def top_score(s, v, c):
        return scores(s, v)[c]

    saliency = np.stack(
        [
            np.asarray(jax.jacfwd(top_score, argnums=1)(state, jnp.asarray(v), int(c)))
            for v, c in zip(examples, predicted, strict=True)
        ]
    )

    # 2. intervention: the exact input whose hidden unit j (after layer k) is 0
    k = args.layer
    head = model[:k]
    head_def, head_state = nnx.split(head)
    to_hidden = jax.jit(lambda s, v: nnx.merge(head_def, s)(v))
    from_hidden = jax.jit(lambda s, h: nnx.merge(head_def, s).inverse(h)[0])
    hidden = np.asarray(to_hidden(head_state, examples))
    units = np.argmax(hidden, -1)  # the most active unit of each example
    shut = hidden.copy()
    shut[np.arange(len(units)), units] = 0.0
    x_shut = np.asarray(from_hidden(head_state, shut))
    check = np.asarray(to_hidden(head_state, x_shut))
    unit_after = float(np.max(np.abs(check[np.arange(len(units)), units])))
    mask = np.ones_like(hidden, bool)
    mask[np.arange(len(units)), units] = False
    others = float(np.max(np.abs((check - hidden)[mask])))
    print(f"after layer {k}: shut off unit {units.tolist()} of the 4 examples; re-running the "
          f"found inputs: |unit| <= {unit_after:.1e}, others move <= {others:.1e}")  # fmt: skip
    new_class = np.argmax(scores(state, x_shut), -1)
    print(f"predicted class before {predicted.tolist()}, after the intervention "
          f"{new_class.tolist()}")  # fmt: skip

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(4, 4, figsize=(7, 7))
    for i in range(4):
        lim = np.abs(saliency[i]).max()
        diff = x_shut[i] - examples[i]
        dlim = np.abs(diff).max()
        panels = [
            (examples[i], "gray_r", 0, 1, f"input (class {predicted[i]})"),
            (saliency[i], "RdBu_r", -lim, lim, f"d score[{predicted[i]}] / dx"),
            (x_shut[i], "gray_r", 0, 1, f"unit {units[i]} off"),
            (diff, "RdBu_r", -dlim, dlim, "change to input"),
        ]
        for j, (img, cmap, lo, hi, title) in enumerate(panels):
            ax = axes[i, j]
            ax.imshow(img.reshape(8, 8), cmap=cmap, vmin=lo, vmax=hi)
            ax.set_title(title, fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / "04_saliency_and_hidden_units.png", dpi=80)
    plt.close(fig)
    print(f"picture: {out / '04_saliency_and_hidden_units.png'}")
    return {"accuracy": accuracy, "unit_after": unit_after, "other_units_change": others}


if __name__ == "__main__":
    main()
