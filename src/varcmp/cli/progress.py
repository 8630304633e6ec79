"""The one progress bar of every command (rich): a description, the bar, done/total, the
elapsed time and (optionally) the time left, with a command's own fields in between."""

from __future__ import annotations

from contextlib import contextmanager


def progress_bar(console=None, enabled: bool = True, *, transient: bool = True, fields: tuple[str, ...] = (),
                 eta: bool = True):
    """A `rich.progress.Progress` on `console` (stderr when None); when not `enabled` it draws
    nothing but still takes tasks and prints through `.console`. `fields`: rich format strings of task fields shown after the count, e.g.
    `"loss {task.fields[loss]:.4f}"`; `transient`: the bar disappears when done."""
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               *(TextColumn(f) for f in fields), TimeElapsedColumn()]
    if eta:
        columns += [TextColumn("eta"), TimeRemainingColumn()]
    return Progress(*columns, console=console if console is not None else Console(stderr=True),
                    transient=transient, disable=not enabled)


@contextmanager
def progress_arg(progress):
    """For the functions whose `progress` argument is False/None (no bar), True (a bar of their
    own on stderr) or a caller's `Progress` (add a task to it, leave it open): the Progress or None."""
    if progress is True:
        with progress_bar(transient=False, eta=False) as bar:
            yield bar
    else:
        yield progress or None
