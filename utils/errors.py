"""The one exception a user's mistake raises: scripts print its message as one ``error:`` line and exit 2."""

from __future__ import annotations

__all__ = ["UserError"]


class UserError(Exception):
    """A mistake in the user's input (file, argument, folder): reported as one line, never a traceback."""
