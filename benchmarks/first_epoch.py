"""Time to first step: `invnet.fit`'s first epoch against a hand-jitted optax step.

Both run in one process on the same model structure (by default example 06's Glow,
``invnet.glow((8, 8, 1), levels=2, steps=4, hidden=32)``), the same data (256 images) and
batch size (64, so 4 steps per epoch):

* ``fit``: ``invnet.fit(model, x, epochs=1, batch_size=64)`` wall time: data checks,
  ActNorm initialisation, compilation and the 4 steps (``History.compile_seconds`` says
  how much of it was compilation where `fit` records it);
* ``hand``: ``nnx.split`` + ``jax.jit`` of one ``value_and_grad`` + ``optax.adam`` step of
  another model of the same structure (ActNorm initialised from the same data first, not
  timed), called 4 times: compile plus 4 steps.

``fit`` runs first (``--hand-first``: second), so it also pays the process's one-off
warm-up. Wall and CPU seconds (``time.process_time``, all threads) are both reported: on a
machine shared with other jobs the load drifts between the two measurements, and CPU time
is the steadier of the two. The persistent compilation cache is off for both unless
``--cache DIR``. Prints both times, the ratio fit/hand (target: at most 2) and the load
average (a shared machine: the ratio is what to compare, one process, one load).

    nice -n 10 python benchmarks/first_epoch.py [--model glow|coupling] [--epochs 2]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import invnet
from invnet.layers.norm import data_init


def _model(kind: str, seed: int):
    rngs = nnx.Rngs(seed)
    if kind == "glow":
        return invnet.glow((8, 8, 1), levels=2, steps=4, hidden=32, rngs=rngs), (8, 8, 1)
    from invnet.demo import build_flow

    return build_flow(8, blocks=4, hidden=64), (8,)


def _hand_step_seconds(model, x, batch_size: int, steps: int) -> float:
    """Compile plus ``steps`` calls of a hand-jitted optax Adam step (maximum likelihood)."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.adam(1e-3)
    objective = invnet.MaximumLikelihood()

    @jax.jit
    def step(params, opt_state, batch):
        def loss_fn(p):
            return objective(nnx.merge(graphdef, p, rest), {"x": batch})

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    t0, c0 = time.perf_counter(), time.process_time()
    opt_state = tx.init(params)
    for i in range(steps):
        params, opt_state, loss = step(params, opt_state, x[i * batch_size : (i + 1) * batch_size])
    jax.block_until_ready(loss)
    return time.perf_counter() - t0, time.process_time() - c0


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("glow", "coupling"), default="glow")
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=1, help="fit epochs (the first is timed)")
    parser.add_argument("--cache", default=None, help="persistent compilation cache directory")
    parser.add_argument("--json", default=None, help="write the result here too")
    parser.add_argument("--hand-first", action="store_true", help="time the hand step first")
    args = parser.parse_args(argv)
    if args.cache:
        jax.config.update("jax_compilation_cache_dir", args.cache)
    else:
        jax.config.update("jax_enable_compilation_cache", False)

    load_before = os.getloadavg()
    model, event = _model(args.model, 0)
    x = np.asarray(jax.random.normal(jax.random.key(0), (args.n, *event)), np.float32)

    def run_fit():
        t0, c0 = time.perf_counter(), time.process_time()
        history = invnet.fit(model, x, epochs=args.epochs, batch_size=args.batch_size,
                             progress=False)  # fmt: skip
        return history, time.perf_counter() - t0, time.process_time() - c0

    def run_hand():
        other, _ = _model(args.model, 1)
        data_init(other, jnp.asarray(x))
        steps = args.n // args.batch_size
        return _hand_step_seconds(other, jnp.asarray(x), args.batch_size, steps)

    if args.hand_first:
        hand, hand_cpu = run_hand()
        history, fit_total, fit_cpu = run_fit()
    else:
        history, fit_total, fit_cpu = run_fit()
        hand, hand_cpu = run_hand()
    fit_first = history.epoch_seconds[0]

    result = {
        "model": args.model,
        "fit_call_seconds": round(fit_total, 2),
        "fit_first_epoch_seconds": round(fit_first, 2),
        "fit_compile_seconds": getattr(history, "compile_seconds", None),
        "fit_later_epoch_seconds": [round(s, 3) for s in history.epoch_seconds[1:]],
        "hand_compile_plus_steps_seconds": round(hand, 2),
        "ratio_fit_call_over_hand": round(fit_total / hand, 2),
        "fit_call_cpu_seconds": round(fit_cpu, 2),
        "hand_cpu_seconds": round(hand_cpu, 2),
        "ratio_cpu_fit_over_hand": round(fit_cpu / hand_cpu, 2),
        "order": "hand, fit" if args.hand_first else "fit, hand",
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "cpu_count": os.cpu_count(),
        "dtype": "float32",
        "jax": jax.__version__,
    }
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
