"""The fast path as users call it: sampling, densities, training steps, per-layer calls.

* ``flows``: `invnet.Flow.sample` / ``log_prob`` as a user calls them (compiled by default,
  `invnet._runtime`) vs the same flow hand-jitted (``nnx.split`` + ``jax.jit``) vs op by op
  (``invnet.eager()``); first-call times (compilation included) of both.
* ``layers``: per layer, `invnet.freeze` (``forward`` and the y-only ``apply``) vs a plain
  ``jax.jit`` of the layer, and the layer's own ``forward`` / ``__call__`` (compiled by
  default); the dispatch overhead on a tiny model; the LU inverse with the bias subtracted
  before the GEMM vs folded after it (speed and error).
* ``flow_peers``: a RealNVP-style affine-coupling flow of the same size in invnet, distrax
  and flowjax (each library's own layers, its own random weights): sampling, log-density and
  one Adam training step (maximum likelihood), all jitted; skipped with a message when the
  peers do not import.

Run by ``benchmarks/run.py --only flows layers flow_peers``.
"""

from __future__ import annotations

import time

import _util
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import invnet
from invnet.demo import build_flow


def _first_call(fn, *args) -> float:
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - t0


def _flow(dim, blocks, hidden):
    return _util.perturb(build_flow(dim, blocks=blocks, hidden=hidden), 0.05)


def _flow_fns(flow, n, dim):
    """Hand-jitted sample and log-prob of ``flow``, and its eager (op by op) ones."""
    graphdef, _ = nnx.split(flow)

    @jax.jit
    def hand_sample(s, k):
        return nnx.merge(graphdef, s).inverse(jax.random.normal(k, (n, dim)))[0]

    hand_log_prob = jax.jit(lambda s, v: nnx.merge(graphdef, s).log_prob(v))

    def eager_sample(k):
        with invnet.eager():
            return flow.sample(k, n)

    def eager_log_prob(v):
        with invnet.eager():
            return flow.log_prob(v)

    return hand_sample, hand_log_prob, eager_sample, eager_log_prob


def flows(cfg, args):
    rows = []
    n, blocks, hidden = cfg["flow_n"], cfg["flow_blocks"], cfg["flow_hidden"]
    for dim in cfg["flow_dims"]:
        flow = _flow(dim, blocks, hidden)
        key, x = jax.random.key(0), _util.data(n, dim)
        graphdef, state = nnx.split(flow)

        hand_sample, hand_log_prob, eager_sample, eager_log_prob = _flow_fns(flow, n, dim)

        first = {
            "sample": (_first_call(flow.sample, key, n), _first_call(hand_sample, state, key)),
            "log_prob": (_first_call(flow.log_prob, x), _first_call(hand_log_prob, state, x)),
        }
        calls = [
            (flow.sample, (key, n)),
            (hand_sample, (state, key)),
            (flow.log_prob, (x,)),
            (hand_log_prob, (state, x)),
        ]
        if dim <= cfg["eager_max_dim"]:
            calls += [(eager_sample, (key,)), (eager_log_prob, (x,))]
        t = _util.timeit_many(calls, repeats=cfg["repeats"]) + [float("nan")] * 2
        err = _util.rel_err(flow.sample(key, n), hand_sample(state, key))
        for i, call in enumerate(("sample", "log_prob")):
            rows.append(
                {
                    "call": f"flow.{call}",
                    "model": f"AffineCoupling x{blocks} (hidden {hidden}x2)",
                    "dim": dim,
                    "n": n,
                    "default_ms": t[2 * i] * 1e3,
                    "hand_jit_ms": t[2 * i + 1] * 1e3,
                    "default/hand_jit": t[2 * i] / t[2 * i + 1],
                    "eager_ms": t[4 + i] * 1e3,
                    "first_call_default_s": first[call][0],
                    "first_call_hand_jit_s": first[call][1],
                    "max_rel_diff": err if call == "sample" else None,
                }
            )
        print(f"  flows D={dim} n={n} done", flush=True)
    return rows, None


def _layers(dim):
    r = nnx.Rngs(0)
    return {
        "LULinear": _util.build("lu", dim),
        "LeakyReLU": invnet.LeakyReLU(0.5),
        "AffineCoupling": _util.perturb(
            invnet.AffineCoupling(dim, hidden=(dim, dim), rngs=r), 0.05
        ),
    }


