"""08 - An invertible classifier (i-RevNet style) on 8x8 digits: image -> [10 logits, z].

One bijection f of the 64 pixels (flat vector -> (8, 8, 1) image -> Squeeze, ActNorm,
Conv1x1, ConvAffineCoupling steps at 4x4x4 and 2x2x16 -> flat -> LULinear/AffineCoupling
blocks) whose 64 outputs are read as 10 class logits y[:, :10] and a 54-D rest z = y[:, 10:].
Nothing is thrown away, so every image is recovered exactly from its output, and any
[logits, z] has exactly one input that the network maps to it.

Loss (per sample): softmax cross-entropy on the logits plus BETA times the negative
log-likelihood of the image per pixel, -log p(x) / 64 with log p(x) = log N(z; 0, I) +
log N(logits; 0, SIGMA^2 I) + log|det df/dx| (a "hybrid" model, Nalisnick et al. 2019).
Why the prior: cross-entropy alone constrains 10 of the 64 outputs, so z can drift to any
scale and the inverse would then be asked about z's it never saw; the Gaussian term keeps z
near N(0, I), so a test image's z (or a fresh one) is a typical z. The logits need a
(broad, SIGMA = 4) prior too, or the log-det could grow without bound by stretching the
logit directions. BETA is small so classification dominates. The pixels are dequantised
with fresh uniform noise each step inside the objective (its key), which the density term
needs and which is mild augmentation; evaluation uses the level midpoints.

Shown and returned: held-out accuracy; max |f^-1(f(x)) - x| (float32); "the input that the
network maps to class k for a given z": a test image's z kept, its logits replaced by the
mean training logits of class k (`invnet.input_for_hidden` on the output), inverted - the
model itself must then predict k (self-consistency, exact up to rounding), and an RBF SVM
trained on the real pixels (never seeing the network) says how often the inverted images
look like a k to it; and saliency maps d logit[predicted] / d pixels (`invnet.saliency`).

Writes OUT/08_invertible_classifier.png.

Run: python examples/08_invertible_classifier.py [--quick] [--out out/]
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.losses
from flax import nnx
from sklearn.datasets import load_digits
from sklearn.svm import SVC

import invnet

MEAN, STD, LEVELS = 0.5, 0.35, 17
CLASSES, BETA, SIGMA = 10, 0.1, 4.0


def classifier(steps: int, hidden: int, blocks: int, mlp: int, seed: int) -> invnet.Sequential:
    """64 pixels -> 64 outputs: conv flow steps at two scales, then vector blocks."""
    rngs = nnx.Rngs(seed)
    layers = [invnet.Reshape((64,), (8, 8, 1))]
    for channels in (4, 16):
        layers.append(invnet.Squeeze())  # (8, 8, 1) -> (4, 4, 4) -> (2, 2, 16)
        for _ in range(steps):
            layers += [
                invnet.ActNorm(channels, event_ndim=3),
                invnet.Conv1x1(channels, rngs=rngs),
                invnet.ConvAffineCoupling(channels, hidden=hidden, rngs=rngs),
            ]
    layers.append(invnet.Reshape((2, 2, 16), (64,)))
    for _ in range(blocks):
        layers += [
            invnet.ActNorm(64),
            invnet.LULinear(64, rngs=rngs),
            invnet.AffineCoupling(64, hidden=(mlp, mlp), rngs=rngs),
        ]
    layers.append(invnet.LULinear(64, rngs=rngs))  # logits: a learned mix of everything
    return invnet.Sequential(*layers)


def gaussian_nll(v, sigma: float):
    return jnp.sum(0.5 * (v / sigma) ** 2 + math.log(sigma) + 0.5 * math.log(2 * math.pi), -1)


def objective(model, batch, key):
    """Cross-entropy on the logits + BETA * (-log p(x)) per pixel, x freshly dequantised."""
    x = batch["x"] + jax.random.uniform(key, batch["x"].shape, batch["x"].dtype) / (LEVELS * STD)
    out, log_det = model.forward(x)
    logits, z = out[:, :CLASSES], out[:, CLASSES:]
    ce = optax.losses.softmax_cross_entropy_with_integer_labels(logits, batch["y"])
    nll = gaussian_nll(z, 1.0) + gaussian_nll(logits, SIGMA) - log_det
    return jnp.mean(ce + BETA * nll / 64)


def to_model(pixels, offset):
    """Pixels 0..16 (+ offset in [0, 1)) -> the network's input, ((p + u) / 17 - MEAN) / STD."""
    return (((pixels + offset) / LEVELS - MEAN) / STD).astype(np.float32)


