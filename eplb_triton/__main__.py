"""Command line: ``python -m eplb_triton demo|bench [...]``."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"demo": "eplb_triton.demo", "bench": "eplb_triton.benchmark"}
    if not argv or argv[0] not in commands or argv[0] in ("-h", "--help"):
        print("usage: python -m eplb_triton {demo,bench} [options]   (add --help after a command)")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module = __import__(commands[argv[0]], fromlist=["main"])
    return module.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
