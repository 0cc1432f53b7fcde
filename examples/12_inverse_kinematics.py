"""12 - Inverse kinematics of a 4-D robot arm: the posterior p(x | y) from a conditional INN.

The benchmark of Kruse et al. 2021 ("Benchmarking invertible architectures on inverse
problems"): an arm on a vertical rail with three segments (lengths 0.5, 0.5, 1.0);
``x = (rail height, three joint angles)`` has the prior ``N(0, diag(0.25, 0.5, 0.5, 0.5)^2)``
and the forward process gives the 2-D end point ``y = f(x)``. Every ``y`` is reached by a
2-D family of arm poses; the question is the whole posterior ``p(x | y)``.

A conditional flow ``x -> z`` with ``y`` as its condition is trained by maximum likelihood
through `invnet.fit(flow, x, cond=y)`; ``flow.sample(key, n, cond=y*)`` draws poses for a
target ``y*``. Two models: affine couplings and rational-quadratic spline couplings.

The two errors, as the paper defines them, over ``M`` test targets ``y*`` drawn from the
prior's forward process, ``N`` posterior samples each:

* ``Err_post``: the MMD^2 between the model's samples and samples of the exact posterior
  (unbiased U-statistic, inverse multiquadric kernels ``h^2 / (h^2 + |a - b|^2)`` with
  widths ``h in (0.05, 0.2, 0.9)`` in x units, the ``MMD_multiscale`` of the INN papers'
  code; an earlier version of this example used ``h^2 in (0.05, 0.2, 0.9)``, broader
  kernels that gave larger values). The exact posterior: the noise-free posterior lives on the
  2-D surface ``f(x) = y*``; we draw (x3, x4) from the prior, solve ``y2`` for the first
  angle x2 (two branches) and ``y1`` for the rail height x1, weight each solution by
  ``N(x1) N(x2) / |dy2/dx2|`` (the change of variables onto the surface) and resample
  (sampling-importance-resampling on 200,000 draws per target). The paper used
  rejection (ABC) sampling of the same posterior.
* ``Err_resim``: ``mean |f(x) - y*|^2`` over the model's samples.

The model: 6 blocks of (coupling with the condition, `LULinear`), conditioners with two
hidden layers of 128, trained on 200,000 poses for 50 epochs of batch 500 (20,000 steps)
with adam, cosine-decayed from 3e-3, gradient norm clipped at 5. The poses are scaled to
unit prior variance and the condition ``y`` standardised with the training set's mean and
standard deviation (``y2`` lies near 1.7). The earlier version of this example (raw ``y``,
adam 1e-3, hidden 64, 2,000 steps) measured Err_resim 0.079 / 0.013 (affine / spline);
standardising ``y`` and adam 3e-3 at that size and budget gave 0.0035 (affine, 20 targets).

The training ``y`` carries a small Gaussian noise (std 0.006 in the arm's length units,
``--y-noise``; the targets ``y*`` are exact). Without it, ``p(x | y)`` lies on a 2-D surface
in 4-D: a flow approaches that only by squeezing two directions ever further, which the
likelihood rewards at every step, and the shape along the surface, which Err_post
measures, is learned more slowly. The noise gives the posterior a width well below the
smallest kernel (0.05). On a fixed set of 30 targets drawn apart from the example's
(``python benchmarks/ik_noise.py``, same model and budget), Err_post went from 0.0046 to
0.0020 (affine) and from 0.0040 to 0.00097 (spline) at noise 0.006; 0.01 gave 0.0019 /
0.0011, 0.004 (spline) 0.0012, 0.015 (spline) 0.0016. Err_resim rose from 0.00003 to
0.0001 (affine). 0.006 was chosen there, not on the example's targets.

Measured (``python examples/12_inverse_kinematics.py``, float32, a 2-core CPU shared with
one other job, 197 s / 266 s of training and evaluation for the affine / spline model;
100 targets x 1000 samples): affine Err_post 0.0028, Err_resim 0.00013; spline Err_post
0.0018, Err_resim 0.00010; two exact-posterior samples 0.00012. With ``--y-noise 0`` (the
previous version, same targets) the errors were 0.0074 / 0.0046 and 0.00014 / 0.00002.
Err_resim is at the issue's target (<= 0.001) for both; Err_post is not (<= 0.002 /
0.001) on these targets, though it was on another draw of 100 (0.0013 / 0.0010, the noise
drawn from the same stream as the poses). The mean over targets varies that much between
draws because it comes from a few targets near full reach (``y1`` near 0, ``y2`` near
1.6-1.7), whose posterior bends between two elbow branches; the median target is 2-3x below
the mean. More steps or width did not help the spline model on the 30 targets (75 epochs:
0.0011; hidden 192: 0.0011; 8 blocks at noise 0.01: 0.0010); hidden 256 took the affine
model from 0.0020 to 0.0016 at about twice the training time.

Writes OUT/12_inverse_kinematics.png: posterior arms for one target, both models.

Run: python examples/12_inverse_kinematics.py [--quick] [--out out/]
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

SIGMA = np.array([0.25, 0.5, 0.5, 0.5])
LENGTHS = (0.5, 0.5, 1.0)
WIDTHS = (0.05, 0.2, 0.9)  # h: the kernel h^2 / (h^2 + |a - b|^2)
Y_NOISE = 0.006  # std of the observation noise on y in training (arm lengths: 0.5, 0.5, 1)


def forward_process(x):
    """The arm's end point ``(y1, y2)``: y1 along the rail (vertical), y2 away from it."""
    a1 = x[..., 1]
    a2 = a1 + x[..., 2]
    a3 = a2 + x[..., 3]
    l1, l2, l3 = LENGTHS
    y1 = x[..., 0] + l1 * np.sin(a1) + l2 * np.sin(a2) + l3 * np.sin(a3)
    y2 = l1 * np.cos(a1) + l2 * np.cos(a2) + l3 * np.cos(a3)
    return np.stack([y1, y2], axis=-1)


