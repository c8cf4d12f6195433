"""Command-line entry points: a user's mistake ends in one line on stderr and exit code 2, not a traceback.

Every ``tools/*.py`` runs its ``main(argv)`` through :func:`run_main`. Errors a user can fix (a
:class:`UserError`, and the ``ValueError``/``OSError`` family the package raises for bad files,
datasets, weights and arguments, each message naming the file or key) are printed as
``error: <what>, <where>, <what to do>``. ``--debug`` (any position) or ``STEEL_FSD_DEBUG=1`` shows the
traceback instead. Anything else (a bug) keeps its traceback.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import socket
import sys
import tempfile
import time
from typing import Callable, Iterator, Sequence

from .errors import UserError

__all__ = ["UserError", "USER_ERRORS", "run_main", "check_output_dir", "check_output_file", "output_lock",
           "model_parser", "add_config_overrides", "add_dataset_args", "skips_exit_code"]

DEBUG_ENV = "STEEL_FSD_DEBUG"
USER_ERRORS = (ValueError, OSError)


def debug_requested(argv: Sequence[str]) -> bool:
    return "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def one_line(e: BaseException) -> str:
    """The exception's message on one line (OSError: ``strerror: filename``)."""
    if isinstance(e, OSError) and not isinstance(e, UserError) and e.strerror:
        text = f"{e.strerror}: {e.filename}" if e.filename else e.strerror
    else:
        text = str(e) or type(e).__name__
    return " ".join(text.split())


def run_main(main: Callable[[list[str]], object], argv: Sequence[str] | None = None) -> int:
    """Run ``main(argv)`` (``--debug`` removed from ``argv``) and return its exit code (0 unless an int).

    User errors (see the module docstring) print one line on stderr and return 2, unless debugging.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_requested(argv)
    try:
        rc = main([a for a in argv if a != "--debug"])
    except USER_ERRORS as e:
        if debug:
            raise
        print(f"error: {one_line(e)}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return rc if isinstance(rc, int) else 0


def check_output_dir(path: str, what: str = "OUTPUT_DIR") -> None:
    """Create ``path`` if needed and check that a file can be written in it; :class:`UserError` if not."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{what} {path} is a file, not a folder", "", "choose another folder or move the file away")
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise UserError(f"{what} {path} is not writable ({e.strerror})", "",
                        "choose a folder you can write to") from None


def check_output_file(path: str, what: str = "--out") -> None:
    """``path`` can be written as a file: not a folder, and its folder is writable (created if needed)."""
    if os.path.isdir(path):
        raise UserError(f"{what} {path} is a folder", "", "give a file name, e.g. " + os.path.join(path, "out.pt"))
    check_output_dir(os.path.dirname(os.path.abspath(path)), f"the folder of {what} {path}")


LOCK_NAME = ".steel_fsd.lock"
_HELD: dict[str, list] = {}  # lock path -> [fd, depth]: a process may nest locks of one folder


@contextlib.contextmanager
def output_lock(folder: str, what: str = "OUTPUT_DIR") -> Iterator[None]:
    """Hold ``folder`` for this run: a second run into the same folder (another live process) is refused with a
    :class:`UserError` naming that process, instead of both writing into it (one run's config with the other's
    weights, interleaved metrics). The lock is ``flock`` on ``folder/.steel_fsd.lock``: the kernel drops it when
    its process ends, however it ends, so a crashed run never blocks the next one."""
    import fcntl

    os.makedirs(folder, exist_ok=True)
    path = os.path.join(os.path.realpath(folder), LOCK_NAME)
    if path in _HELD:
        _HELD[path][1] += 1
    else:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            other = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "a process that is starting"
            os.close(fd)
            raise UserError(f"{what} {folder} is in use by another run ({other})", "",
                            "wait for it to finish, or choose another folder") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, (f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                       f"{' '.join(sys.argv)[:500]}\n").encode(), 0)
        _HELD[path] = [fd, 1]
    try:
        yield
    finally:
        _HELD[path][1] -= 1
        if _HELD[path][1] == 0:
            fd = _HELD.pop(path)[0]
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


def model_parser(doc: str | None, prototypes: str | None = "prototype file from tools/register_support.py "
                 "(prototype configs)", datasets_root: bool = False) -> argparse.ArgumentParser:
    """The arguments every tool that loads a trained model shares: ``--config-file``, ``--weights``, (with a help
    text) ``--prototypes`` and (``datasets_root``) ``--datasets-root``. The tool adds its own, then
    :func:`add_config_overrides` last."""
    ap = argparse.ArgumentParser(description=(doc or "").strip().splitlines()[0] if doc else None)
    ap.add_argument("--config-file", required=True, help="the model's config (configs/*/*.yaml)")
    ap.add_argument("--weights", required=True, help="trained model (.pth)")
    if prototypes:
        ap.add_argument("--prototypes", help=prototypes)
    if datasets_root:
        ap.add_argument("--datasets-root", help="datasets folder to register (default $STEEL_FSD_DATASETS, else "
                                                "./datasets)")
        add_dataset_args(ap, register_option=False)
    return ap


DATASET_NAME_HELP = " (or NAME=FORMAT:PATH[:ANN] to register one: coco, voc, yolo, severstal, masks, csv)"
DATASET_SPEC_HELP = ("NAME=FORMAT:PATH[:ANN], FORMAT one of coco, voc, yolo, severstal, masks, csv (registers NAME "
                     "and NAME_train/_val/_test)")


def add_dataset_args(ap: argparse.ArgumentParser, register_option: bool = True) -> argparse.ArgumentParser:
    """``--datasets-file`` (a YAML list of datasets; also ``$STEEL_FSD_DATASETS_FILE``) and, where the tool has no
    ``--dataset`` of its own, ``--dataset`` (repeatable) registering a user dataset (see steel_fsd/data/custom.py)."""
    if register_option:
        ap.add_argument("--dataset", action="append", default=[], metavar="SPEC", help="register a dataset: " +
                        DATASET_SPEC_HELP)
    ap.add_argument("--datasets-file", action="append", default=[], metavar="YAML",
                    help="register the datasets listed in this YAML file (also $STEEL_FSD_DATASETS_FILE)")
    return ap


def skips_exit_code(tool: str, skipped: Sequence[str], listed_in: str, allow_skips: bool) -> int:
    """The exit code of a tool that skipped unreadable inputs: 1 (said on stderr) unless none were skipped or
    ``--allow-skips`` was given."""
    if skipped and not allow_skips:
        print(f"[{tool}] {len(skipped)} unreadable image(s) skipped (listed in {listed_in}); exit code 1 "
              "(--allow-skips for 0)", file=sys.stderr)
        return 1
    return 0


def add_config_overrides(ap: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The trailing ``KEY VALUE`` config overrides (Detectron2's ``opts``), after every option."""
    ap.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    return ap
