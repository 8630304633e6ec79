"""What a user asked for that cannot be done: a one-line message, exit code 2."""

from __future__ import annotations


class UserError(Exception):
    """Something the user asked for that cannot be done: a one-line message, exit code 2."""