def exact_posterior(y, n, rng, draws=200_000):
    """``n`` samples of p(x | y) by sampling-importance-resampling on the surface f(x) = y."""
    x3 = rng.normal(0.0, SIGMA[2], draws)
    x4 = rng.normal(0.0, SIGMA[3], draws)
    l1, l2, l3 = LENGTHS
    # y2 = l1 cos(a) + l2 cos(a + x3) + l3 cos(a + x3 + x4) = A cos(a) - B sin(a) = R cos(a + phi)
    big_a = l1 + l2 * np.cos(x3) + l3 * np.cos(x3 + x4)
    big_b = l2 * np.sin(x3) + l3 * np.sin(x3 + x4)
    r, phi = np.hypot(big_a, big_b), np.arctan2(big_b, big_a)
    c = y[1] / r
    ok = np.abs(c) < 1
    base = np.arccos(np.clip(c, -1, 1))
    xs, logw = [], []
    for sign in (1.0, -1.0):
        for turn in (-2 * np.pi, 0.0, 2 * np.pi):
            x2 = sign * base - phi + turn
            x = np.stack([np.zeros(draws), x2, x3, x4], axis=-1)
            x[:, 0] = y[0] - forward_process(x)[:, 0]  # x1 enters y1 additively
            jac = np.abs(r * np.sin(x2 + phi))  # |dy2/dx2|; dy1/dx1 = 1, dy2/dx1 = 0
            jac = np.where(ok & (jac > 0), jac, 1.0)
            lw = -0.5 * (x[:, 0] / SIGMA[0]) ** 2 - 0.5 * (x2 / SIGMA[1]) ** 2 - np.log(jac)
            xs.append(x)
            logw.append(np.where(ok, lw, -np.inf))
    xs, logw = np.concatenate(xs), np.concatenate(logw)
    w = np.exp(logw - logw.max())
    return xs[rng.choice(len(xs), size=n, p=w / w.sum())]


def mmd_unbiased(a, b):
    """Unbiased MMD^2 (U-statistic) with the inverse multiquadric kernels above."""

    def gram(u, v):
        d2 = jnp.sum((u[:, None, :] - v[None, :, :]) ** 2, axis=-1)
        return sum(h * h / (h * h + d2) for h in WIDTHS)

    n, m = a.shape[0], b.shape[0]
    kaa, kbb = gram(a, a), gram(b, b)
    off_a = (jnp.sum(kaa) - jnp.trace(kaa)) / (n * (n - 1))
    off_b = (jnp.sum(kbb) - jnp.trace(kbb)) / (m * (m - 1))
    return off_a + off_b - 2 * jnp.mean(gram(a, b))


_mmd = jax.jit(mmd_unbiased)


def build(kind, blocks, hidden, seed, cond_dim=2):
    rngs = nnx.Rngs(seed)
    layers = []
    for _ in range(blocks):
        if kind == "affine":
            layers.append(invnet.AffineCoupling(4, hidden=hidden, cond_dim=cond_dim, rngs=rngs))
        else:
            layers.append(invnet.SplineCoupling(4, bins=8, bound=4.0, hidden=hidden,
                                                cond_dim=cond_dim, rngs=rngs))  # fmt: skip
        layers.append(invnet.LULinear(4, rngs=rngs))
    return invnet.Flow(invnet.Sequential(*layers))


