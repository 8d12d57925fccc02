"""Command line: ``eplb-triton demo|bench [options]`` (or ``python -m eplb_triton ...``)."""

from __future__ import annotations

import argparse
import os
import sys

from . import _cli, demo
from .testing import benchmark

__all__ = ["build_parser", "main"]

DESCRIPTION = """\
Move MoE expert weights between ranks when an expert-parallel runtime rebalances.
The commands run on local ranks (CPU processes with gloo, or one process per GPU with nccl)."""

EPILOG = """\
Run '%(prog)s COMMAND --help' for a command's options."""


def build_parser(prog: str = "eplb-triton") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=DESCRIPTION, epilog=EPILOG, formatter_class=_cli.HelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_cli.package_version()}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", dest="command", required=True)
    for name, module, summary in (
        ("demo", demo, "rebalance a synthetic MoE model several times and verify every row"),
        ("bench", benchmark, "time this library against the per-expert baseline"),
    ):
        sub = commands.add_parser(
            name,
            help=summary,
            description=module.DESCRIPTION,
            epilog=module.EPILOG,
            formatter_class=_cli.HelpFormatter,
        )
        module.add_arguments(sub)
        sub.set_defaults(run=module.run, parser=sub)
    return parser


def main(argv: list[str] | None = None, prog: str = "eplb-triton") -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``) and run the command; returns the exit status.

    Bad arguments exit through ``SystemExit(2)`` with argparse's usage and one error line.
    """
    args = build_parser(prog).parse_args(argv)
    return args.run(args, args.parser)


def _run_as_script(prog: str) -> int:
    try:
        return main(prog=prog)
    except BrokenPipeError:  # `... | head`: the reader left; leave quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def console_main() -> int:
    """The ``eplb-triton`` console script."""
    return _run_as_script("eplb-triton")


if __name__ == "__main__":
    sys.exit(_run_as_script("python -m eplb_triton"))
