"""``invnet verify PATH``: verify a model saved with `invnet.save` from the command line.

Exit codes: 0 the model passes, 1 it fails, 2 the input is unusable (missing or corrupt model
file, unreadable data, wrong shape, ``--cond`` for an unconditional model); the reason is one
line on stderr, and with ``--json`` also a JSON object ``{"ok": false, "error": ..., "exit_code":
2}`` on stdout. ``--data`` and ``--cond`` take ``.npy`` files or ``.csv`` files (numbers
separated by commas, one sample per row, no header). Output piped into a reader that stops
early (``invnet verify m.invnet | head``) ends quietly.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

__all__ = ["add_parser", "run"]


class Unusable(Exception):
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
        "--data",
        help=".npy array of inputs (N, *event), or a .csv of rows (N, D); "
        "default: standard-normal draws",
    )
    parser.add_argument(
        "--cond",
        help=".npy or .csv conditions of a conditional model, (N, cond_dim) or (cond_dim,)",
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


def _read(path: str, what: str):
    """The array in ``path``: a ``.npy`` file, or a ``.csv`` (comma-separated numbers, one
    sample per row, no header) read with ``numpy.loadtxt``."""
    import numpy as np

    try:
        if path.lower().endswith(".csv"):
            try:
                return np.loadtxt(path, delimiter=",", ndmin=2)
            except ValueError as err:
                raise Unusable(
                    f"{what} file {path} is read as CSV (comma-separated numbers, one sample "
                    f"per row, no header) but could not be parsed: {str(err).splitlines()[0]}"
                ) from None
        return np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise Unusable(f"{what} file not found: {path}") from None
    except ValueError:  # numpy's words here ("pickled data") would mislead
        raise Unusable(
            f"{what} file {path} is not a .npy array written by numpy.save; pass a .npy file "
            "or a .csv file (comma-separated numbers, one sample per row)"
        ) from None
    except OSError as err:
        raise Unusable(f"{what} file {path} cannot be read ({err})") from None


def load_array(path: str, what: str):
    import numpy as np

    arr = _read(path, what)
    if not isinstance(arr, np.ndarray):
        raise Unusable(f"{what} file {path} holds several arrays (.npz); save one with np.save")
    if arr.dtype.kind in "iub":
        arr = arr.astype(np.float32)
    if arr.dtype.kind != "f":
        raise Unusable(f"{what} file {path} has dtype {arr.dtype}; expected real numbers")
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


def _load_model(path: str):
    from invnet.io import load

    try:
        return load(path)
    except FileNotFoundError:
        raise Unusable(f"model file not found: {path}") from None
    except (OSError, ValueError) as err:
        raise Unusable(str(err).replace("\n", " ")) from None


def _data(args, model):
    """Inputs ``(N, *event)``: from ``--data`` (shape checked by `invnet.verify` with the
    model's own messages) or standard-normal draws."""
    import jax
    import numpy as np

    pattern = model.event_pattern()
    if args.data is None:
        if any(s is None for s in pattern):
            raise Unusable(
                "the model has no fixed input size (elementwise layers only); pass --data"
            )
        n = 256 if args.samples is None else args.samples
        return np.asarray(jax.random.normal(jax.random.key(args.seed), (n, *pattern)))
    x = load_array(args.data, "data")
    size = None if any(s is None for s in pattern) else math.prod(pattern)
    if len(pattern) > 1 and x.ndim == 2 and x.shape[1] == size:
        x = x.reshape(len(x), *pattern)  # flat rows (a CSV) of a model on rank-k events
    if x.ndim == len(pattern):
        x = x[None]  # one sample
    if x.shape[0] == 0:
        raise Unusable(f"data has no samples (shape {x.shape})")
    return x if args.samples is None else x[: args.samples]


def _cond(args, model, n: int):
    if not model.cond_dim:
        if args.cond is not None:
            raise Unusable(
                "--cond was given but the model is not conditional (cond_dim=0); drop --cond, "
                "or check that this is the conditional model you meant"
            )
        return None
    if args.cond is None:
        raise Unusable(
            f"the model is conditional (cond_dim={model.cond_dim}); pass --cond FILE.npy"
        )
    cond = load_array(args.cond, "cond")
    if cond.ndim == 2 and cond.shape[1] == model.cond_dim and len(cond) > n:
        cond = cond[:n]
    if cond.shape != (model.cond_dim,) and cond.shape != (n, model.cond_dim):
        raise Unusable(
            f"cond has shape {cond.shape}; expected ({n}, {model.cond_dim}) or ({model.cond_dim},)"
        )
    return cond


def _inputs(args):
    model = _load_model(args.path)
    if args.samples is not None and args.samples < 1:
        raise Unusable(f"--samples must be >= 1, got {args.samples}")
    float_type = _model_float_type(model)
    x = _data(args, model).astype(float_type)
    cond = _cond(args, model, len(x))
    return model, x, None if cond is None else cond.astype(float_type)


def _emit(text: str, stream) -> None:
    """Print ``text``; a reader that went away (``invnet verify m | head``) is not an error:
    the rest of the output is discarded, the standard way (Python docs, "Note on SIGPIPE")."""
    try:
        print(text, file=stream, flush=True)
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())  # no second error when Python flushes at exit


def _unusable(message: str, as_json: bool) -> int:
    """Exit code 2: the reason as one line on stderr (and a JSON object on stdout with
    ``--json``)."""
    message = message.removeprefix("invnet.verify: ")
    _emit(f"invnet verify: error: {message}", sys.stderr)
    if as_json:
        _emit(json.dumps({"ok": False, "error": message, "exit_code": 2}), sys.stdout)
    return 2


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
    except Unusable as err:
        return _unusable(str(err), args.json)
    except (TypeError, ValueError) as err:
        return _unusable(str(err).splitlines()[0], args.json)
    _emit(report.to_json() if args.json else report.table(), sys.stdout)
    return 0 if report.ok else 1
