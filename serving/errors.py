"""Root of the errors a user can fix; the CLI prints them as one line."""

from __future__ import annotations


class UserError(Exception):
    """A problem with an input the user controls; the message names the file and the fix."""


class ImageError(UserError):
    """An image or mask file cannot be read or converted."""
