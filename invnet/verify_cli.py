"""``invnet verify PATH``: verify a model saved with `invnet.save` from the command line.

Exit codes: 0 the model passes, 1 it fails, 2 the input is unusable (missing or corrupt model
file, unreadable data, wrong shape); the reason is one line on stderr.
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["add_parser", "run"]


class _Unusable(Exception):
    """Input that cannot be verified; the message is printed and the exit code is 2."""


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "verify",
        help="check a saved model: round trips, per-layer errors, log-dets, conditioning",
        description=(
            "Verify a model saved with invnet.save. Exit code 0: passes; 1: fails; "
            "2: unusable input (message on stderr)."
        ),
    )
    parser.add_argument("path", help="model file written by invnet.save")
    parser.add_argument(
        "--data", help=".npy array of inputs, shape (N, D); default: standard-normal draws"
    )
    parser.add_argument(
        "--cond",
        help=".npy conditions of a conditional model, (N, cond_dim) or (cond_dim,)",
    )
    parser.add_argument(
        "--samples",
        type=int,
        default=None,
        help="samples to draw without --data (default 256); with --data, use the first N rows",
    )
    parser.add_argument("--tol", type=float, default=None, help="relative round-trip tolerance")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--seed", type=int, default=0, help="seed of the drawn inputs")
    parser.add_argument("--jacobian-samples", type=int, default=8)
    parser.add_argument("--no-float64", action="store_true", help="skip the float64 re-run")
    parser.set_defaults(func=run)
    return parser


def _load_array(path: str, what: str):
    import numpy as np

    try:
        arr = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise _Unusable(f"{what} file not found: {path}") from None
    except (OSError, ValueError) as err:
        raise _Unusable(f"{what} file {path} is not a readable .npy array ({err})") from None
    if not isinstance(arr, np.ndarray):
        raise _Unusable(f"{what} file {path} holds several arrays (.npz); save one with np.save")
    if arr.dtype.kind in "iub":
        arr = arr.astype(np.float32)
    if arr.dtype.kind != "f":
        raise _Unusable(f"{what} file {path} has dtype {arr.dtype}; expected real numbers")
    return arr


def _model_float_type(model):
    """The dtype the saved model computes in: that of its parameters (float32 or float64)."""
    import jax
    import numpy as np
    from flax import nnx

    dtypes = {np.dtype(a.dtype) for a in jax.tree.leaves(nnx.state(model, nnx.Param))}
    if np.dtype(np.float64) in dtypes and jax.config.read("jax_enable_x64"):
        return np.float64
    return np.float32


def _inputs(args):
    import jax
    import numpy as np

    import invnet

    try:
        model = invnet.load(args.path)
    except FileNotFoundError:
        raise _Unusable(f"model file not found: {args.path}") from None
    except (OSError, ValueError) as err:
        raise _Unusable(str(err).replace("\n", " ")) from None
    if args.samples is not None and args.samples < 1:
        raise _Unusable(f"--samples must be >= 1, got {args.samples}")
    float_type = _model_float_type(model)
    if args.data is not None:
        x = _load_array(args.data, "data")
        if x.ndim == 1 and model.dim is not None and x.shape[0] == model.dim:
            x = x[None]
        if x.ndim < 2 or x.shape[0] == 0:
            raise _Unusable(f"data must have shape (N, D), got {x.shape}")
        if model.dim is not None and x.shape[-1] != model.dim:
            raise _Unusable(
                f"data has shape {x.shape} but the model maps vectors of size {model.dim}"
            )
        x = x.reshape(-1, x.shape[-1])
        if args.samples is not None:
            x = x[: args.samples]
    else:
        if model.dim is None:
            raise _Unusable(
                "the model has no fixed input size (elementwise layers only); pass --data"
            )
        n = 256 if args.samples is None else args.samples
        x = np.asarray(jax.random.normal(jax.random.key(args.seed), (n, model.dim)))
    x = x.astype(float_type)
    cond = None
    if model.cond_dim:
        if args.cond is None:
            raise _Unusable(
                f"the model is conditional (cond_dim={model.cond_dim}); pass --cond FILE.npy"
            )
        cond = _load_array(args.cond, "cond").astype(float_type)
        if cond.shape != (model.cond_dim,) and cond.shape != (len(x), model.cond_dim):
            if cond.ndim == 2 and cond.shape[1] == model.cond_dim and len(cond) >= len(x):
                cond = cond[: len(x)]
            else:
                raise _Unusable(
                    f"cond has shape {cond.shape}; expected ({len(x)}, {model.cond_dim}) or "
                    f"({model.cond_dim},)"
                )
    return model, x, cond


def run(args: argparse.Namespace) -> int:
    from invnet.verification import verify

    try:
        model, x, cond = _inputs(args)
        report = verify(
            model,
            x,
            cond=cond,
            tol=args.tol,
            jacobian_samples=args.jacobian_samples,
            check_float64=not args.no_float64,
        )
    except _Unusable as err:
        print(f"invnet verify: error: {err}", file=sys.stderr)
        return 2
    except (TypeError, ValueError) as err:
        print(f"invnet verify: error: {str(err).splitlines()[0]}", file=sys.stderr)
        return 2
    print(report.to_json() if args.json else report.table())
    return 0 if report.ok else 1
