"""01 - Run a trained regression in reverse: x from y.

The question: "I trained Sequential(Linear, ReLU, Linear); can I run it backwards to get x
from y?" Only if every layer is a bijection. This script answers with the shapes people
posted:

1. a one-unit linear regression y ~ 0.4 x - noise: the input giving y0 = 100 by 200 steps
   of gradient descent on x, versus the exact inverse (one division); then the same with a
   sigmoid output, where gradient descent stalls and the exact inverse is a logit;
2. Linear(3, 3) + Tanh, trained, turned into invnet layers by `invnet.from_dense` and
   inverted exactly (the linear solve and atanh, done by the library);
3. a 2-D regression trained two ways on the same data: an invnet model
   (LULinear, LeakyReLU, LULinear) inverts exactly; the same shape with ReLU cannot (the
   negative half is gone), shown side by side in a PNG.

Run: python examples/01_reverse_regression.py [--quick] [--out out/]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import invnet


def train_plain(model: nnx.Module, loss_fn, steps: int, lr: float) -> float:
    """Full-batch Adam on a plain Flax model, all steps in one jitted loop; returns the loss."""
    graphdef, params = nnx.split(model)
    tx = optax.adam(lr)

    def step(_, carry):
        params, opt_state = carry
        grads = jax.grad(lambda p: loss_fn(nnx.merge(graphdef, p)))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    params, _ = jax.jit(lambda p: jax.lax.fori_loop(0, steps, step, (p, tx.init(p))))(params)
    nnx.update(model, params)
    return float(loss_fn(model))


def descend(f, target: float, lr: float, steps: int) -> float:
    """The users' method: gradient descent on x, from x = 0, until f(x) matches target."""
    grad = jax.grad(lambda v: (f(v) - target) ** 2)
    return float(jax.jit(lambda: jax.lax.fori_loop(0, steps, lambda _, v: v - lr * grad(v), 0.0))())


def one_unit(quick: bool) -> dict:
    """y ~ 0.4 x - noise; which x gives y0 = 100?"""
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 500, 200)
    y = 0.4 * x - rng.uniform(0, 50, 200)  # noise with mean 25: intercept near -25
    w, b = np.polyfit(x, y, 1)
    y0 = 100.0

    x_gd = descend(lambda v: w * v + b, y0, lr=0.1, steps=200)
    x_exact = (y0 - b) / w
    # the same question with a sigmoid output: y = sigmoid((w x + b) / 100), target 0.95
    t0 = 0.95

    def sig(v):
        return jax.nn.sigmoid((w * v + b) / 100)

    v = descend(sig, t0, lr=1e4, steps=200)
    x_sig_exact = (100 * np.log(t0 / (1 - t0)) - b) / w  # logit, then the linear inverse
    print(f"1. one-unit regression y ~ 0.4 x - noise, fitted: y = {w:.4f} x {b:+.3f}")
    print(
        f"   x for y0 = 100: gradient descent (200 steps) {x_gd:.3f}, exact (y0 - b) / w "
        f"{x_exact:.3f}"
    )
    print(
        f"   sigmoid output, target 0.95: gradient descent {float(v):.2f} "
        f"(output {float(sig(v)):.4f}), exact logit inverse {x_sig_exact:.2f} "
        f"(output {float(sig(x_sig_exact)):.4f})"
    )
    return {"x_gd": x_gd, "x_exact": x_exact, "x_sigmoid_gd": float(v),
            "x_sigmoid_exact": float(x_sig_exact)}  # fmt: skip


def linear_tanh(quick: bool) -> dict:
    """A trained Linear(3, 3) + Tanh, turned into an invnet model and inverted exactly."""
    key_w, key_x = jax.random.split(jax.random.key(1))
    w_true = jax.random.normal(key_w, (3, 3))
    x = jax.random.normal(key_x, (256, 3))
    y = jnp.tanh(x @ w_true.T * 0.5)
    model = nnx.Linear(3, 3, rngs=nnx.Rngs(0))
    loss = train_plain(model, lambda m: jnp.mean((jnp.tanh(m(x)) - y) ** 2), 500, 3e-2)
    # the trained weights as invnet layers: LULinear.from_matrix + Tanh (a Flax/Keras kernel
    # is (in, out); PyTorch users pass model.state_dict() and activations={1: "tanh"})
    inn = invnet.from_dense(
        [("dense", model.kernel[...], model.bias[...]), "tanh"], weight_layout="in_out"
    )
    y_pred = jnp.tanh(model(x))  # what the trained network outputs
    x_back, _ = inn.inverse(y_pred)  # = solve(W, atanh(y) - b), one exact pass
    err = float(jnp.max(jnp.abs(x_back - x)))
    print(
        f"2. Linear(3, 3) + Tanh (train MSE {float(loss):.2e}): invnet.from_dense -> "
        f"{[type(layer).__name__ for layer in inn]}, inverse max error {err:.2e} "
        "(float32: atanh amplifies rounding where |y| nears 1)"
    )
    print(
        "   works because W is square and non-singular and tanh is one-to-one onto (-1, 1) "
        "(an output outside it has no preimage: NaN); from_dense refuses a Linear(1000, 100)"
    )
    return {"tanh_error": err}


