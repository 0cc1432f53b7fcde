"""Density estimation on scikit-learn's tabular sets: held-out NLL and training speed.

Data (all offline, shipped with scikit-learn): wine (13-D, 178 rows; columns with skewness
> 1 log-transformed), diabetes (10-D, 442 rows), digits (64-D, 1797 rows, dequantised as
``x + U(0, 1)``). A fixed 80/20 train/test split (seed 0), standardised with the training
rows' mean and std. Every model trains with Adam (``--lr``, default 1e-3), batch 50, 20% of
the training rows held out for early stopping (patience 10, best weights restored), at most
``--epochs`` epochs. Reported: the test NLL in nats per sample (on the standardised scale),
the epochs run, and training steps/s (wall time of the whole fit, compile included).

Models (same depth and width: 8 blocks, conditioner hidden (64, 64)):

* ``invnet affine relu``: AffineCoupling + Permute, the coupling's default activation;
* ``invnet affine tanh``: the same with ``activation="tanh"``;
* ``invnet spline relu`` / ``tanh``: `invnet.spline_flow` (8 bins on [-3, 3]) with that
  conditioner activation;
* ``flowjax affine`` / ``flowjax spline``: ``coupling_flow`` with ``Affine`` /
  ``RationalQuadraticSpline(8, 3)`` transformers, ``fit_to_data`` with the same rule
  (when flowjax imports; otherwise skipped with the reason).

Peer settings: flowjax runs on JAX's own defaults (no ``XLA_FLAGS``, thread or precision
setting) in the same process. Its architecture and training rule are set to invnet's, so
that the table compares flows, not defaults: ``coupling_flow(flow_layers=8, nn_width=64,
nn_depth=2)`` (flowjax's defaults: 8, 50, 1) and ``fit_to_data(optimizer=adam(--lr),
batch_size=50, max_patience=10, val_prop=0.2, return_best=True)`` (flowjax's defaults:
learning rate 5e-4, batch 100, patience 5, val_prop 0.1).

    python benchmarks/tabular.py [--sets wine diabetes digits] [--epochs 300] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import invnet

BATCH, PATIENCE, VAL, BLOCKS, HIDDEN = 50, 10, 0.2, 8, (64, 64)


def load(name: str, seed: int = 0, log: bool = True):
    """(train, test) float32 arrays, standardised with the training statistics."""
    from sklearn import datasets

    rng = np.random.default_rng(seed)
    if name == "wine":
        x = datasets.load_wine().data.astype(np.float64)
        mean, std = x.mean(0), x.std(0)
        skew = (((x - mean) / std) ** 3).mean(0)
        if log:
            x[:, skew > 1] = np.log(x[:, skew > 1])
    elif name == "diabetes":
        x = datasets.load_diabetes().data.astype(np.float64)
    elif name == "digits":
        x = datasets.load_digits().data.astype(np.float64)
        x = x + rng.uniform(size=x.shape)
    else:
        raise ValueError(f"unknown set {name!r}")
    perm = rng.permutation(len(x))
    n_test = len(x) // 5
    test, train = x[perm[:n_test]], x[perm[n_test:]]
    mean, std = train.mean(0), train.std(0)
    return ((train - mean) / std).astype(np.float32), ((test - mean) / std).astype(np.float32)


def invnet_flow(kind: str, dim: int) -> invnet.Flow:
    rngs = nnx.Rngs(0)
    activation = kind.split()[-1]
    if kind.startswith("spline"):
        return invnet.spline_flow(
            dim, layers=BLOCKS, bins=8, bound=3.0, hidden=HIDDEN, activation=activation,
            rngs=rngs,
        )  # fmt: skip
    blocks = []
    for i in range(BLOCKS):
        if i:
            blocks.append(invnet.Permute(dim, rngs=rngs))
        blocks.append(invnet.AffineCoupling(dim, hidden=HIDDEN, activation=activation, rngs=rngs))
    return invnet.Flow(invnet.Sequential(*blocks))


def run_invnet(kind, train, test, epochs, lr):
    flow = invnet_flow(kind, train.shape[1])
    start = time.perf_counter()
    history = invnet.fit(
        flow, train, learning_rate=lr, epochs=epochs, batch_size=BATCH, validation=VAL,
        early_stopping=PATIENCE, progress=False, key=0,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    n_epochs = len(history.train_loss)
    steps = n_epochs * int(np.ceil(len(train) * (1 - VAL) / BATCH))
    nll = -float(jnp.mean(flow.log_prob(jnp.asarray(test))))
    return {"nll": nll, "epochs": n_epochs, "steps_per_s": steps / seconds}


def run_flowjax(kind, train, test, epochs, lr):
    from flowjax.bijections import Affine, RationalQuadraticSpline
    from flowjax.distributions import Normal
    from flowjax.flows import coupling_flow
    from flowjax.train import fit_to_data

    dim = train.shape[1]
    transformer = Affine() if kind == "affine" else RationalQuadraticSpline(knots=8, interval=3)
    flow = coupling_flow(
        jax.random.key(0), base_dist=Normal(jnp.zeros(dim)), transformer=transformer,
        flow_layers=BLOCKS, nn_width=HIDDEN[0], nn_depth=len(HIDDEN),
    )  # fmt: skip
    start = time.perf_counter()
    flow, losses = fit_to_data(
        jax.random.key(1), flow, jnp.asarray(train), optimizer=optax.adam(lr),
        max_epochs=epochs, max_patience=PATIENCE, batch_size=BATCH, val_prop=VAL,
        show_progress=False,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    n_epochs = len(losses["train"])
    steps = n_epochs * int(np.ceil(len(train) * (1 - VAL) / BATCH))
    nll = -float(jnp.mean(flow.log_prob(jnp.asarray(test))))
    return {"nll": nll, "epochs": n_epochs, "steps_per_s": steps / seconds}


MODELS = {
    "invnet affine relu": lambda *a: run_invnet("affine relu", *a),
    "invnet affine tanh": lambda *a: run_invnet("affine tanh", *a),
    "invnet spline relu": lambda *a: run_invnet("spline relu", *a),
    "invnet spline tanh": lambda *a: run_invnet("spline tanh", *a),
    "flowjax affine": lambda *a: run_flowjax("affine", *a),
    "flowjax spline": lambda *a: run_flowjax("spline", *a),
}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", nargs="+", default=["wine", "diabetes", "digits"])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--epochs", type=int, default=300)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0, help="split/dequantisation seed")
    parser.add_argument("--no-log", action="store_true", help="wine without the log transform")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args(argv)
    rows = []
    for name in args.sets:
        train, test = load(name, seed=args.seed, log=not args.no_log)
        for model in args.models:
            try:
                result = MODELS[model](train, test, args.epochs, args.lr)
            except ImportError as exc:
                print(f"{model}: skipped ({exc})", file=sys.stderr)
                continue
            rows.append(
                {"set": name, "dim": train.shape[1], "model": model, "seed": args.seed, **result}
            )
            print(json.dumps(rows[-1]), flush=True)
    print(f"\nbackend {jax.default_backend()}; test NLL in nats/sample (lower is better)")
    print("| set (D, train rows) | model | test NLL | epochs | steps/s |\n|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['set']} ({r['dim']}) | {r['model']} | {r['nll']:.2f} | {r['epochs']} | "
            f"{r['steps_per_s']:.0f} |"
        )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)
    return rows


if __name__ == "__main__":
    main()
