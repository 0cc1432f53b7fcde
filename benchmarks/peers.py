"""One LU linear layer in distrax and flowjax versus invnet, with the same weights.

The layer is ``y = L U x + b`` (L unit lower, U upper with a positive diagonal, no
permutation: flowjax's TriangularAffine keeps its diagonal positive and neither peer has a
pivot), taken from an invnet `LULinear` built with ``init="identity"`` and perturbed, so
all three libraries compute the same map.

* distrax: ``LowerUpperTriangularAffine(matrix, bias)``; inverse: two triangular solves.
* flowjax: ``Chain([TriangularAffine(0, U, lower=False), TriangularAffine(b, L)])`` under
  ``jax.vmap``; inverse: two triangular solves.
* invnet: ``invnet.freeze(layer)`` (one GEMM each way).

Peer settings: JAX's own defaults for every library (no ``XLA_FLAGS``, thread or precision
setting), each peer's bijector as its documentation builds it, jitted with ``jax.jit``.

Run by ``benchmarks/run.py`` in-process when distrax/flowjax import, or in another
interpreter (``--peers-python``); alone: ``python benchmarks/peers.py --dims 64 256``
prints JSON rows.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _util  # noqa: E402

import invnet  # noqa: E402
from invnet.core import PRECISIONS  # noqa: E402


def available() -> dict[str, str | None]:
    """Which peers import here (name -> version, or None with the reason printed)."""
    found: dict[str, str | None] = {}
    for name in ("distrax", "flowjax"):
        try:
            mod = __import__(name)
            found[name] = getattr(mod, "__version__", "unknown")
        except Exception as exc:  # noqa: BLE001 - any import failure means "skip"
            print(
                f"peers: {name} not available here ({type(exc).__name__}: {exc}); skipped",
                file=sys.stderr,
            )
            found[name] = None
    return found


def _layer(dim: int):
    layer = invnet.LULinear(dim, init="identity", rngs=nnx.Rngs(0))
    _util.perturb(layer, 0.3 / np.sqrt(dim), seed=3)
    lower = jnp.tril(layer.lower[...], -1) + jnp.eye(dim)
    upper = jnp.triu(layer.upper[...], 1) + jnp.diag(jnp.exp(layer.log_scale[...]))
    return layer, lower, upper, layer.bias[...]


def _peer_fns(name: str, lower, upper, bias):
    if name == "distrax":
        import distrax

        matrix = jnp.tril(lower, -1) + upper
        bij = distrax.LowerUpperTriangularAffine(matrix, bias)
        return bij.forward_and_log_det, bij.inverse_and_log_det
    import paramax
    from flowjax.bijections import Chain, TriangularAffine

    bij = Chain(
        [
            TriangularAffine(jnp.zeros_like(bias), upper, lower=False),
            TriangularAffine(bias, lower, lower=True),
        ]
    )
    bij = paramax.unwrap(bij)
    return jax.vmap(bij.transform_and_log_det), jax.vmap(bij.inverse_and_log_det)


def measure(dims, batch_for, precision: str = "highest", repeats: int = 5) -> list[dict]:
    found = available()
    rows = []
    for dim in dims:
        batch = batch_for(dim)
        layer, lower, upper, bias = _layer(dim)
        x = _util.data(batch, dim)
        fast = invnet.freeze(invnet.set_precision(layer, precision))
        y_ref = fast.forward(x)[0]
        libs = {"invnet (compiled)": (fast.forward, fast.inverse)}
        for name, version in found.items():
            if version is not None:
                libs[f"{name} {version}"] = _peer_fns(name, lower, upper, bias)
        for lib, (fwd, inv) in libs.items():
            with jax.default_matmul_precision(PRECISIONS[precision]):
                # invnet.freeze is jitted already (and refuses to run inside another jit)
                own = lib.startswith("invnet")
                fwd_j, inv_j = (fwd, inv) if own else (jax.jit(fwd), jax.jit(inv))
                t_f, t_i = _util.timeit_many([(fwd_j, (x,)), (inv_j, (y_ref,))], repeats=repeats)
                y = fwd_j(x)[0]
                x_back = inv_j(y_ref)[0]
            rows.append(
                {
                    "lib": lib,
                    "dim": dim,
                    "batch": batch,
                    "precision": precision,
                    "forward_ms": t_f * 1e3,
                    "inverse_ms": t_i * 1e3,
                    "inverse/forward": t_i / t_f,
                    "forward_rel_diff_vs_invnet": _util.rel_err(y, y_ref),
                    "roundtrip_rel_err": _util.rel_err(x_back, x),
                }
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description="LU layer: invnet vs distrax vs flowjax")
    parser.add_argument("--dims", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument(
        "--max-elements",
        type=int,
        default=0,
        help="cap batch*dim (0: no cap) to keep big D affordable on CPU",
    )
    parser.add_argument("--precision", default="highest", choices=sorted(PRECISIONS))
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    def batch_for(dim):
        if args.max_elements:
            return max(64, min(args.batch, args.max_elements // dim))
        return args.batch

    rows = measure(args.dims, batch_for, args.precision, args.repeats)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