def layers(cfg, args):
    rows = []
    for dim in cfg["layer_dims"]:
        batch = max(16, min(cfg["batch"], cfg["max_elems"] // dim))
        x = _util.data(batch, dim)
        for name, layer in _layers(dim).items():
            graphdef, state = nnx.split(layer)
            jit_fwd = jax.jit(lambda s, v, g=graphdef: nnx.merge(g, s).forward(v))
            jit_apply = jax.jit(lambda s, v, g=graphdef: nnx.merge(g, s)(v))
            jit_inv = jax.jit(lambda s, v, g=graphdef: nnx.merge(g, s).inverse(v)[0])
            fast = invnet.freeze(layer)
            y = fast.apply(x)
            calls = {
                "jit forward (y, log-det)": (jit_fwd, (state, x)),
                "compiled forward (y, log-det)": (fast.forward, (x,)),
                "layer.forward (default)": (layer.forward, (x,)),
                "jit y only": (jit_apply, (state, x)),
                "compiled apply (y only)": (fast.apply, (x,)),
                "layer(x) (default)": (layer, (x,)),
                "jit inverse x only": (jit_inv, (state, y)),
                "compiled apply_inverse": (fast.apply_inverse, (y,)),
            }
            times = _util.timeit_many(list(calls.values()), repeats=cfg["repeats"])
            t = dict(zip(calls, times, strict=True))
            row = {"layer": name, "dim": dim, "batch": batch}
            row.update({f"{k} ms": v * 1e3 for k, v in t.items()})
            row["compiled/jit forward"] = (
                t["compiled forward (y, log-det)"] / t["jit forward (y, log-det)"]
            )
            row["compiled/jit y only"] = t["compiled apply (y only)"] / t["jit y only"]
            row["compiled/jit inverse"] = t["compiled apply_inverse"] / t["jit inverse x only"]
            rows.append(row)
        print(f"  layers D={dim} batch={batch} done", flush=True)
    rows.append(_overhead(cfg))
    rows += _bias_epilogue(cfg)
    return rows, None


def _overhead(cfg):
    """Per-call cost of the compiled-by-default dispatch on a tiny model (batch 16)."""
    flow = _flow(8, 4, 16)
    x = _util.data(16, 8)
    graphdef, state = nnx.split(flow)
    hand = jax.jit(lambda s, v: nnx.merge(graphdef, s).forward(v))
    t_default, t_hand = _util.timeit_many(
        [(flow.forward, (x,)), (hand, (state, x))], repeats=cfg["repeats"]
    )
    return {
        "layer": "dispatch overhead: AffineCoupling x4 flow, D=8, batch 16",
        "model.forward (default) us": t_default * 1e6,
        "hand jit us": t_hand * 1e6,
        "overhead us": (t_default - t_hand) * 1e6,
    }


def _bias_epilogue(cfg):
    """x = (y - b) W^-1^T (what LULinear.inverse_prepared does) vs y W^-1^T - W^-1 b (the
    bias folded after the GEMM, as the forward's): time, and error at two conditions."""
    rows = []
    dim = cfg["layer_dims"][-1]
    batch = max(16, min(cfg["batch"], cfg["max_elems"] // dim))
    rng = np.random.default_rng(0)
    for kappa in (1.0, 1e4):
        q1, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
        q2, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
        w = (q1 * np.logspace(0, -np.log10(kappa), dim)) @ q2.T
        b = rng.standard_normal(dim) * 3
        w_inv = np.linalg.inv(w)
        x = rng.standard_normal((batch, dim))
        y = jnp.asarray(x @ w.T + b, jnp.float32)
        w_inv32, b32 = jnp.asarray(w_inv, jnp.float32), jnp.asarray(b, jnp.float32)
        folded = jnp.asarray(w_inv @ b, jnp.float32)
        with jax.default_matmul_precision("highest"):
            before = jax.jit(lambda v, b=b32, m=w_inv32: (v - b) @ m.T)
            after = jax.jit(lambda v, f=folded, m=w_inv32: v @ m.T - f)
            t_b, t_a = _util.timeit_many([(before, (y,)), (after, (y,))], repeats=cfg["repeats"])
            errs = [float(np.abs(np.asarray(f(y), np.float64) - x).max() / np.abs(x).max())
                    for f in (before, after)]  # fmt: skip
        rows.append(
            {
                "layer": f"LU inverse bias, D={dim}, cond {kappa:g}",
                "dim": dim,
                "batch": batch,
                "bias before GEMM ms": t_b * 1e3,
                "bias after GEMM ms": t_a * 1e3,
                "bias before GEMM rel err": errs[0],
                "bias after GEMM rel err": errs[1],
            }
        )
    return rows
