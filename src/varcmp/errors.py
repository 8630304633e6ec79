"""The errors a user can act on, and the one rule for how a command ends on them: every varcmp
error is a `VarcmpError` whose message is one line naming the file (or option) and the problem;
a command prints it as `error: MESSAGE` and exits with the error's `exit_code` (2: the input or
the request cannot be used; 1: the run itself failed midway). `cli.common.OneLineErrors` applies
the rule to every command; the error classes live with the code that raises them, and `first_line`
is how a foreign exception is quoted inside one of these messages."""

from __future__ import annotations


class VarcmpError(Exception):
    """Base of every error a user can act on; one line, exit code `exit_code`."""

    exit_code = 2


class UserError(VarcmpError):
    """Something the user asked for that cannot be done (an option, a query, a split)."""


def first_line(e: BaseException, limit: int = 200) -> str:
    """`Type: the first line of the message` of any exception, at most `limit` characters of it."""
    text = (str(e).strip().splitlines() or [""])[0][:limit]
    return f"{type(e).__name__}: {text}" if text else type(e).__name__