def to_unit(x):
    """The network's input back to the [0, 1] intensity scale of `pixels / 16` (clipped)."""
    return np.clip(((np.asarray(x) * STD + MEAN) * LEVELS - 0.5) / 16, 0, 1)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few seconds (for tests)")
    parser.add_argument("--out", default="out", help="folder for the PNG (default out/)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    digits = load_digits()
    rng = np.random.default_rng(args.seed)
    order = rng.permutation(len(digits.data))
    train, test = order[:1500], order[1500:]
    labels = digits.target
    judge = SVC().fit(digits.data[train] / 16, labels[train])

    epochs, steps, hidden, blocks, mlp, lr = (
        (25, 1, 16, 1, 64, 3e-3) if args.quick else (60, 1, 32, 2, 128, 2e-3)
    )
    model = classifier(steps, hidden, blocks, mlp, args.seed)
    x_train = to_model(digits.data[train], 0.0)  # the objective adds the U[0, 1) noise
    schedule = optax.cosine_decay_schedule(lr, epochs * (len(train) // 100))
    history = invnet.fit(model, x_train, labels[train], objective=objective, epochs=epochs,
                         batch_size=100, optimizer=optax.adam(schedule), key=args.seed,
                         progress=False)  # fmt: skip
    t_fit = time.perf_counter() - t0

    x_test = to_model(digits.data[test], 0.5)
    out, _ = model.forward(jnp.asarray(x_test))
    logits, z = np.asarray(out[:, :CLASSES]), np.asarray(out[:, CLASSES:])
    predicted = logits.argmax(-1)
    test_accuracy = float(np.mean(predicted == labels[test]))
    x_back, _ = model.inverse(out)
    reconstruction_error = float(np.max(np.abs(np.asarray(x_back) - x_test)))

    # class-k logits: the mean training logits of each class (a typical confident logit vector)
    train_logits = np.asarray(model.forward(jnp.asarray(to_model(digits.data[train], 0.5)))[0])
    class_logits = np.stack([train_logits[labels[train] == k, :CLASSES].mean(0)
                             for k in range(CLASSES)])  # fmt: skip
    n_source = 20 if args.quick else 100
    source = x_test[:n_source]
    # row i * 10 + k: source image i's z with class k's logits, mapped back to its input
    inverted = np.asarray(invnet.input_for_hidden(
        model, np.repeat(source, CLASSES, axis=0), layer=len(model), unit=list(range(CLASSES)),
        value=np.tile(class_logits, (n_source, 1)),
    )).reshape(n_source, CLASSES, 64)  # fmt: skip
    wanted = np.broadcast_to(np.arange(CLASSES), inverted.shape[:2]).ravel()
    flat = inverted.reshape(-1, 64)
    self_pred = np.asarray(model.forward(jnp.asarray(flat))[0][:, :CLASSES]).argmax(-1)
    self_consistency = float(np.mean(self_pred == wanted))
    judge_agreement = float(np.mean(judge.predict(to_unit(flat)) == wanted))
    # the judge on the untouched test images, for scale
    judge_accuracy = float(np.mean(judge.predict(digits.data[test] / 16) == labels[test]))

    shown = 10
    sal = np.asarray(invnet.saliency(model, x_test[:shown], output=list(range(CLASSES))))
    sal = sal[np.arange(shown), predicted[:shown]]  # d logit[predicted] / d pixels, (10, 64)

    n_params = sum(int(np.size(p)) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    print(f"invertible classifier: {len(model)} layers, {n_params} params, {epochs} epochs "
          f"({t_fit:.1f} s), final loss {history.train_loss[-1]:.3f}")  # fmt: skip
    print(f"  held-out accuracy {test_accuracy:.1%} on {len(test)} digits "
          f"(the RBF SVM on raw pixels: {judge_accuracy:.1%}); |z| rms "
          f"{np.sqrt(np.mean(z**2)):.2f}")  # fmt: skip
    print(f"  exact reconstruction: max |f^-1(f(x)) - x| = {reconstruction_error:.2e} (float32)")
    print(f"  class-k inversions ({n_source} test z's x 10 classes): the model predicts k for "
          f"{self_consistency:.1%}, the independent SVM for {judge_agreement:.1%} "
          f"(chance 10%)")  # fmt: skip

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [("original\n#i: predicted", to_unit(x_test[:shown]), "gray_r"),
            ("reconstructed", to_unit(x_back[:shown]), "gray_r"),
            ("saliency of\npredicted logit", sal, "bwr")]  # fmt: skip
    sources = 3
    for i in range(sources):
        rows.append((f"z of #{i}\nclass k=", to_unit(inverted[i]), "gray_r"))
    fig, axes = plt.subplots(len(rows), 10, figsize=(8, 0.9 * len(rows)))
    for r, (name, images, cmap) in enumerate(rows):
        for c in range(10):
            ax = axes[r, c]
            if cmap == "bwr":
                lim = float(np.abs(images[c]).max()) or 1.0
                ax.imshow(images[c].reshape(8, 8), cmap=cmap, vmin=-lim, vmax=lim)
            else:
                ax.imshow(images[c].reshape(8, 8), cmap=cmap, vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"#{c}: {predicted[c]}", fontsize=7)
            if r >= 3:
                ax.set_title(str(c), fontsize=7, pad=2)
            if c == 0:
                ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=7)
    fig.suptitle(f"invertible classifier: {test_accuracy:.1%} held out, reconstruction error "
                 f"{reconstruction_error:.0e}; class-k inversions: model {self_consistency:.0%},"
                 f" SVM {judge_agreement:.0%}", fontsize=8)  # fmt: skip
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_dir / "08_invertible_classifier.png", dpi=80, bbox_inches="tight")
    plt.close(fig)
    print(f"picture: {out_dir / '08_invertible_classifier.png'}  "
          f"({time.perf_counter() - t0:.1f} s)")  # fmt: skip
    return {
        "test_accuracy": test_accuracy,
        "reconstruction_error": reconstruction_error,
        "self_consistency": self_consistency,
        "judge_agreement": judge_agreement,
        "judge_accuracy": judge_accuracy,
        "final_loss": history.train_loss[-1],
    }


if __name__ == "__main__":
    main()
