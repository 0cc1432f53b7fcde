"""Command line: ``invnet demo`` (train, reverse, verify), ``invnet verify PATH`` and
``invnet bench PATH`` (how fast is a saved model, see `invnet.bench`).

``invnet bench`` exit codes: 0 measured (modes that could not run are listed under
"skipped"), 2 unusable input (missing, corrupt or refused model file, bad
``--cond``/``--shape``, no such device); the reason is one line on stderr, and with
``--json`` also ``{"ok": false, "error": ..., "exit_code": 2}`` on stdout.
"""

from __future__ import annotations

import argparse
import sys

from invnet import demo, verify_cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="invnet", description="Invertible neural networks")
    sub = parser.add_subparsers(dest="command", required=True)
    demo.add_parser(sub)
    verify_cli.add_parser(sub)
    add_bench_parser(sub)
    return parser


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "bench",
        help="time a saved model: forward, inverse, log-det, sampling; eager/jit/compiled",
        description=(
            "Benchmark a model saved with invnet.save: median times, samples/s, first-call "
            "(compile) times, round-trip error and peak device memory. Exit code 0: "
            "measured; 2: unusable input (message on stderr)."
        ),
    )
    parser.add_argument("path", help="model file written by invnet.save")
    parser.add_argument("--batch-size", type=int, default=1024, help="samples per call")
    parser.add_argument(
        "--cond",
        help="conditional models only: a .npy file of conditions, (N, cond_dim) (rows cut "
        "to the batch, or repeated in order when N is smaller) or (cond_dim,), or the size "
        "cond_dim to draw standard-normal conditions",
    )
    parser.add_argument(
        "--shape",
        help="event shape, e.g. 64 or 8,8,3 (needed only when the model's events have no "
        "fixed size; a saved Glow or any Flow with event_shape knows its own)",
    )
    parser.add_argument("--device", choices=("cpu", "gpu"), default=None)
    parser.add_argument("--repeats", type=int, default=7, help="timed samples (median)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls after the first")
    parser.add_argument(
        "--min-time", type=float, default=0.01, help="seconds each timed sample lasts at least"
    )
    parser.add_argument(
        "--modes",
        nargs="+",
        choices=("eager", "call", "jit", "compiled"),
        default=None,
        help="ways of running the model to time (default: all)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.set_defaults(func=run_bench)
    return parser


def _bench_inputs(args):
    from invnet.io import load
    from invnet.verify_cli import Unusable, load_array

    try:
        model = load(args.path)
    except FileNotFoundError:
        raise Unusable(f"model file not found: {args.path}") from None
    except (OSError, ValueError) as err:
        raise Unusable(str(err).replace("\n", " ")) from None
    cond = args.cond
    if cond is not None:
        cond = int(cond) if cond.strip().isdigit() else load_array(cond, "cond")
    shape = None
    if args.shape is not None:
        try:
            shape = tuple(int(s) for s in args.shape.replace("x", ",").split(","))
        except ValueError:
            raise Unusable(f"--shape must be sizes like 64 or 8,8,3, got {args.shape!r}") from None
    return model, cond, shape


def run_bench(args: argparse.Namespace) -> int:
    from invnet.benchmarking import MODES, bench
    from invnet.verify_cli import Unusable

    try:
        model, cond, shape = _bench_inputs(args)
        report = bench(
            model,
            batch_size=args.batch_size,
            cond=cond,
            shape=shape,
            device=args.device,
            repeats=args.repeats,
            warmup=args.warmup,
            min_time=args.min_time,
            modes=args.modes or MODES,
            seed=args.seed,
        )
    except Unusable as err:
        return _bench_unusable(str(err), args.json)
    except (TypeError, ValueError) as err:
        return _bench_unusable(str(err).splitlines()[0], args.json)
    print(report.to_json() if args.json else report.table())
    return 0


def _bench_unusable(message: str, as_json: bool) -> int:
    """Exit code 2: one line on stderr, and with ``--json`` the same JSON object as
    ``invnet verify`` prints (``{"ok": false, "error": ..., "exit_code": 2}``)."""
    import json

    print(f"invnet bench: error: {message}", file=sys.stderr)
    if as_json:
        print(json.dumps({"ok": False, "error": message, "exit_code": 2}))
    return 2


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