def relu_vs_leaky(quick: bool, out: Path) -> dict:
    """The same 2-D regression as a ReLU MLP and as an invnet model; reverse both."""
    w1 = np.array([[1.5, 0.5], [-0.4, 1.0]], np.float32)
    w2 = np.array([[1.0, -0.6], [0.3, 0.8]], np.float32)
    x = np.random.default_rng(2).normal(size=(1024, 2)).astype(np.float32)
    h = x @ w1.T + np.array([0.2, -0.1], np.float32)
    y = np.where(h < 0, 0.3 * h, h) @ w2.T + np.array([0.1, 0.3], np.float32)  # the process
    epochs = 20 if quick else 100

    # LULinear's permutation and diagonal signs are fixed when it is built (so it can never
    # pass through a singular matrix); init="identity" starts at W = I, whose orientation
    # matches this process. A random init may not, and then cannot fit it.
    inn = invnet.Sequential(
        invnet.LULinear(2, init="identity", rngs=nnx.Rngs(0)),
        invnet.LeakyReLU(0.5, learnable=True),
        invnet.LULinear(2, init="identity", rngs=nnx.Rngs(1)),
    )
    invnet.fit(inn, x, y, epochs=epochs, batch_size=128, learning_rate=1e-2, progress=False)

    class ReluMLP(nnx.Module):  # the users' model: Linear, ReLU, Linear
        def __init__(self, rngs):
            self.first, self.second = nnx.Linear(2, 2, rngs=rngs), nnx.Linear(2, 2, rngs=rngs)

        def __call__(self, v):
            return self.second(jax.nn.relu(self.first(v)))

    mlp = ReluMLP(nnx.Rngs(0))
    train_plain(mlp, lambda m: jnp.mean((m(x) - y) ** 2), 8 * epochs, 1e-2)

    graphdef, state = nnx.split(inn)

    @jax.jit
    def run_inn(state, x, y):
        model = nnx.merge(graphdef, state)
        y_pred = model(x)
        return y_pred, model.inverse(y)[0], model.inverse(y_pred)[0]

    y_inn, x_inn, x_round = run_inn(state, x, y)  # x from y: one exact inverse pass
    # the best a ReLU net allows (float64 numpy): undo each Linear, "undo" ReLU as the
    # identity (a negative pre-activation became 0; nothing tells us what it was)
    w1, b1 = np.asarray(mlp.first.kernel[...], float), np.asarray(mlp.first.bias[...], float)
    w2, b2 = np.asarray(mlp.second.kernel[...], float), np.asarray(mlp.second.bias[...], float)
    x, y = np.asarray(x, float), np.asarray(y, float)
    x_relu = np.linalg.solve(w1.T, (np.linalg.solve(w2.T, (y - b2).T).T - b1).T).T
    pre = x @ w1 + b1
    mse_inn = float(np.mean((np.asarray(y_inn) - y) ** 2))
    mse_relu = float(np.mean((np.maximum(pre, 0) @ w2 + b2 - y) ** 2))
    err_inn = float(np.mean(np.linalg.norm(np.asarray(x_inn) - x, axis=-1)))
    err_relu = float(np.mean(np.linalg.norm(x_relu - x, axis=-1)))
    round_trip = float(np.max(np.abs(np.asarray(x_round) - x)))
    lost = float(np.mean(np.any(pre < 0, axis=-1)))
    print(
        f"3. 2-D regression, same data and shape: invnet (fit MSE {mse_inn:.2e}) reverses "
        f"the data's y with mean |x - x_back| = {err_inn:.2e}, its own outputs with max "
        f"error {round_trip:.1e} (float32)"
    )
    print(
        f"   ReLU MLP (fit MSE {mse_relu:.2e}): {lost:.0%} of inputs hit ReLU's flat half; "
        f"best reversal errs by {err_relu:.2e} on average"
    )

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(11, 3.6), sharex=True, sharey=True)
    for ax, pts, title in [
        (axes[0], x, "inputs x"),
        (axes[1], x_inn, f"invnet: inverse(y)\nmean error {err_inn:.1e}"),
        (axes[2], x_relu, f"ReLU MLP: solve + 'undo' ReLU\nmean error {err_relu:.2f}"),
    ]:
        ax.scatter(*np.asarray(pts).T, s=3, alpha=0.5, c=np.asarray(x[:, 0]), cmap="viridis")
        ax.set_title(title)
        ax.set_aspect("equal")
    axes[0].set_xlim(-3.5, 3.5)
    axes[0].set_ylim(-3.5, 3.5)
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / "01_reverse_regression.png", dpi=80)
    plt.close(fig)
    return {
        "inn_error": err_inn,
        "inn_round_trip": round_trip,
        "relu_error": err_relu,
        "relu_lost_fraction": lost,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few seconds (for tests)")
    parser.add_argument("--out", default="out", help="folder for the PNG (default out/)")
    args = parser.parse_args(argv)
    results = {**one_unit(args.quick), **linear_tanh(args.quick)}
    results |= relu_vs_leaky(args.quick, Path(args.out))
    print(f"picture: {Path(args.out) / '01_reverse_regression.png'}")
    return results


if __name__ == "__main__":
    main()
