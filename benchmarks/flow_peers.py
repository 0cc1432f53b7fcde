"""A RealNVP-style flow in invnet, distrax and flowjax: sampling, log-density, training step.

Each library builds the same architecture with its own layers and random weights: ``blocks``
affine couplings on ``D`` features (alternating halves), each conditioner an MLP with two
hidden layers of ``hidden`` units, a standard normal base.

* invnet: `invnet.demo.build_flow` (``AffineCoupling`` + reversal permutations);
  ``flow.sample`` / ``flow.log_prob`` as a user calls them (compiled by default); the training
  step is ``nnx.split`` + ``jax.jit`` of an Adam step on ``-mean(log_prob)``.
* distrax: ``MaskedCoupling`` with ``ScalarAffine(shift, log_scale=tanh(.))`` conditioned by
  a plain-JAX MLP, in a ``Chain`` under ``Transformed(MultivariateNormalDiag)``.
* flowjax: ``flowjax.flows.coupling_flow(transformer=Affine(), nn_depth=2)`` (its default
  ``invert=True``: density by the forward direction, samples by the inverse).

All calls are jitted with the parameters as arguments; times are medians after compilation.

Peer settings: distrax and flowjax run in invnet's process on JAX's own defaults (no
``XLA_FLAGS``, no thread or precision setting; ``benchmarks/run.py`` only picks the platform
with ``JAX_PLATFORMS``, for every library alike), jitted as their documentation does
(``jax.jit`` / ``eqx.filter_jit`` of a function of the parameters). Only the architecture is
set to match invnet's (flowjax: ``flow_layers``, ``nn_width``, ``nn_depth=2``; its
defaults otherwise, ``invert=True`` included; distrax has no flow builder: a standard
``MaskedCoupling`` + ``ScalarAffine`` chain).
"""

from __future__ import annotations

import _util
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from invnet.demo import build_flow


def _adam_step(loss):
    tx = optax.adam(1e-3)

    @jax.jit
    def step(params, opt_state, x):
        value, grads = jax.value_and_grad(loss)(params, x)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    return tx, step


def _invnet(dim, blocks, hidden, n):
    flow = _util.perturb(build_flow(dim, blocks=blocks, hidden=hidden), 0.05)
    graphdef, params, rest = nnx.split(flow, nnx.Param, ...)
    tx, step = _adam_step(lambda p, x: -jnp.mean(nnx.merge(graphdef, p, rest).log_prob(x)))
    return {
        "sample": (flow.sample, lambda key: (key, n)),
        "log_prob": (flow.log_prob, lambda x: (x,)),
        "train": (step, params, tx),
    }


def _mlp_init(key, sizes):
    keys = jax.random.split(key, len(sizes) - 1)
    return [
        (jax.random.normal(k, (a, b)) / jnp.sqrt(a), jnp.zeros(b))
        for k, a, b in zip(keys, sizes[:-1], sizes[1:], strict=True)
    ]


def _mlp(params, h):
    for w, b in params[:-1]:
        h = jax.nn.relu(h @ w + b)
    w, b = params[-1]
    return h @ w + b


def _distrax(dim, blocks, hidden, n):
    import distrax

    keys = jax.random.split(jax.random.key(0), blocks)
    params = [_mlp_init(k, [dim, hidden, hidden, 2 * dim]) for k in keys]
    mask = jnp.arange(dim) < dim // 2

    def make(params):
        layers = []
        for i, p in enumerate(params):

            def conditioner(x, p=p):
                return _mlp(p, x)

            def bijector(out):
                shift, log_scale = jnp.split(out, 2, axis=-1)
                return distrax.ScalarAffine(shift=shift, log_scale=jnp.tanh(log_scale))

            m = mask if i % 2 == 0 else ~mask
            layers.append(distrax.MaskedCoupling(m, conditioner, bijector))
        base = distrax.MultivariateNormalDiag(jnp.zeros(dim), jnp.ones(dim))
        return distrax.Transformed(base, distrax.Chain(layers))

    sample = jax.jit(lambda p, key: make(p).sample(seed=key, sample_shape=(n,)))
    log_prob = jax.jit(lambda p, x: make(p).log_prob(x))
    tx, step = _adam_step(lambda p, x: -jnp.mean(make(p).log_prob(x)))
    return {
        "sample": (sample, lambda key: (params, key)),
        "log_prob": (log_prob, lambda x: (params, x)),
        "train": (step, params, tx),
    }


def _flowjax(dim, blocks, hidden, n):
    import equinox as eqx
    import paramax
    from flowjax.bijections import Affine
    from flowjax.distributions import Normal
    from flowjax.flows import coupling_flow

    flow = coupling_flow(
        jax.random.key(0),
        base_dist=Normal(jnp.zeros(dim)),
        transformer=Affine(),
        flow_layers=blocks,
        nn_width=hidden,
        nn_depth=2,
    )
    params, static = eqx.partition(flow, eqx.is_inexact_array)

    def make(p):
        return paramax.unwrap(eqx.combine(p, static))

    sample = jax.jit(lambda p, key: make(p).sample(key, (n,)))
    log_prob = jax.jit(lambda p, x: make(p).log_prob(x))
    tx, step = _adam_step(lambda p, x: -jnp.mean(make(p).log_prob(x)))
    return {
        "sample": (sample, lambda key: (params, key)),
        "log_prob": (log_prob, lambda x: (params, x)),
        "train": (step, params, tx),
    }


def _available():
    found, missing = {}, []
    for name in ("distrax", "flowjax"):
        try:
            found[name] = __import__(name).__version__
        except Exception as exc:  # noqa: BLE001 - any import failure means "skip"
            missing.append(f"{name} ({type(exc).__name__}: {exc})")
    return found, missing


def measure(dims, n, batch, blocks, hidden, repeats):
    """Rows of (library, D, sample ms, log_prob ms, train step ms); and what was skipped."""
    found, missing = _available()
    builders = {"invnet": _invnet}
    if "distrax" in found:
        builders[f"distrax {found['distrax']}"] = _distrax
    if "flowjax" in found:
        builders[f"flowjax {found['flowjax']}"] = _flowjax
    rows = []
    key = jax.random.key(1)
    for dim in dims:
        x, xb = _util.data(n, dim), _util.data(batch, dim, seed=3)
        for lib, build in builders.items():
            fns = build(dim, blocks, hidden, n)
            step, params, tx = fns["train"]
            opt_state = tx.init(params)
            sample, sample_args = fns["sample"]
            log_prob, lp_args = fns["log_prob"]
            t = _util.timeit_many(
                [
                    (sample, sample_args(key)),
                    (log_prob, lp_args(x)),
                    (step, (params, opt_state, xb)),
                ],
                repeats=repeats,
            )
            rows.append(
                {
                    "lib": lib,
                    "dim": dim,
                    "n": n,
                    "train_batch": batch,
                    "sample_ms": t[0] * 1e3,
                    "log_prob_ms": t[1] * 1e3,
                    "train_step_ms": t[2] * 1e3,
                }
            )
        print(f"  flow peers D={dim} done", flush=True)
    skipped = "; ".join(f"{m}: not installed, skipped" for m in missing) or None
    return rows, skipped
