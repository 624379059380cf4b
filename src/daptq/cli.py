"""The ``daptq`` command: a thin layer over the Python API (each subcommand calls one public function)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _cmd_demo(args: argparse.Namespace) -> int:
    from daptq.demo_toy import run_toy_demo

    run_toy_demo(out_dir=args.out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from daptq import __version__

    parser = argparse.ArgumentParser(
        prog="daptq", description="Drift-aware post-training quantization for VLA robot policies."
    )
    parser.add_argument("--version", action="version", version=f"daptq {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="the main job on the bundled default")
    demo.add_argument("--out", default="runs/demo", help="where to write the quantized checkpoint and report")
    demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, NotImplementedError) as err:
        print(f"daptq {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
