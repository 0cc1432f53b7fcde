"""The benchmark sections run by ``benchmarks/run.py``; each returns ``(rows, skipped)``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import _util
import jax
import jax.numpy as jnp
import optax
from flax import nnx

import invnet
from invnet.core import PRECISIONS

HERE = Path(__file__).resolve().parent


class Skip(Exception):
    """A section that cannot run here (the message says why)."""


def _batch(cfg, dim):
    return max(16, min(cfg["batch"], cfg["max_elems"] // dim))


def _jit_fns(model):
    graphdef, state = nnx.split(model)
    fwd = jax.jit(lambda s, x: nnx.merge(graphdef, s).forward(x))
    inv = jax.jit(lambda s, y: nnx.merge(graphdef, s).inverse(y))
    ld = jax.jit(lambda s, x: nnx.merge(graphdef, s).forward(x)[1])
    return (
        lambda x: fwd(state, x),
        lambda y: inv(state, y),
        lambda x: ld(state, x),
    )


def _rows_for(name, model_desc, dim, batch, precision, variants, x, y, repeats):
    """Time every variant's forward, inverse and log-det (interleaved) and check errors."""
    calls, index = [], []
    for label, (fwd, inv, ld) in variants.items():
        for kind, fn, arg in (("forward", fwd, x), ("inverse", inv, y), ("log_det", ld, x)):
            if fn is not None:
                calls.append((fn, (arg,)))
                index.append((label, kind))
    times = _util.timeit_many(calls, repeats=repeats)
    t = dict(zip(index, times, strict=True))
    rows = []
    for label, (_fwd, inv, _ld) in variants.items():
        row = {
            "section": name,
            "model": model_desc,
            "dim": dim,
            "batch": batch,
            "precision": precision,
            "method": label,
            "forward_ms": t.get((label, "forward"), float("nan")) * 1e3,
            "inverse_ms": t.get((label, "inverse"), float("nan")) * 1e3,
            "log_det_ms": t.get((label, "log_det"), float("nan")) * 1e3,
        }
        # round trip through the variant's own forward; methods without one invert the
        # given y (computed by the compiled forward: one GEMM by the float64-formed W)
        y_own = _fwd(x)[0] if _fwd is not None else y
        row["roundtrip_rel_err"] = _util.rel_err(inv(y_own)[0], x) if inv is not None else None
        rows.append(row)
    # methods without a forward of their own (naive inverses, refinement) are compared with
    # the fastest forward measured at this size
    fastest = min(r["forward_ms"] for r in rows if r["forward_ms"] == r["forward_ms"])
    for row in rows:
        own = row["forward_ms"] == row["forward_ms"]
        row["inverse/forward"] = row["inverse_ms"] / (row["forward_ms"] if own else fastest)
    return rows


def _naive_inverse(layer, kind: str, precision: str):
    """Inverse by forming the dense W and solving (or pinv-ing) it on every call."""
    graphdef, state = nnx.split(layer)
    prec = PRECISIONS[precision]

    @jax.jit
    def f(s, v):
        m = nnx.merge(graphdef, s)
        w, b = m.weight(), m._bias(v.dtype)
        with jax.default_matmul_precision(prec):
            if kind == "solve":
                out = jnp.linalg.solve(w, (v - b).T).T
            else:
                out = (v - b) @ jnp.linalg.pinv(w).T
        return out, -m._log_det(v)

    return lambda v: f(state, v)


def lu(cfg, args):
    rows = []
    for dim in cfg["lu_dims"]:
        batch = _batch(cfg, dim)
        layer = invnet.set_precision(_util.build("lu", dim), args.precision)
        x = _util.data(batch, dim)
        jit_f, jit_i, jit_l = _jit_fns(layer)
        fast = invnet.freeze(layer)
        y = fast.forward(x)[0]
        refined = invnet.freeze(layer, lu_inverse="matrix+refine")
        variants = {
            "jit (2 triangular solves)": (jit_f, jit_i, jit_l),
            "compiled (matrix)": (fast.forward, fast.inverse, fast.log_det),
            "compiled (matrix+refine)": (None, refined.inverse, None),
        }
        if dim <= cfg["naive_max_dim"]:
            variants["naive: jnp.linalg.solve per call"] = (
                None,
                _naive_inverse(layer, "solve", args.precision),
                None,
            )
            variants["naive: pinv per call"] = (
                None,
                _naive_inverse(layer, "pinv", args.precision),
                None,
            )
        rows += _rows_for(
            "lu", "LULinear", dim, batch, args.precision, variants, x, y, cfg["repeats"]
        )
        print(f"  lu D={dim} batch={batch} done", flush=True)
    return rows, None


def models(cfg, args):
    rows = []
    for kind, desc in (
        ("lu_leaky", "LU+LeakyReLU x{d}"),
        ("coupling", "AffineCoupling+Permute x{d}"),
    ):
        for dim in cfg["models_dims"]:
            batch = _batch(cfg, dim)
            model = invnet.set_precision(
                _util.build(kind, dim, cfg["depth"], hidden=cfg["hidden"]), args.precision
            )
            x = _util.data(batch, dim)
            jit_f, jit_i, jit_l = _jit_fns(model)
            fast = invnet.freeze(model)
            y = fast.forward(x)[0]
            variants = {
                "jit (layers as written)": (jit_f, jit_i, jit_l),
                "compiled": (fast.forward, fast.inverse, fast.log_det),
            }
            if dim <= cfg["eager_max_dim"]:
                variants["eager (no jit)"] = (
                    model.forward,
                    model.inverse,
                    lambda v, m=model: m.forward(v)[1],
                )
            rows += _rows_for(
                "models",
                desc.format(d=cfg["depth"]),
                dim,
                batch,
                args.precision,
                variants,
                x,
                y,
                cfg["repeats"],
            )
            print(f"  {kind} D={dim} batch={batch} done", flush=True)
    return rows, None


