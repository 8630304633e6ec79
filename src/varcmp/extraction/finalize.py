"""Finalizing a split (see `varcmp.extract`'s docstring for who does it): at the end of a run by
the process whose turn it is (`finish`), or by `varcmp-extract --finalize` (`finalize`), which
reports what each split holds and what is missing."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..cache.locks import Locks
from ..cache.reader import Completeness
from ..cache.writer import CacheWriter, probe_target
from ..cache_schema import FAILED, SPLIT_KEY, CacheError
from ..cli.markup import lit
from ..media.plan import Plan
from .group import Group
from .options import Options, Summary, exit_code_of


def finish(opt: Options, plan: Plan, writer: CacheWriter, sw, mine: np.ndarray, locks: Locks,
            group: Group | None, summary: Summary) -> None:
    """After this process's videos: finalize the split if this process is the one to (see the
    module docstring), say where the split stands, and decide the exit code."""
    summary.failed = _failed(sw.store, opt.split, mine)
    states = _finalize_if_last(opt, writer, locks, group)
    own = next((c for c in states or [] if c.split == opt.split), None)
    if own is not None and own.complete:
        _finalized(opt, plan, sw, own, group, summary)
    else:
        _unfinished(opt, own or sw.completeness(), group, summary)
    code = exit_code_of(summary)
    # the ranks agree on one code (after rank 0 finalized); see exit_together for who exits with it
    summary.exit_code = group.max(code) if group is not None else code


def _failed(store, split: str, rows=None) -> list[tuple[str, str]]:
    """(path, reason) of the videos of `split` that failed, among `rows` (default: all), in their order."""
    status = np.asarray(store.array(f"{split}/videos/status")[:])
    rows = np.flatnonzero(status == FAILED) if rows is None else [i for i in rows if status[i] == FAILED]
    paths, errors = store.read_str(f"{split}/videos/path"), store.read_str(f"{split}/videos/error")
    return [(paths[i], errors[i]) for i in rows]


def _finalize_if_last(opt: Options, writer: CacheWriter, locks: Locks, group: Group | None):
    """Finalize when this process is the one to: under torchrun rank 0, once every rank has
    finished; otherwise the only writer, or the last one (no other run holds the store). The
    others write the consolidated metadata only. The splits' states, None when not finalized."""
    if group is not None:
        locks.stop()
        group.barrier()
        if group.rank != 0:
            return None
        with locks.meta():
            return writer.finalize([opt.split])
    if opt.num_shards == 1 or locks.last_writer():
        with locks.meta():
            return writer.finalize()
    with locks.meta():
        writer.consolidate()
    return None


def _finalized(opt: Options, plan: Plan, sw, own: Completeness, group: Group | None, summary: Summary) -> None:
    """This process finalized the split: the last shard's report covers every shard's failures."""
    summary.final = own
    if opt.num_shards == 1:
        return
    if group is None:
        others = [i for i in range(len(plan.videos)) if i % opt.num_shards != opt.shard_index]
        summary.failed_elsewhere = _failed(sw.store, opt.split, others)
    summary.note = (f"finalized split '{opt.split}': {own.videos} videos, {own.done} extracted, "
                    f"{own.failed} failed" + (f", {own.captions} captions" if own.captions else ""))


def _unfinished(opt: Options, state: Completeness, group: Group | None, summary: Summary) -> None:
    """The split is not final after this process: what is missing, and who finishes it."""
    summary.remaining = len(state.missing)
    if opt.num_shards == 1:
        return
    if state.complete and group is None:
        summary.note = (f"split '{opt.split}': every video is extracted or recorded as failed; the "
                        "varcmp-extract still writing to the store finalizes it")
    elif not summary.interrupted and (group is None or group.rank == 0):
        summary.note = (f"split '{opt.split}': {len(state.missing)} of {state.videos} videos not extracted yet"
                        + (" (by other shards; the last shard to finish finalizes the store)" if group is None
                           else "") + f"; check with: varcmp-extract --out {opt.out} --finalize --split {opt.split}")


