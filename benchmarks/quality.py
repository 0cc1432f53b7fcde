"""Model quality over many data sets: invnet's default flows against flowjax's, by mean rank.

Sets (all offline). Real ones ship with scikit-learn; each column is dequantised at its own
resolution (uniform noise as wide as the smallest gap between its distinct values), so a
column on a grid (integer pixels, ages, a binary sex column) has a density. Synthetic ones have
known densities, 2-50 dimensions, 1500 rows each. The groups are fixed here, before any tuning:

* tuning group (defaults are chosen by the mean rank over these only): wine (13-D), diabetes
  (10 features + target), digits (61-D: 3 of the 64 pixels are always 0), moons2, ring2
  (8 Gaussians on a circle), gmm10 (5-component mixture), student5 (correlated Student-t,
  3 dof), corr50 (Gaussian, condition number 1e3), helix3 (a thin curve in 3-D), funnel4
  (Neal's funnel);
* held-out-of-tuning group (reported apart, never used to choose anything): iris (4-D),
  breast_cancer (30-D), student20 (Student-t, 4 dof), manifold10 (a curved 2-D sheet in 10-D
  plus noise), pinwheel2.

Protocol: for each split seed, a random 80/20 train/test split, standardised with the training
rows' mean and std; every model trains with the same optax optimizer (invnet's `fit` default
unless ``--lr``/``--clip``/``--wd`` say otherwise), the same batch (``min(64, n_fit // 2)``),
the same maximum epochs and patience, early stopping on 10% of the training rows with the best
validation parameters restored. Reported: held-out NLL in nats per row on the standardised
scale (mean over split seeds) and each model's rank per set (1 = lowest NLL), averaged per
group. A model whose held-out NLL is not finite gets NaN and the worst rank.

Models (same depth and conditioner width, parameter counts in the JSON):

* ``invnet affine``: `invnet.affine_flow(D)` as a user builds it (its defaults);
* ``invnet spline``: `invnet.spline_flow(D)` (its defaults);
* ``flowjax affine`` / ``flowjax spline``: ``coupling_flow`` with the same number of layers and
  conditioner (width, depth), the ``Affine`` transformer / ``RationalQuadraticSpline`` with as
  many bins on the same interval, ``fit_to_data`` with the same rule.

``--search`` runs the bounded search of invnet's defaults over the tuning group (one split
seed, capped epochs) and records every configuration tried with its mean rank.

    python benchmarks/quality.py                 # the protocol, 3 split seeds, both groups
    python benchmarks/quality.py --search        # the search over the tuning group
    python benchmarks/quality.py --smoke         # seconds: one tiny set, 2 models, 2 epochs
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import _util
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import invnet
from invnet.training.epoch import default_optimizer

RESULTS = Path(__file__).resolve().parent / "results"
TUNING = ["wine", "diabetes", "digits", "moons2", "ring2", "gmm10", "student5", "corr50",
          "helix3", "funnel4"]  # fmt: skip
HELD_OUT = ["iris", "breast_cancer", "student20", "manifold10", "pinwheel2"]
N_SYNTHETIC, VAL, BATCH = 1500, 0.1, 64
MODELS = ["invnet affine", "invnet spline", "flowjax affine", "flowjax spline"]
SIZE: dict = {}  # overrides of the builders' layers/hidden (``--smoke`` only)


# ---------------------------------------------------------------- data


def _dequantise(x: np.ndarray, rng) -> np.ndarray:
    """Each column plus uniform noise as wide as the smallest gap between its values."""
    out = x.astype(np.float64).copy()
    for j in range(x.shape[1]):
        values = np.unique(x[:, j])
        if len(values) > 1:
            gap = np.min(np.diff(values))
            out[:, j] += rng.uniform(-gap / 2, gap / 2, len(x))
    return out


def _real(name: str) -> np.ndarray:
    from sklearn import datasets

    if name == "diabetes":
        bunch = datasets.load_diabetes(scaled=False)
        return np.column_stack([bunch.data, bunch.target])
    loader = {
        "wine": datasets.load_wine,
        "digits": datasets.load_digits,
        "iris": datasets.load_iris,
        "breast_cancer": datasets.load_breast_cancer,
    }[name]
    x = loader().data
    return x[:, np.ptp(x, axis=0) > 0]  # digits: 3 pixels are 0 in every image


def _correlated(dim: int, rng, cond: float = 10.0) -> np.ndarray:
    """A fixed random covariance factor with singular values from 1 down to 1/cond."""
    q, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
    return q * np.geomspace(1.0, 1.0 / cond, dim)


def _student(n, dim, dof, rng, fixed):
    z = rng.normal(size=(n, dim)) @ _correlated(dim, fixed).T
    return z / np.sqrt(rng.chisquare(dof, (n, 1)) / dof)


def _synthetic(name: str, n: int, rng) -> np.ndarray:
    """``n`` draws; the distribution itself is fixed (its parameters use seed 1234)."""
    fixed = np.random.default_rng(1234)
    if name == "moons2":
        from sklearn.datasets import make_moons

        return make_moons(n, noise=0.1, random_state=int(rng.integers(2**31)))[0]
    if name == "ring2":
        angle = 2 * np.pi * rng.integers(0, 8, n) / 8
        return 4 * np.column_stack([np.cos(angle), np.sin(angle)]) + 0.35 * rng.normal(size=(n, 2))
    if name == "gmm10":
        means = 3 * fixed.normal(size=(5, 10))
        factors = [_correlated(10, fixed, 5.0) for _ in range(5)]
        k = rng.integers(0, 5, n)
        z = rng.normal(size=(n, 10))
        return means[k] + np.einsum("nij,nj->ni", np.stack(factors)[k], z)
    if name == "student5":
        return _student(n, 5, 3.0, rng, fixed)
    if name == "student20":
        return _student(n, 20, 4.0, rng, fixed)
    if name == "corr50":
        return rng.normal(size=(n, 50)) @ _correlated(50, fixed, 1e3).T
    if name == "helix3":
        t = rng.uniform(0, 4 * np.pi, n)
        return np.column_stack([np.cos(t), np.sin(t), t / 4]) + 0.05 * rng.normal(size=(n, 3))
    if name == "funnel4":
        v = rng.normal(size=(n, 1))
        return np.column_stack([v, np.exp(v / 2) * rng.normal(size=(n, 3))])
    if name == "manifold10":
        w1, b1, w2 = fixed.normal(size=(2, 8)), fixed.normal(size=8), fixed.normal(size=(8, 10))
        z = rng.normal(size=(n, 2))
        return np.tanh(z @ w1 + b1) @ w2 + 0.05 * rng.normal(size=(n, 10))
    if name == "pinwheel2":
        arm = rng.integers(0, 5, n)
        r = 0.3 * rng.normal(size=n) + 1.0
        t = 0.05 * rng.normal(size=n)
        angle = 2 * np.pi * arm / 5 + 0.25 * np.exp(r)
        xy = np.column_stack([r, t])
        rot = np.stack([np.cos(angle), -np.sin(angle), np.sin(angle), np.cos(angle)], -1)
        return 2 * np.einsum("nij,nj->ni", rot.reshape(n, 2, 2), xy)
    raise ValueError(f"unknown set {name!r}; known: {TUNING + HELD_OUT}")


def load(name: str, seed: int, n: int = N_SYNTHETIC):
    """(train, test) float32 arrays of set ``name`` for split seed ``seed``, standardised with
    the training rows' statistics."""
    rng = np.random.default_rng(seed)
    if name in ("wine", "diabetes", "digits", "iris", "breast_cancer"):
        x = _dequantise(_real(name), rng)
    else:
        x = _synthetic(name, n, rng)
    perm = rng.permutation(len(x))
    n_test = len(x) // 5
    test, train = x[perm[:n_test]], x[perm[n_test:]]
    mean, std = train.mean(0), train.std(0)
    return ((train - mean) / std).astype(np.float32), ((test - mean) / std).astype(np.float32)