def gd(cfg, args):
    """Exact inverse vs gradient-descent reconstruction of the input."""
    dim = 64 if not args.tiny else 8
    batch = 256 if not args.tiny else 16
    model = invnet.set_precision(_util.build("lu_leaky", dim, 2), args.precision)
    x_true = _util.data(batch, dim)
    fast = invnet.freeze(model)
    y = fast.forward(x_true)[0]
    graphdef, state = nnx.split(model)
    steps = cfg["gd_steps"]
    tx = optax.adam(0.05)

    @jax.jit
    def reconstruct(s, y):
        def loss(x):
            return jnp.sum((nnx.merge(graphdef, s).forward(x)[0] - y) ** 2)

        def body(_, carry):
            x, opt = carry
            g = jax.grad(loss)(x)
            upd, opt = tx.update(g, opt, x)
            return optax.apply_updates(x, upd), opt

        x0 = jnp.zeros_like(y)
        return jax.lax.fori_loop(0, steps, body, (x0, tx.init(x0)))[0]

    t_exact, t_gd = _util.timeit_many(
        [(fast.inverse, (y,)), (reconstruct, (state, y))], repeats=cfg["repeats"]
    )
    rows = [
        {
            "method": "exact inverse (compiled)",
            "dim": dim,
            "batch": batch,
            "time_ms": t_exact * 1e3,
            "rel_err": _util.rel_err(fast.inverse(y)[0], x_true),
        },
        {
            "method": f"gradient descent (Adam lr=0.05, {steps} steps, jitted)",
            "dim": dim,
            "batch": batch,
            "time_ms": t_gd * 1e3,
            "rel_err": _util.rel_err(reconstruct(state, y), x_true),
        },
    ]
    rows[1]["slowdown_vs_exact"] = t_gd / t_exact
    return rows, None


def accuracy(cfg, args):
    import inverse_accuracy

    return inverse_accuracy.measure(cfg["acc_dim"], 512 if not args.tiny else 32), None


def precision(cfg, args):
    dim = cfg["prec_dim"]
    batch = _batch(cfg, dim)
    x = _util.data(batch, dim)
    rows, skipped = [], []
    ref = None
    for mode in PRECISIONS:
        if mode == "tf32x3" and jax.default_backend() != "gpu":
            skipped.append("tf32x3: needs an NVIDIA GPU (TF32 tensor cores)")
            continue
        model = invnet.set_precision(_util.build("lu_leaky", dim, cfg["depth"]), mode)
        fast = invnet.freeze(model)
        y = fast.forward(x)[0]
        if ref is None:
            ref = y  # "highest" comes first
        t_f, t_i = _util.timeit_many(
            [(fast.forward, (x,)), (fast.inverse, (y,))], repeats=cfg["repeats"]
        )
        rows.append(
            {
                "precision": mode,
                "model": f"LU+LeakyReLU x{cfg['depth']} (compiled)",
                "dim": dim,
                "batch": batch,
                "forward_ms": t_f * 1e3,
                "inverse_ms": t_i * 1e3,
                "inverse/forward": t_i / t_f,
                "roundtrip_rel_err": _util.rel_err(fast.inverse(y)[0], x),
                "forward_rel_diff_vs_highest": _util.rel_err(y, ref),
            }
        )
    if jax.default_backend() == "cpu":
        skipped.append("on CPU every mode computes in float32: XLA:CPU ignores the precision")
    return rows, "; ".join(skipped) or None


def reversible(cfg, args):
    import reversible_memory

    rows = reversible_memory.measure(
        cfg["rev_depths"], cfg["rev_dim"], cfg["rev_hidden"], cfg["rev_batch"], cfg["repeats"]
    )
    return rows, None


def peers(cfg, args):
    import peers as peers_mod

    dims = cfg["peer_dims"]

    def batch_for(dim):
        return _batch(cfg, dim)

    have = []
    for name in ("distrax", "flowjax"):
        try:
            __import__(name)
            have.append(name)
        except ImportError:
            pass
    if have:
        return peers_mod.measure(dims, batch_for, args.precision, cfg["repeats"]), None
    if not args.peers_python:
        raise Skip(
            "distrax and flowjax are not installed in this interpreter; install them "
            "(pip install -e '.[peers]') or pass --peers-python /path/to/python"
        )
    cmd = [
        args.peers_python,
        str(HERE / "peers.py"),
        "--dims",
        *map(str, dims),
        "--batch",
        str(cfg["batch"]),
        "--max-elements",
        str(cfg["max_elems"]),
        "--precision",
        args.precision,
        "--repeats",
        str(cfg["repeats"]),
    ]
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")])
    )
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    sys.stderr.write(proc.stderr[-2000:])
    if proc.returncode != 0:
        raise Skip(
            f"{args.peers_python} peers.py failed (rc={proc.returncode}): "
            f"{proc.stderr.strip().splitlines()[-1:]}"
        )
    return json.loads(proc.stdout.strip().splitlines()[-1]), None


def flows(cfg, args):
    import flows as flows_mod

    return flows_mod.flows(cfg, args)


def layers(cfg, args):
    import flows as flows_mod

    return flows_mod.layers(cfg, args)


def flow_peers(cfg, args):
    import flow_peers as peers_mod

    return peers_mod.measure(
        cfg["flow_dims"],
        cfg["flow_n"],
        cfg["flow_batch"],
        cfg["flow_blocks"],
        cfg["flow_hidden"],
        cfg["repeats"],
    )
