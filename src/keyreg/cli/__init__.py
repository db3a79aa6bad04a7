"""The ``keyreg`` command line: a thin layer over :mod:`keyreg.api`.

Errors caused by input (:class:`keyreg.errors.KeyregError`) print one line and exit with status 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import warnings
from collections.abc import Iterator, Sequence

from ..errors import KeyregError, first_line

__all__ = ["main", "entry", "build_parser", "no_hugepage_advice"]

# (module, help) of each sub-command; each module has add_arguments(parser) and run(args) -> int
COMMANDS = {
    "demo": ("demo", "register a bundled example pair (MNI152 T1 vs a rotated, deformed T2-like copy)"),
    "register": ("register", "register moving image(s) to fixed image(s) through learned keypoints"),
    "refit": ("refit", "refit and rewrite a registration from (hand-edited) keypoint files, without the network"),
    "models": ("models", "list the bundled models, or describe a model file"),
    "apply": ("apply", "apply saved transform(s) to an image, a label map or points"),
    "invert": ("invert", "invert a saved transform (exact for linear; TPS and fields with a residual)"),
    "groupwise": ("groupwise", "register a group of images to their common mean keypoints (a template)"),
    "train": ("train", "train a keypoint model (synthetic contrasts from label maps, or real images)"),
    "pretrain": ("pretrain", "learn anatomical keypoints (region centroids of label maps) from synthetic contrasts"),
    "evaluate": ("evaluate", "accuracy and robustness over pairs and seeded perturbations (Dice vs rotation)"),
}


class _Parser(argparse.ArgumentParser):
    """argparse with keyreg's one-line errors: ``keyreg <command>: error: <message> (see ... --help)``,
    exit status 2, without the usage block."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from importlib import import_module

    from .. import __version__

    parser = _Parser(prog="keyreg", description="Robust multi-modal image registration through learned keypoints.")
    parser.add_argument("--version", action="version", version=f"keyreg {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    parser.commands = {}  # type: ignore[attr-defined]
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        mod = import_module(f".{module}", __name__)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
        parser.commands[name] = p  # type: ignore[attr-defined]
    return parser


def no_hugepage_advice() -> None:
    """Stop numpy from advising transparent huge pages for its large arrays, unless the user set
    ``NUMPY_MADVISE_HUGEPAGE``.  Under ``defrag=madvise`` a kernel may compact memory on every first
    touch of such an array: on this project's reference machine (a VM) a fresh 134 MB array took
    0.6-1.3 s with the advice and 0.07 s without (docs/benchmarks.md); elsewhere the advice saves
    little for arrays that are written once and read a few times."""
    import os

    if "NUMPY_MADVISE_HUGEPAGE" in os.environ:
        return
    np = sys.modules.get("numpy")
    if np is None:  # numpy reads the variable when it is imported (not here: `keyreg --help` needs no numpy)
        os.environ["NUMPY_MADVISE_HUGEPAGE"] = "0"
        return
    core = getattr(np, "_core", None) or np.core
    setter = getattr(core.multiarray, "_set_madvise_hugepage", None)
    if setter is not None:
        setter(False)


@contextlib.contextmanager
def one_line_warnings(prefix: str) -> Iterator[None]:
    """Warnings raised while a command runs are printed as ``<prefix>: warning: <first line>``, not
    as Python's two-line report with a source line."""
    def show(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ARG001
        print(f"{prefix}: warning: {first_line(message, None)}", file=sys.stderr if file is None else file)

    with warnings.catch_warnings():
        warnings.showwarning = show
        yield


def main(argv: Sequence[str] | None = None) -> int:
    no_hugepage_advice()
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # reported by the sub-command's parser, so the message names the command
        parser.commands.get(args.command, parser).error(f"unrecognized arguments: {' '.join(unknown)}")
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        with one_line_warnings(f"keyreg {args.command}"):
            return int(args._run(args) or 0)
    except KeyregError as e:
        print(f"keyreg {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # on a new line: a progress bar may hold the current one
        print(f"{chr(10) if sys.stderr.isatty() else ''}keyreg {args.command}: interrupted", file=sys.stderr)
        return 130


def entry() -> None:
    """The ``keyreg`` console command: :func:`main`, then the exit.

    Once the outputs are written, the interpreter's teardown only frees memory: 0.4-0.5 s after a
    1 mm registration (torch's and numpy's objects).  With stdout and stderr flushed and no other
    non-daemon thread alive, the process ends at once (``os._exit``); under ``torchrun``
    (``WORLD_SIZE`` set) the normal exit keeps torch.distributed's own cleanup."""
    import os
    import threading

    rc = main()
    sys.stdout.flush()
    sys.stderr.flush()
    others = [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon]
    if not others and "WORLD_SIZE" not in os.environ:  # daemon threads (tqdm's monitor) die at exit anyway
        os._exit(rc)
    sys.exit(rc)


if __name__ == "__main__":  # pragma: no cover
    entry()