# ---------------------------------------------------------------- models


def invnet_model(family: str, dim: int, cfg: dict | None = None, seed: int = 0) -> invnet.Flow:
    """invnet's default flow of ``family``; ``cfg`` overrides builder arguments (search)."""
    rngs = nnx.Rngs(seed)
    build = invnet.affine_flow if family == "affine" else invnet.spline_flow
    return build(dim, **{**SIZE, **(cfg or {})}, rngs=rngs)


def flowjax_model(family: str, dim: int, layers: int, hidden, bins: int, bound: float, seed=0):
    from flowjax.bijections import Affine, RationalQuadraticSpline
    from flowjax.distributions import Normal
    from flowjax.flows import coupling_flow

    # flowjax's knots are the interior knots: bins - 1 of them give ``bins`` bins
    transformer = Affine() if family == "affine" else RationalQuadraticSpline(
        knots=bins - 1, interval=bound)  # fmt: skip
    return coupling_flow(
        jax.random.key(seed), base_dist=Normal(jnp.zeros(dim)), transformer=transformer,
        flow_layers=layers, nn_width=hidden[0], nn_depth=len(hidden),
    )  # fmt: skip


def n_params(model) -> int:
    if isinstance(model, nnx.Module):
        return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    import equinox as eqx
    import paramax

    trainable = eqx.filter(
        model, eqx.is_inexact_array, is_leaf=lambda leaf: isinstance(leaf, paramax.NonTrainable)
    )
    return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(trainable))