def finalize(out: Path, split: str | None = None, plan: Plan | None = None, console=None) -> int:
    """`varcmp-extract --out STORE --finalize`: check and finalize split `split` (default: every
    split) once no extraction is writing to the store; print what each split holds and what is
    missing. With `plan` (the videos and captions of an extraction command) the split must hold
    exactly those. Returns the exit code: 0, 1 when videos failed or caption rows were refused
    (as the extraction itself), 2 when a split is incomplete. Raises CacheError for a store that
    cannot be finalized."""
    from rich.console import Console

    console = console or Console(stderr=True)
    if not out.exists():
        raise CacheError(f"{out}: no such cache")
    probe_target(out)
    states, problems = _finalize_splits(out, split, plan)
    return _report_finalized(out, states, problems, console)


def _finalize_splits(out: Path, split: str | None, plan: Plan | None) -> tuple[list[Completeness], dict]:
    """Finalize under the exclusive run lock (no extraction may be running) and the metadata
    lock: the state of each split, and its (failed videos, rejected rows, missing rows)."""
    locks = Locks(out)
    locks.start(exclusive=True, busy=f"{out}: a varcmp-extract is still writing to this store; run --finalize "
                                     "once every shard has ended")
    try:
        with locks.meta():
            writer = CacheWriter.open(out)
            try:
                states = writer.finalize(_splits_to_finalize(writer, out, split, plan))
                return states, {c.split: _problems(writer.store, c.split) for c in states}
            finally:
                writer.close()
    finally:
        locks.stop()


def _splits_to_finalize(writer: CacheWriter, out: Path, split: str | None, plan: Plan | None) -> list[str]:
    """Every split, or `split`, which must exist (and hold `plan`'s videos and captions, when given)."""
    names = writer.splits()
    if split is None:
        return names
    if split not in names:
        raise CacheError(f"{out}: no split '{split}' (splits: {', '.join(names) or 'none'})")
    if plan is not None:
        writer.split(split, plan.videos, plan.queries)  # refuses another list of videos or captions
    return [split]


def _problems(store, name: str) -> tuple[list[tuple[str, str]], list[str], list[str]]:
    """(failed videos with their reasons, rejected caption rows, missing caption rows) of split `name`."""
    attrs = store.get_attrs(name).get(SPLIT_KEY, {})
    return _failed(store, name), list(attrs.get("rejected") or []), list(attrs.get("missing") or [])


def _report_finalized(out: Path, states: list[Completeness], problems: dict, console) -> int:
    """The --finalize table, one line per problem and per video not extracted (20 per split at
    most); the exit code."""
    from rich.table import Table

    t = Table(title=lit(f"varcmp-extract --finalize: {out}"))
    for col in ("split", "videos", "done", "failed", "pending", "captions", "encoded", "state"):
        t.add_column(col, justify="left" if col in ("split", "state") else "right", no_wrap=col == "state")
    for c in states:
        t.add_row(lit(c.split), str(c.videos), str(c.done), str(c.failed), str(len(c.missing)), str(c.captions),
                  str(c.captions_encoded), "finalized" if c.complete else "incomplete")
    console.print(t)
    for c in states:
        failed, rejected, missing = problems[c.split]
        for path, why in failed:
            console.print(f"[red]failed[/red] {lit(c.split)}: {lit(path)}: {lit(why)}", highlight=False, soft_wrap=True)
        for line in rejected:
            console.print(f"[red]rejected[/red] {lit(c.split)}: {lit(line)}", highlight=False, soft_wrap=True)
        for line in missing:
            console.print(f"[yellow]missing[/yellow] {lit(c.split)}: {lit(line)}", highlight=False, soft_wrap=True)
    incomplete = [c for c in states if not c.complete]
    for c in incomplete:
        for path in c.missing[:20]:
            console.print(f"[yellow]not extracted[/yellow] {lit(c.split)}: {lit(path)}", highlight=False,
                          soft_wrap=True)
        if len(c.missing) > 20:
            console.print(f"[yellow]not extracted[/yellow] {lit(c.split)}: ... and {len(c.missing) - 20} more")
    for c in incomplete:
        console.print(f"[red]error[/red]: {lit(c.describe(out))}; run the extraction (every shard) again: it resumes; "
                      "then --finalize", highlight=False, soft_wrap=True)
    if incomplete:
        return 2
    return 1 if any(any(p) for p in problems.values()) else 0
