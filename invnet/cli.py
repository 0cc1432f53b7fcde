"""Command line: ``invnet demo`` (train, reverse, verify) and ``invnet verify PATH``."""

from __future__ import annotations

import argparse
import sys

from invnet import demo, verify_cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="invnet", description="Invertible neural networks")
    sub = parser.add_subparsers(dest="command", required=True)
    demo.add_parser(sub)
    verify_cli.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
