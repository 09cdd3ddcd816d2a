"""The one exception users see for misuse."""

from __future__ import annotations


class OffloadError(ValueError):
    """Raised for anything a user can get wrong: the message names the argument and the fix."""
