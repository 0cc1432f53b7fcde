"""Shared helpers for the benchmarks: timing, environment record, model builders."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp


def timeit(fn, *args, repeats: int = 7, min_time: float = 0.02) -> float:
    """Median seconds per call of ``fn(*args)`` (see `timeit_many`)."""
    return timeit_many([(fn, args)], repeats=repeats, min_time=min_time)[0]


def timeit_many(calls, *, repeats: int = 7, min_time: float = 0.02) -> list[float]:
    """Median seconds per call for each ``(fn, args)`` in ``calls``.

    Each function is compiled and warmed up first; then the timed samples of all functions
    are interleaved (fn1, fn2, ..., fn1, fn2, ...) so that a slow phase of a shared machine
    hits all of them alike. Each sample loops enough calls to last about ``min_time`` and
    ends with ``block_until_ready``; the result is the median over ``repeats`` samples.
    """
    inner = []
    for fn, args in calls:
        jax.block_until_ready(fn(*args))  # compile + warm up
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        inner.append(max(1, int(min_time / max(time.perf_counter() - t0, 1e-7))))
    samples: list[list[float]] = [[] for _ in calls]
    for _ in range(repeats):
        for k, (fn, args) in enumerate(calls):
            t0 = time.perf_counter()
            for _ in range(inner[k]):
                out = fn(*args)
            jax.block_until_ready(out)
            samples[k].append((time.perf_counter() - t0) / inner[k])
    return [statistics.median(s) for s in samples]


def env_info(device: str) -> dict[str, Any]:
    """Machine, device and versions, recorded with every result file."""
    import flax
    import numpy as np

    info: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "jax": jax.__version__,
        "jaxlib": getattr(jax.lib, "__version__", None) or _jaxlib_version(),
        "flax": flax.__version__,
        "numpy": np.__version__,
        "device_requested": device,
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "device_kind": jax.devices()[0].device_kind,
        "dtype": "float32",
    }
    try:
        import invnet

        info["invnet"] = invnet.__version__
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
        )
        info["git"] = rev.stdout.strip() or None
    except Exception:  # noqa: BLE001 - informational only
        pass
    return info


@contextlib.contextmanager
def jsonl_rows(name: str, argv: dict, results: str | Path | None = None):
    """Append a run's rows to ``<results>/<name>_<backend>.jsonl`` (default
    benchmarks/results/), after a header line with `env_info` and ``argv``; yields
    ``emit(row)``, which prints the row and writes it at once (a run stopped half way keeps
    its finished rows)."""
    env = env_info(jax.default_backend())
    results = Path(results) if results else Path(__file__).resolve().parent / "results"
    results.mkdir(exist_ok=True)
    out = results / f"{name}_{env['backend']}.jsonl"
    with out.open("a") as fh:
        fh.write(json.dumps({"env": env, "argv": argv}) + "\n")

        def emit(row: dict) -> None:
            print(json.dumps(row), flush=True)
            fh.write(json.dumps(row) + "\n")
            fh.flush()

        yield emit
    print(f"rows in {out}")


def _jaxlib_version() -> str | None:
    try:
        import jaxlib

        return jaxlib.__version__
    except Exception:  # noqa: BLE001
        return None


def perturb(model, scale: float = 0.1, seed: int = 1):
    """Move every parameter away from its (often identity) init, in place."""
    from flax import nnx

    params = nnx.state(model, nnx.Param)
    leaves = jax.tree.leaves(params)
    keys = iter(jax.random.split(jax.random.key(seed), len(leaves)))
    nnx.update(
        model,
        jax.tree.map(lambda p: p + scale * jax.random.normal(next(keys), p.shape, p.dtype), params),
    )
    return model


def build(kind: str, dim: int, depth: int = 4, seed: int = 0, hidden: int = 128):
    """The benchmark models: ``lu`` (one LULinear), ``lu_leaky`` (LU + LeakyReLU blocks),
    ``coupling`` (affine coupling + permutation blocks), ``lu_coupling`` (GLOW-like)."""
    from flax import nnx

    import invnet

    rngs = nnx.Rngs(seed)
    # LU factors are perturbed by 0.1 / sqrt(D) per entry: a fixed scale would make the
    # random triangular factors (and W) exponentially ill-conditioned as D grows
    lu_scale = 0.1 / dim**0.5
    if kind == "lu":
        return perturb(invnet.LULinear(dim, rngs=rngs), lu_scale, seed)
    blocks = []
    for _ in range(depth):
        if kind == "lu_leaky":
            blocks += [invnet.LULinear(dim, rngs=rngs), invnet.LeakyReLU(0.5)]
        elif kind == "coupling":
            blocks += [
                invnet.AffineCoupling(dim, hidden=(hidden, hidden), rngs=rngs),
                invnet.Permute(dim, rngs=rngs),
            ]
        elif kind == "lu_coupling":
            blocks += [
                invnet.LULinear(dim, rngs=rngs),
                invnet.AffineCoupling(dim, hidden=(hidden, hidden), rngs=rngs),
            ]
        else:
            raise ValueError(kind)
    return perturb(invnet.Sequential(*blocks), lu_scale if kind == "lu_leaky" else 0.05, seed)


def data(batch: int, dim: int, seed: int = 2, dtype=jnp.float32):
    return jax.random.normal(jax.random.key(seed), (batch, dim), dtype)


def rel_err(a, b) -> float:
    return float(jnp.max(jnp.abs(a - b)) / jnp.maximum(jnp.max(jnp.abs(b)), 1e-30))
