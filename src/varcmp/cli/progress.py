"""The one progress bar of every command (rich)."""

from __future__ import annotations

from contextlib import nullcontext


# --------------------------------------------------------------------------
# The searcher


def _progress(console, enabled: bool, transient: bool = True):
    if not enabled or console is None:
        return nullcontext(None)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TextColumn("eta"), TimeRemainingColumn(), console=console, transient=transient)
