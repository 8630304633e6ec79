"""What every varcmp command shares: one-line errors with their exit codes, Ctrl-C, output file paths,
the console its result tables go to."""

from __future__ import annotations

import gc
import signal
import warnings
from contextlib import contextmanager
from pathlib import Path

import click

from ..errors import VarcmpError


class CommandError(click.ClickException):
    """A user error of a varcmp command: one line on stderr, exit code 2."""

    exit_code = 2

    def show(self, file=None) -> None:
        click.echo(f"error: {self.format_message()}", err=True)


INTERRUPTED = 130  # the exit code of a command stopped by Ctrl-C (128 + SIGINT), as shells report it


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, carrying the one line a command has to say about what it saved ("" says nothing:
    e.g. the processes of a torchrun job other than the first)."""

    def __init__(self, line: str = "interrupted"):
        super().__init__(line)
        self.line = line


class OneLineErrors(click.Command):
    """The one way a varcmp command ends on an error: a `VarcmpError` (varcmp.errors) raised
    anywhere in the command is `error: MESSAGE` on stderr, on one line, with the error's exit code;
    usage errors (a bad option value, a missing argument) are one line with exit code 2 instead of
    click's usage block; Ctrl-C is one line (see `Interrupted`) with exit code 130, instead of
    "Aborted!" and exit code 1."""

    def make_context(self, info_name, args, parent=None, **extra):
        try:
            return super().make_context(info_name, args, parent, **extra)
        except click.UsageError as e:
            raise CommandError(" ".join(e.format_message().split()) + " (see --help)") from None

    def invoke(self, ctx):
        """Run the command with varcmp's own warnings (e.g. a cache split that is not complete)
        shown as one 'warning: ...' line on stderr instead of Python's two-line format."""
        from ..cache_schema import IncompleteCacheWarning

        try:
            with warnings.catch_warnings():
                plain = warnings.showwarning

                def show(message, category, filename, lineno, file=None, line=None):
                    if issubclass(category, IncompleteCacheWarning):
                        click.echo(f"warning: {' '.join(str(message).split())}", err=True)
                    else:
                        plain(message, category, filename, lineno, file, line)

                warnings.showwarning = show
                return super().invoke(ctx)
        except VarcmpError as e:
            click.echo(f"error: {' '.join(str(e).split())}", err=True)
            raise click.exceptions.Exit(e.exit_code) from None
        except click.UsageError as e:  # raised by the command itself, after parsing
            raise CommandError(" ".join(e.format_message().split())) from None
        except KeyboardInterrupt as e:
            with warnings.catch_warnings():
                # the interrupted frames may hold storage coroutines (zarr) that never started: let
                # them go now, silently, instead of as "never awaited" warnings when click exits
                warnings.filterwarnings("ignore", "coroutine .* was never awaited", RuntimeWarning)
                e.__traceback__ = None
                gc.collect()
            stop_interrupted(e.line if isinstance(e, Interrupted) else "interrupted")


def stop_interrupted(line: str):
    """End a command that Ctrl-C stopped: `line` on stderr, then the storage I/O it left running
    ends (so that asyncio has nothing to complain about at exit), then exit code 130. A second
    Ctrl-C meanwhile is ignored."""
    from ..cache.store import finish_pending_io

    with _sigint_ignored():
        if line:
            click.echo(line, err=True)
        finish_pending_io()
    raise click.exceptions.Exit(INTERRUPTED)


@contextmanager
def _sigint_ignored():
    try:
        before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the main thread: signals are not ours to change
        before = None
    try:
        yield
    finally:
        if before is not None:
            signal.signal(signal.SIGINT, before)


class OutputFile(click.Path):
    """A file option a command writes (--json, --html): its folder must exist. A mistyped folder
    is a one-line error before any work, never created (folders of runs and stores are)."""

    def __init__(self):
        super().__init__(dir_okay=False, path_type=Path)

    def convert(self, value, param, ctx):
        path = super().convert(value, param, ctx)
        folder = path.parent
        if not folder.is_dir():
            self.fail(f"{path}: folder {folder} {'is not a folder' if folder.exists() else 'does not exist'}",
                      param, ctx)
        return path


REPORT_WIDTH = 160  # columns of a result table written to a file or a pipe (rich would cut them at 80)


def report_console():
    """The console a command prints its result tables on: stdout, at the terminal's width, or
    REPORT_WIDTH columns when stdout is a file or a pipe, so that a saved log keeps every column."""
    from rich.console import Console

    out = Console()
    return out if out.is_terminal else Console(width=REPORT_WIDTH)
