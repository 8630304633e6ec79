"""User strings (paths, queries, split names, captions, error reasons) inside rich output.

Rich reads `[...]` in what it prints as markup: a file named `clip[/x].mp4` raises a
MarkupError and a split named `[train]` silently vanishes. Every such string goes through
`lit` before it reaches a rich console, table or progress bar. No varcmp imports, so that
any module can use it.
"""

from __future__ import annotations

from rich.markup import escape


def lit(value) -> str:
    """`value` as text that rich prints literally (none of its brackets is markup)."""
    return escape(str(value))
