"""Command-line helpers shared by train.py, the benchmarks and the module entry points."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

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


@contextlib.contextmanager
def exits_quietly(parser: argparse.ArgumentParser) -> Iterator[None]:
    """Ends the command without a traceback on Ctrl-C (one line, status 130) and when its
    output is piped into a program that stopped reading (`| head`; status 141).

    Output written so far is left as each command leaves it: datasets, exports and
    checkpoints are renamed into place only when complete.
    """
    try:
        yield
    except KeyboardInterrupt:
        parser.exit(130, f"\n{parser.prog}: interrupted.\n")
    except BrokenPipeError:
        # Python would report the pipe again when it flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(141)


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