_OPTIMIZERS: dict = {}


def optimizer(lr: float = 1e-3, clip: float | None = None, wd: float = 0.0):
    """One optax object per setting (both libraries' compiled steps are cached by it)."""
    key = (lr, clip, wd)
    if key not in _OPTIMIZERS:
        if clip is None and wd == 0.0 and lr == 1e-3:
            tx = default_optimizer(lr)  # exactly what `invnet.fit` uses by default
        else:
            base = optax.adamw(lr, weight_decay=wd) if wd else optax.adam(lr)
            tx = optax.chain(optax.clip_by_global_norm(clip), base) if clip else base
        _OPTIMIZERS[key] = tx
    return _OPTIMIZERS[key]


def _batch(n_train: int) -> int:
    return max(1, min(BATCH, int(n_train * (1 - VAL)) // 2))


def _finish(model, log_prob, test, start, epochs):
    nll = -float(jnp.mean(log_prob(jnp.asarray(test))))
    return {"nll": nll if math.isfinite(nll) else float("nan"), "epochs": epochs,
            "seconds": time.perf_counter() - start, "params": n_params(model)}  # fmt: skip


def fit_invnet(family, train, test, *, tx, epochs, patience, cfg=None, seed=0):
    start = time.perf_counter()
    flow = invnet_model(family, train.shape[1], cfg, seed)
    history = invnet.fit(
        flow, train, optimizer=tx, epochs=epochs, batch_size=_batch(len(train)),
        validation=VAL, early_stopping=patience, progress=False, key=seed,
    )  # fmt: skip
    return _finish(flow, flow.log_prob, test, start, len(history.train_loss))


def fit_flowjax(family, train, test, *, tx, epochs, patience, seed=0, layers, hidden, bins, bound):
    from flowjax.train import fit_to_data

    start = time.perf_counter()
    flow = flowjax_model(family, train.shape[1], layers, hidden, bins, bound, seed)
    flow, losses = fit_to_data(
        jax.random.key(seed), flow, jnp.asarray(train), optimizer=tx, max_epochs=epochs,
        max_patience=patience, batch_size=_batch(len(train)), val_prop=VAL, show_progress=False,
    )  # fmt: skip
    return _finish(flow, flow.log_prob, test, start, len(losses["train"]))


def _reference_size():
    """Layers, hidden, bins and bound of invnet's defaults, which flowjax's models copy."""
    import inspect

    spline = inspect.signature(invnet.spline_flow).parameters
    affine = inspect.signature(invnet.affine_flow).parameters
    size = {k: spline[k].default for k in ("layers", "hidden", "bins", "bound")}
    assert affine["layers"].default == size["layers"] and affine["hidden"].default == size["hidden"]
    return {**size, **SIZE}


def run_model(model, train, test, *, tx, epochs, patience, seed, cfg=None):
    lib, family = model.split()
    if lib == "invnet":
        return fit_invnet(family, train, test, tx=tx, epochs=epochs, patience=patience,
                          cfg=cfg, seed=seed)  # fmt: skip
    return fit_flowjax(family, train, test, tx=tx, epochs=epochs, patience=patience, seed=seed,
                       **_reference_size())  # fmt: skip


# ---------------------------------------------------------------- ranks and tables


def mean_nll(rows, model, name):
    """Mean held-out NLL of ``model`` on set ``name`` over its split seeds: NaN where a split
    gave a non-finite NLL, None where the model has no row for the set."""
    values = [r["nll"] for r in rows if r["model"] == model and r["set"] == name]
    return float(np.mean(values)) if values else None


def ranks(rows, models, sets) -> dict[str, dict[str, float]]:
    """Per set, the rank of each model that has rows for it, by mean held-out NLL (1 = best,
    ties share, a non-finite NLL ranks last)."""
    out = {m: {} for m in models}
    for name in sets:
        present = [m for m in models if mean_nll(rows, m, name) is not None]
        nll = np.array([mean_nll(rows, m, name) for m in present], dtype=float)
        nll = np.where(np.isnan(nll), np.inf, nll)
        for m, v in zip(present, nll, strict=True):
            out[m][name] = float(np.sum(nll < v) + (np.sum(nll == v) + 1) / 2)
    return out


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def table(rows, models, sets, title) -> str:
    rk = ranks(rows, models, sets)
    lines = [
        f"**{title}** (held-out NLL, nats/row, mean over split seeds; rank in brackets)",
        "",
        "| set (D) | " + " | ".join(models) + " |",
        "|---" * (len(models) + 1) + "|",
    ]
    for name in sets:
        dims = {r["dim"] for r in rows if r["set"] == name}
        if not dims:
            continue
        cells = [f"{_fmt(mean_nll(rows, m, name))} ({rk[m].get(name, float('nan')):g})"
                 for m in models]  # fmt: skip
        lines.append(f"| {name} ({dims.pop()}) | " + " | ".join(cells) + " |")
    means = [np.mean(list(rk[m].values())) if rk[m] else float("nan") for m in models]
    lines.append("| **mean rank** | " + " | ".join(f"**{v:.2f}**" for v in means) + " |")
    return "\n".join(lines)


def gaps(rows, sets):
    """invnet minus flowjax mean NLL per set (positive = invnet behind)."""
    out = {}
    for family in ("affine", "spline"):
        out[family] = {
            s: mean_nll(rows, f"invnet {family}", s) - mean_nll(rows, f"flowjax {family}", s)
            for s in sets
            if mean_nll(rows, f"invnet {family}", s) is not None
            and mean_nll(rows, f"flowjax {family}", s) is not None
        }
    return out


# ---------------------------------------------------------------- the search

# One factor at a time from the previous defaults (affine: Permute mixing, clamp 2, relu, no
# ActNorm; spline: Permute, bound 3, 8 bins, relu, no ActNorm; both a standard normal base
# until the base search; Adam 1e-3): builder arguments
# ("arch") and optimizer settings ("opt", applied to both invnet families).
# Bounded by this machine (2 shared CPU cores). Labels are relative to the previous defaults
# (`BEFORE`); "{}" is the previous default itself. The runs recorded in the results files
# went in this order and were stopped where the clock ran out (see the docs page).
BEFORE = {"affine": {"mixing": "permute", "activation": "relu", "base": "normal"},
          "spline": {"base": "normal"}}  # fmt: skip
SEARCH = {
    "affine": [{}, {"activation": "tanh"}, {"mixing": "alternate", "activation": "tanh"},
               {"mixing": "alternate"}, {"mixing": "lu"}, {"clamp": 5.0}, {"actnorm": True},
               # 2026-12-07, from the defaults then (tanh + alternate): the base, activations
               {"mixing": "alternate", "activation": "tanh", "base": "student"},
               {"mixing": "alternate", "activation": "gelu"},
               {"mixing": "alternate", "activation": "silu"},
               {"mixing": "alternate", "activation": "tanh", "clamp": 3.0}],
    "spline": [{}, {"mixing": "alternate"}, {"bound": 5.0}, {"mixing": "lu"},
               {"mixing": "alternate", "bound": 5.0}, {"activation": "tanh"}, {"actnorm": True},
               {"base": "student"}],
    "opt": [{}, {"clip": 1.0}],
}  # fmt: skip
# The search's outcome: the label of each protocol model's configuration in the search files
# (the flowjax models are the same in both).
CHOSEN = {
    "invnet affine": "invnet affine "
    + json.dumps({"activation": "tanh", "base": "student", "mixing": "alternate"}),
    "invnet spline": 'invnet spline {"base": "student"}',
    "flowjax affine": "flowjax affine",
    "flowjax spline": "flowjax spline",
}


def search(args) -> dict:
    """Every configuration on the tuning group (``args.seeds``), ranked against each other
    and flowjax's two models; rows are appended to ``args.out``.jsonl as they finish."""
    log = Path(f"{args.out}.jsonl")
    done = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    seen = {(r["model"], r["set"], r["seed"]) for r in done}
    rows = list(done)

    def record(model, name, seed, fn):
        if (model, name, seed) in seen or args.table_only:
            return
        train, test = load(name, seed)
        row = {"set": name, "dim": train.shape[1], "model": model, "seed": seed, **fn(train, test)}
        rows.append(row)
        with log.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)

    common = dict(epochs=args.epochs, patience=args.patience)
    jobs = [(f"flowjax {f}", None, None, f) for f in args.families if not args.invnet_only]
    for family in [] if args.flowjax_only else args.families:
        if args.configs is not None:  # a part of the search (to share it between processes)
            jobs += [(f"invnet {family} {json.dumps(c, sort_keys=True)}", c, {}, family)
                     for c in json.loads(args.configs)]  # fmt: skip
            continue
        jobs += [(f"invnet {family} {json.dumps(c, sort_keys=True)}", c, {}, family)
                 for c in SEARCH[family]]  # fmt: skip
        jobs += [(f"invnet {family} opt {json.dumps(o, sort_keys=True)}", {}, o, family)
                 for o in SEARCH["opt"][1:]]  # fmt: skip
    for model, cfg, opt, family in jobs:
        for name in args.sets:
            for seed in args.seeds:
                if cfg is None:
                    fn = lambda tr, te, f=family, s=seed: run_model(  # noqa: E731
                        f"flowjax {f}", tr, te, tx=optimizer(), seed=s, **common
                    )
                else:
                    fn = lambda tr, te, f=family, c=cfg, o=opt, s=seed: fit_invnet(  # noqa: E731
                        f, tr, te, tx=optimizer(**o), cfg={**BEFORE[f], **c}, seed=s, **common
                    )
                record(model, name, seed, fn)
    return rows


def search_table(rows, sets) -> str:
    """Per family: each configuration's mean rank over the tuning sets it finished (among the
    configurations that finished each set) and, for those that finished all of them, among
    themselves over all the tuning sets."""
    out = []
    for family in ("affine", "spline"):
        models = sorted({r["model"] for r in rows if r["model"].startswith(f"invnet {family}")})
        models += [m for m in (f"flowjax {family}",) if any(r["model"] == m for r in rows)]
        if not models:
            continue
        rk = ranks(rows, models, sets)
        complete = [m for m in models if len(rk[m]) == len(sets)]
        rc = ranks(rows, complete, sets)
        out += [
            f"**{family}** ({len(sets)} tuning sets, split seed 0)",
            "",
            "| configuration | sets finished | mean rank on its sets | mean rank among the "
            "complete ones | mean NLL on its sets |",
            "|---|---|---|---|---|",
        ]
        for m in sorted(models, key=lambda m: (-len(rk[m]), np.mean(list(rk[m].values())))):
            full = f"{np.mean(list(rc[m].values())):.2f}" if m in complete else "-"
            mean = np.mean([mean_nll(rows, m, s) for s in rk[m]])
            out.append(
                f"| {m} | {len(rk[m])} | {np.mean(list(rk[m].values())):.2f} | {full} | "
                f"{mean:.2f} |"
            )
        out.append("")
    return "\n".join(out)


# ---------------------------------------------------------------- main


def _cached(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def reused(files, chosen: dict[str, str]) -> list[dict]:
    """Rows of earlier search runs (JSONL) under the protocol's model names: ``chosen`` maps a
    protocol model to the search label of the same configuration."""
    labels = {v: k for k, v in chosen.items()}
    return [{**r, "model": labels[r["model"]], "reused_from": r["model"]}
            for f in files for r in _cached(Path(f)) if r["model"] in labels]  # fmt: skip


def protocol(args) -> list[dict]:
    """Every model on every set and split seed; rows are appended to ``args.out``.jsonl as
    they finish and a rerun with the same ``--out`` skips the ones already there."""
    log = Path(f"{args.out}.jsonl")
    rows = [
        r
        for r in _cached(log) + reused(args.reuse, CHOSEN)
        if r["model"] in args.models and r["set"] in args.sets and r["seed"] in args.seeds
    ]
    seen = {(r["model"], r["set"], r["seed"]) for r in rows}
    for seed in args.seeds:
        for name in args.sets:
            train, test = (None, None) if args.table_only else load(name, seed, n=args.n)
            for model in args.models:
                if (model, name, seed) in seen or args.table_only:
                    continue
                try:
                    tx = optimizer(args.lr, args.clip, args.wd)
                    result = run_model(
                        model, train, test, tx=tx, epochs=args.epochs, patience=args.patience,
                        seed=seed,
                    )  # fmt: skip
                except ImportError as exc:
                    print(f"{model}: skipped ({exc})", file=sys.stderr)
                    continue
                rows.append({"set": name, "dim": train.shape[1], "model": model, "seed": seed,
                             **result})  # fmt: skip
                if not args.smoke:
                    with log.open("a") as fh:
                        fh.write(json.dumps(rows[-1]) + "\n")
                print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", nargs="+", default=None, help="default: both groups")
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--patience", type=int, default=10)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--clip", type=float, default=None)
    parser.add_argument("--wd", type=float, default=0.0)
    parser.add_argument("--n", type=int, default=N_SYNTHETIC, help="rows of a synthetic set")
    parser.add_argument("--search", action="store_true", help="search invnet's defaults")
    parser.add_argument("--families", nargs="+", default=["affine", "spline"], help="search")
    parser.add_argument("--configs", default=None, help="search: a JSON list of builder options")
    parser.add_argument("--flowjax-only", action="store_true", help="search: the peers only")
    parser.add_argument("--invnet-only", action="store_true", help="search: invnet only")
    parser.add_argument(
        "--table-only", action="store_true", help="only the table of the rows so far"
    )
    parser.add_argument("--smoke", action="store_true", help="seconds: tiny sets, 2 epochs")
    parser.add_argument("--out", default=None, help="output stem (JSON + markdown)")
    parser.add_argument(
        "--reuse",
        nargs="*",
        default=[],
        help="search JSONL files whose rows of the chosen configurations count",
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.sets, args.seeds, args.epochs, args.patience, args.n = (
            args.sets or ["moons2"], [0], 2, 1, 200)  # fmt: skip
        if args.models == MODELS:  # one invnet and one flowjax model: a few seconds
            args.models = ["invnet spline", "flowjax spline"]
        SIZE.update(layers=2, hidden=(8,))
    tag = "search" if args.search else "smoke" if args.smoke else "protocol"
    args.out = args.out or str(RESULTS / f"quality_{tag}_{jax.default_backend()}")
    args.seeds = sorted(args.seeds)
    if args.search:
        args.sets = args.sets or TUNING
        rows = search(args)
        text = search_table(rows, args.sets)
    else:
        args.sets = args.sets or TUNING + HELD_OUT
        rows = protocol(args)
        tuning = [s for s in args.sets if s not in HELD_OUT]
        held = [s for s in args.sets if s in HELD_OUT]
        text = "\n\n".join(
            table(rows, args.models, sets, title)
            for sets, title in ((tuning, "Tuning group"), (held, "Held-out-of-tuning group"))
            if sets
        )
    env = _util.env_info("cpu" if jax.default_backend() == "cpu" else jax.default_backend())
    command = " ".join(argv if argv is not None else sys.argv[1:])
    header = (
        f"python benchmarks/quality.py {command} ({env['backend']}, {env['cpu_count']} cores, "
        f"float32, jax {env['jax']}; split seeds {args.seeds}, max epochs {args.epochs}, "
        f"patience {args.patience})"
    )
    print("\n" + header + "\n\n" + text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.md").write_text(header + "\n\n" + text + "\n")
    summary = {"env": env, "args": {k: v for k, v in vars(args).items()}, "rows": rows}
    if not args.search:
        summary["gaps"] = gaps(rows, args.sets)
    Path(f"{args.out}.json").write_text(json.dumps(summary, indent=1))
    return rows


if __name__ == "__main__":
    main()
