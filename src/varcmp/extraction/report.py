"""The end-of-run report of `varcmp-extract`: the summary table, one line per problem and note,
and the line an interrupted run ends with."""

from __future__ import annotations

from ..cli.markup import lit
from .options import Options, Summary, exit_code_of


def report(summary: Summary, opt: Options, console) -> int:
    """Print the summary table and one line per problem; return the exit code."""
    from rich.table import Table

    plan = summary.plan
    t = Table(title=lit(f"varcmp-extract: {opt.out} [{opt.split}]" + (
        f" shard {opt.shard_index + 1}/{opt.num_shards}" if opt.num_shards > 1 else "")))
    for col in ("videos", "before", "new", "failed", "frames", "captions", "time", "frames/s"):
        t.add_column(col, justify="right")
    t.add_row(str(summary.total), str(summary.already), str(summary.done), str(len(summary.failed)),
              str(summary.frames), str(summary.queries), f"{summary.seconds:.1f} s",
              f"{summary.frames / max(summary.seconds, 1e-9):.1f}")
    console.print(t)
    for path, why in summary.failed:
        console.print(f"[red]failed[/red] {lit(path)}: {lit(why)}", highlight=False, soft_wrap=True)
    for path, why in summary.failed_elsewhere:
        console.print(f"[red]failed[/red] {lit(path)}: {lit(why)} (another shard)", highlight=False, soft_wrap=True)
    for line in plan.rejected:
        console.print(f"[red]rejected[/red] {lit(line)}", highlight=False, soft_wrap=True)
    for line in plan.missing:
        console.print(f"[yellow]missing[/yellow] {lit(line)}", highlight=False, soft_wrap=True)
    for line in plan.notes:
        console.print(f"[dim]note[/dim] {lit(line)}", highlight=False, soft_wrap=True)
    _report_notes(summary.noted, console)
    if plan.uncaptioned:
        console.print(f"{plan.uncaptioned} videos have no caption (kept as distractors)")
    if summary.note:
        console.print(lit(summary.note), highlight=False, soft_wrap=True)
    if summary.interrupted:
        console.print(lit(interrupted_line(summary, opt)), highlight=False, soft_wrap=True)
    return summary.exit_code if summary.exit_code is not None else exit_code_of(summary)


def _report_notes(noted: list[tuple[str, list[tuple[str, str]]]], console) -> None:
    """One line per extracted video with remarks (as stored in its `note`), then their count by kind."""
    from collections import Counter

    for path, notes in noted:
        console.print(f"[dim]note[/dim] {lit(path)}: {lit('; '.join(text for _, text in notes))}",
                      highlight=False, soft_wrap=True)
    kinds = Counter(kind for _, notes in noted for kind, _ in notes)
    if kinds:
        console.print("notes: " + ", ".join(f"{n} {kind}" for kind, n in sorted(kinds.items())),
                      highlight=False, soft_wrap=True)


def interrupted_line(summary: Summary, opt: Options) -> str:
    """What an interrupted run saved, in one line."""
    return (f"interrupted: finished videos are saved in {opt.out} ({summary.already + summary.done} of this run's "
            f"{summary.total} extracted, {len(summary.failed)} failed); run the same command again to resume")
