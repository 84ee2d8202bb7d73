"""Command-line helpers shared by train.py, the benchmarks and the module entry points."""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import signal
import sys
import threading
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NoReturn

import ml_collections

from mmrec_jax import files
from mmrec_jax.config import ConfigError, load_config, split_overrides


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the description's own layout and shows each flag's default where it has one
    (not "None" for required flags, or for defaults the help text explains)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.required or action.default in (None, ""):
            return action.help
        return super()._get_help_string(action)


def show_warnings_plainly() -> None:
    """Prints warnings as 'UserWarning: message', without the source line that Python
    adds for programmers (a command's user cannot act on it)."""
    warnings.formatwarning = lambda message, category, *_args, **_kwargs: (
        f"{category.__name__}: {message}\n"
    )


class ExitNow(SystemExit):
    """A SystemExit that ends a command at once: in `exits_quietly(exit_process=True)` the
    process ends without waiting for work in background threads (a checkpoint being
    written)."""


# Signals that end a command: Ctrl-C, and what schedulers and `timeout` send.
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _end(status: int, message: str, exit_process: bool) -> NoReturn:
    """Writes `message` and ends the command with `status`.

    With `exit_process` the process ends without the interpreter's shutdown (`os._exit`):
    by then the exception unwinding the command's stack has run its cleanup (temporary
    folders, locks, worker processes); what remains are native threads that may still be
    at work (XLA compiling, TensorStore writing), which crash the interpreter's shutdown
    (a segmentation fault) or print their own tracebacks. Otherwise it raises SystemExit,
    for a `main` called in-process (from a notebook, whose kernel must live on).
    """
    for write in (lambda: sys.stderr.write(message), sys.stdout.flush, sys.stderr.flush):
        with contextlib.suppress(OSError, ValueError):  # `| tee` killed by the same Ctrl-C
            write()
    if exit_process:
        os._exit(status)
    raise SystemExit(status)


def in_gc_callback(frame) -> bool:
    """Whether `frame` runs inside a garbage-collection callback (`gc.callbacks`).

    An exception a signal handler raises there is printed as "Exception ignored" and
    dropped (JAX runs such a callback at every collection).
    """
    codes = {getattr(callback, "__code__", None) for callback in gc.callbacks}
    while frame is not None:
        if frame.f_code in codes:
            return True
        frame = frame.f_back
    return False


def deliver_later(signum: int) -> threading.Timer:
    """Sends `signum` to this process again in 50 ms, for a handler that cannot act where
    the signal landed (`in_gc_callback`); returns the timer (cancel it to take it back)."""
    timer = threading.Timer(0.05, os.kill, (os.getpid(), signum))
    timer.daemon = True
    timer.start()
    return timer


@contextlib.contextmanager
def exits_quietly(parser: argparse.ArgumentParser, exit_process: bool = False) -> Iterator[None]:
    """Ends the command with one line and no traceback on Ctrl-C or SIGTERM (status 128 +
    the signal), and when its output is piped into a program that stopped reading
    (`| head`; status 141).

    Inside the block both signals raise KeyboardInterrupt (SIGTERM's default would kill
    the process without a word or its cleanup); code that handles them itself (the
    training loop, which saves a checkpoint first) installs its own handlers meanwhile.
    Output written so far is left as each command leaves it: datasets, exports and
    checkpoints are renamed into place only when complete.

    Args:
      parser: the command's parser (its `prog` starts the line).
      exit_process: end the process itself after an interrupt or an `ExitNow` (see
        `_end`): for a command run from the shell (`main()` reading `sys.argv`), not for
        one called in-process.
    """
    received: list[int] = []
    redeliveries: list[threading.Timer] = []

    def interrupt(signum, frame):
        received.append(signum)
        if in_gc_callback(frame):
            redeliveries.append(deliver_later(signum))
            return
        raise KeyboardInterrupt

    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {sig: signal.signal(sig, interrupt) for sig in _STOP_SIGNALS}
    try:
        yield
        if received:  # a signal to deliver again had no time to arrive
            raise KeyboardInterrupt
    except BrokenPipeError:
        # Python would report the pipe again when it flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(141)
    except ExitNow as stop:
        if not exit_process:
            raise
        _end(stop.code if isinstance(stop.code, int) else 1, "", exit_process)
    except BaseException as error:
        # An interrupt inside native code can surface as another error (an ImportError
        # from an extension module's initialization): the signal is what counts.
        if isinstance(error, SystemExit) or not (isinstance(error, KeyboardInterrupt) or received):
            raise
        signum = received[-1] if received else signal.SIGINT
        said = (
            "interrupted"
            if signum == signal.SIGINT
            else f"stopped by {signal.Signals(signum).name}"
        )
        _end(128 + signum, f"\n{parser.prog}: {said}.\n", exit_process)
    finally:
        for timer in redeliveries:
            timer.cancel()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def require_writable_folder(parser: argparse.ArgumentParser, flag: str, folder) -> None:
    """Exits with status 2, naming `flag`, when `folder` cannot take the command's output.

    Checked before any work, so that a long import or export does not fail at its end.
    """
    reason = files.unwritable_reason(Path(folder))
    if reason is not None:
        parser.exit(
            2,
            f"{parser.prog}: error: cannot write in {flag} {str(folder)!r} ({reason}); "
            "pass a folder you can write to.\n",
        )


def add_config_argument(parser: argparse.ArgumentParser, example: str = "configs/default.py"):
    """Adds the required `--config FILE` and describes `--config.KEY=VALUE` in the help."""
    parser.add_argument(
        "--config", required=True, metavar="FILE", help=f"config file, e.g. {example}"
    )
    parser.epilog = (
        "Any config field can be overridden: --config.KEY=VALUE (or "
        "--config.KEY VALUE), e.g. --config.train.batch_size=512 --config.model.towers=text,id; "
        "the fields and their meaning are in the config files."
    )


def parse_config_args(
    parser: argparse.ArgumentParser, argv: Sequence[str] | None = None
) -> tuple[argparse.Namespace, ml_collections.ConfigDict]:
    """Parses `--config FILE [--config.KEY=VALUE ...]` plus the parser's own flags.

    The parser must define `--config`. On a bad file, key or value this prints the
    error naming it and exits with status 2, like argparse does for its own flags.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        others, overrides = split_overrides(argv)
        args = parser.parse_args(others)
        config = load_config(args.config, overrides)
    except ConfigError as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    return args, config