def evaluate(flow, targets, conds, truth, n, seed):
    """Err_post and Err_resim over the test targets (model samples in x units); ``conds``
    are the targets as the model's condition (standardised)."""
    post, resim, samples = [], [], []
    for i, (y, c) in enumerate(zip(targets, conds, strict=True)):
        u = flow.sample(jax.random.key(seed + i), n, cond=jnp.asarray(c))
        x = np.asarray(u, np.float64) * SIGMA
        samples.append(x)
        post.append(float(_mmd(jnp.asarray(x, jnp.float32), jnp.asarray(truth[i], jnp.float32))))
        resim.append(float(np.mean(np.sum((forward_process(x) - y) ** 2, axis=-1))))
    return float(np.mean(post)), float(np.mean(resim)), samples


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few seconds (for tests)")
    parser.add_argument("--out", default="out", help="folder for the PNG (default out/)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--y-noise",
        type=float,
        default=Y_NOISE,
        help=f"std of the noise on y in training (default {Y_NOISE}; 0: none)",
    )
    args = parser.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    if args.quick:
        n_train, epochs, blocks, hidden, n_test, n_samples = 4000, 15, 3, (32, 32), 5, 300
    else:
        n_train, epochs, blocks, hidden, n_test, n_samples = 200_000, 50, 6, (128, 128), 100, 1000
    batch, learning_rate = 500, 3e-3
    x_train = rng.normal(size=(n_train, 4)) * SIGMA
    # y observed with a small noise: the noise-free p(x | y) lives on a 2-D surface in 4-D,
    # which a flow approaches only by squeezing two directions without end (the likelihood
    # rewards that at every step, and it takes the capacity the shape along the surface
    # needs); with noise the target has a finite width (see the module docs)
    noise = np.random.default_rng([args.seed, 1]).normal(size=(n_train, 2))  # own stream:
    y_train = forward_process(x_train) + noise * args.y_noise  # same targets at any noise
    u_train = (x_train / SIGMA).astype(np.float32)
    # the condition standardised like the poses (y2 lies near 1.7, not around 0): every
    # coupling's conditioner sees it, and an offset input slowed training by an order of
    # magnitude in Err_resim at the same budget
    y_mean, y_std = y_train.mean(axis=0), y_train.std(axis=0)
    standardise = lambda y: ((y - y_mean) / y_std).astype(np.float32)  # noqa: E731
    targets = forward_process(rng.normal(size=(n_test, 4)) * SIGMA)
    truth = [exact_posterior(y, n_samples, rng) for y in targets]
    floor = float(np.mean([float(_mmd(jnp.asarray(exact_posterior(y, n_samples, rng),
                                                  jnp.float32), jnp.asarray(t, jnp.float32)))
                           for y, t in zip(targets[:10], truth[:10], strict=True)]))  # fmt: skip
    steps = epochs * (n_train // batch)
    prior = rng.normal(size=(n_samples, 4)) * SIGMA  # the baseline: poses from the prior
    prior_resim = float(np.mean([np.mean(np.sum((forward_process(prior) - y) ** 2, axis=-1))
                                 for y in targets]))  # fmt: skip
    results: dict = {"n_train": n_train, "epochs": epochs, "mmd_exact_vs_exact": floor,
                     "prior_resim": prior_resim, "y_noise": args.y_noise}  # fmt: skip
    samples_for_plot = {}
    for kind in ("affine", "spline"):
        t0 = time.perf_counter()
        flow = build(kind, blocks, hidden, args.seed)
        schedule = optax.cosine_decay_schedule(learning_rate, steps, alpha=0.01)
        opt = optax.chain(optax.clip_by_global_norm(5.0), optax.adam(schedule))
        history = invnet.fit(flow, u_train, cond=standardise(y_train), epochs=epochs,
                             batch_size=batch, optimizer=opt, key=args.seed,
                             progress=False)  # fmt: skip
        err_post, err_resim, samples = evaluate(flow, targets, standardise(targets), truth,
                                                n_samples, args.seed)  # fmt: skip
        seconds = time.perf_counter() - t0
        samples_for_plot[kind] = samples[0]
        results[kind] = {"err_post": err_post, "err_resim": err_resim, "seconds": seconds,
                         "final_nll": history.train_loss[-1]}  # fmt: skip
        print(f"{kind:6s} cINN: {blocks} blocks, hidden {hidden}, {epochs} epochs on "
              f"{n_train} poses: Err_post {err_post:.5f}, Err_resim {err_resim:.5f} "
              f"({seconds:.0f} s)")  # fmt: skip
    print(f"(Err_post of two exact-posterior samples of the same size: {floor:.5f}; "
          f"Err_resim of prior poses: {prior_resim:.3f}; {n_test} targets x {n_samples} "
          "samples, float32)")  # fmt: skip
    _plot(targets[0], truth[0], samples_for_plot, Path(args.out))
    return results


def _arm(x):
    """The joint positions of pose x (rail at the origin; y1 vertical, y2 horizontal)."""
    a = np.cumsum(x[1:])
    pts = [np.array([0.0, x[0]])]
    for length, angle in zip(LENGTHS, a, strict=True):
        pts.append(pts[-1] + length * np.array([np.cos(angle), np.sin(angle)]))
    return np.array(pts)


def _plot(y, truth, samples, out: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.8), sharex=True, sharey=True)
    for ax, (title, xs) in zip(axes, [("exact posterior", truth), *samples.items()], strict=True):
        for x in xs[:120]:
            p = _arm(x)
            ax.plot(p[:, 0], p[:, 1], "-", color="tab:blue", alpha=0.08, lw=1)
        ax.plot([0, 0], [-1.2, 1.2], "k-", lw=2, alpha=0.4)
        ax.plot(y[1], y[0], "r*", ms=12)
        ax.set_title(title if title == "exact posterior" else f"{title} cINN (invnet.fit)")
        ax.set_aspect("equal")
    fig.suptitle("Inverse kinematics: arm poses x ~ p(x | y*) for one target y* (red star)")
    fig.tight_layout()
    fig.savefig(out / "12_inverse_kinematics.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
