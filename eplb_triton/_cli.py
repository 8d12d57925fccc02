"""Shared pieces of the command line (demo and bench): argument checks, progress, tables.

Every check here runs in the parent process before any rank is started, so a bad argument
costs a one-line ``error:`` and exit status 2 (argparse's convention), never a traceback after
minutes of work.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
from typing import Any, Callable, Sequence, TextIO

__all__ = [
    "HelpFormatter",
    "Progress",
    "add_dist_backend_arguments",
    "add_model_arguments",
    "check_dist_backend",
    "check_kernel_backend",
    "format_table",
    "nonnegative_int",
    "package_version",
    "positive_float",
    "positive_int",
    "progress_mode",
    "writable_path",
]

DIST_BACKENDS = ("gloo", "nccl")


def package_version() -> str:
    """The installed distribution's version, else the package's ``__version__``."""
    try:
        from importlib.metadata import PackageNotFoundError, version

        return version("eplb-triton")
    except PackageNotFoundError:
        from . import __version__

        return __version__


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the line breaks of descriptions and epilogs (lists stay lists) and appends
    ``(default: X)`` to options whose default is a real value (not None, not a flag's False)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (
            "%(default)" not in text
            and action.option_strings
            and action.default is not None
            and action.default is not False
            and action.default is not argparse.SUPPRESS
        ):
            text += " (default: %(default)s)"
        return text


# --- argparse `type=` validators: argparse turns ArgumentTypeError into "argument --x: message".


def positive_int(text: str) -> int:
    value = _parse(int, text, "an integer")
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def nonnegative_int(text: str) -> int:
    value = _parse(int, text, "an integer")
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def positive_float(text: str) -> float:
    value = _parse(float, text, "a number")
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number above 0, got {text}")
    return value


def _parse(kind: Callable[[str], Any], text: str, what: str) -> Any:
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None


def writable_path(text: str) -> str:
    """A file path whose directory exists and is writable (checked now, written after the run)."""
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} is a directory; give a file name")
    directory = os.path.dirname(os.path.abspath(text))
    if not os.path.isdir(directory):
        raise argparse.ArgumentTypeError(f"directory {directory!r} does not exist")
    # try it rather than trust os.access (root passes every access check, /proc still refuses)
    try:
        if os.path.exists(text):
            with open(text, "a"):
                pass
        else:
            with tempfile.NamedTemporaryFile(dir=directory, prefix=".eplb-triton-probe-"):
                pass
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"cannot write to {text!r}: {exc.strerror or exc}") from None
    return text


class _DeprecatedAlias(argparse.Action):
    """``--backend`` (the old name of ``--dist-backend``): still accepted, with a note on stderr."""

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"{parser.prog}: note: {option_string} is now --dist-backend", file=sys.stderr)
        setattr(namespace, self.dest, values)


def add_dist_backend_arguments(parser: argparse.ArgumentParser, default_world: str) -> None:
    """``--dist-backend`` and ``--world-size`` (plus the hidden old spelling ``--backend``)."""
    parser.add_argument(
        "--dist-backend",
        choices=DIST_BACKENDS,
        default="gloo",
        help="torch.distributed backend: gloo runs CPU ranks, nccl one process per GPU",
    )
    parser.add_argument("--backend", dest="dist_backend", choices=DIST_BACKENDS, action=_DeprecatedAlias,
                        default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    parser.add_argument(
        "--world-size",
        type=positive_int,
        default=None,
        metavar="N",
        help=f"number of ranks (default: {default_world} with gloo, one per visible GPU with nccl)",
    )


def add_model_arguments(parser: argparse.ArgumentParser, default_world: str, layers_help: str) -> None:
    """What demo and bench share: ``--preset``, the distributed-backend options, ``--layers``, ``--scale``."""
    from .testing.shapes import PRESETS

    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="model shapes to imitate")
    add_dist_backend_arguments(parser, default_world=default_world)
    parser.add_argument("--layers", type=positive_int, default=None, metavar="N", help=layers_help)
    parser.add_argument(
        "--scale", type=positive_int, default=None, metavar="N",
        help="divide tensor dimensions by this (default: 16 for the large presets on gloo, else 1)",
    )


def check_dist_backend(parser: argparse.ArgumentParser, args: argparse.Namespace, default_world: int) -> int:
    """The world size to run, or a parser error when NCCL has no GPUs for it."""
    if args.dist_backend != "nccl":
        return args.world_size if args.world_size is not None else default_world
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus == 0:
        parser.error("--dist-backend nccl needs a CUDA GPU and none is visible; use --dist-backend gloo on CPU")
    world = args.world_size if args.world_size is not None else gpus
    if world > gpus:
        parser.error(f"--world-size {world} with nccl needs {world} GPUs (one per rank); {gpus} visible")
    return world


def check_kernel_backend(parser: argparse.ArgumentParser, kernel_backend: str | None, dist_backend: str) -> None:
    """Reject a pack/unpack backend that cannot run on the ranks' device before they start.

    The ranks inherit this process's Triton state (fork on gloo) or environment (spawn on
    nccl), so looking at it here tells what they will get.
    """
    from .layout import BACKEND_ENV, BACKENDS

    name, source = kernel_backend, "--kernel-backend"
    if name is None:
        name, source = os.environ.get(BACKEND_ENV) or "auto", f"{BACKEND_ENV}"
    if name not in BACKENDS:
        parser.error(f"{source}={name!r} is not one of {', '.join(BACKENDS)}")
    if name != "triton":
        return
    interpreted = _triton_interpreted()
    if dist_backend == "gloo" and not interpreted:
        parser.error(
            f"{source} triton on CPU ranks (gloo) needs TRITON_INTERPRET=1 in the environment; "
            "use --kernel-backend torch or auto there"
        )
    if dist_backend == "nccl" and interpreted:
        parser.error(f"{source} triton on GPUs cannot run with TRITON_INTERPRET=1; unset it")


def _triton_interpreted() -> bool:
    if importlib.util.find_spec("triton") is None:
        return False
    from .kernels import rows
    from .layout import _interpreted

    return _interpreted(rows.move_rows_kernel)


def progress_mode(enabled: bool, stream: TextIO | None = None) -> str:
    """``"bar"`` on a terminal with tqdm installed, ``"lines"`` otherwise, ``"off"`` if disabled."""
    stream = sys.stdout if stream is None else stream
    if not enabled:
        return "off"
    isatty = getattr(stream, "isatty", None)
    if isatty is None or not isatty() or importlib.util.find_spec("tqdm") is None:
        return "lines"
    try:  # a terminal that reports no width (a fresh pseudo-terminal) would show an empty bar
        columns = os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError):
        columns = 0
    return "bar" if columns > 0 else "lines"


class Progress:
    """Progress of one rank's work: a tqdm bar that stays when done (``mode="bar"``), one
    plain line per milestone (``"lines"``: logs and pipes get no carriage returns), or nothing."""

    def __init__(self, mode: str, total: int, desc: str, unit: str, stream: TextIO | None = None):
        self.mode = mode
        self.stream = sys.stdout if stream is None else stream
        self._bar = None
        if mode == "bar":
            from tqdm import tqdm  # optional dependency (the `cli` extra); progress_mode checked it

            self._bar = tqdm(total=total, desc=desc, unit=unit, leave=True, file=self.stream, dynamic_ncols=True)

    def update(self, n: int = 1) -> None:
        if self._bar is not None:
            self._guard(self._bar.update, n)

    def note(self, text: str) -> None:
        """A milestone: the bar's status text on a terminal, its own line elsewhere."""
        if self._bar is not None:
            self._guard(self._bar.set_postfix_str, text)
        elif self.mode == "lines":
            self._guard(lambda: print(text, file=self.stream, flush=True))

    def close(self) -> None:
        if self._bar is not None:
            self._guard(self._bar.close)
        self._guard(self.stream.flush)

    def _guard(self, fn: Callable[..., Any], *args: Any) -> None:
        # progress is best effort: a closed pipe (`| head`) must not fail a rank's work
        if self.mode == "off":
            return
        try:
            fn(*args)
        except (BrokenPipeError, ValueError):  # ValueError: the stream was closed
            self.mode, self._bar = "off", None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def format_table(columns: Sequence[tuple[str, str, str]], rows: Sequence[dict]) -> list[str]:
    """Fixed-width lines: a header, then one line per row.

    ``columns`` are ``(header, key, format spec)``; a column whose spec is ``"<"`` is
    left-aligned (names), the others right-aligned; each is as wide as its widest cell.
    """
    cells = [[format(row[key], spec) for _, key, spec in columns] for row in rows]
    widths = [max([len(head)] + [len(r[i]) for r in cells]) for i, (head, _, _) in enumerate(columns)]
    left = [spec == "<" for _, _, spec in columns]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.ljust(w) if l else v.rjust(w) for v, w, l in zip(values, widths, left)).rstrip()

    return [line([head for head, _, _ in columns])] + [line(r) for r in cells]


def format_legend(entries: Sequence[tuple[str, str]]) -> list[str]:
    """``name: meaning`` lines, names aligned."""
    width = max(len(name) for name, _ in entries)
    return [f"  {name.rjust(width)}: {meaning}" for name, meaning in entries]
