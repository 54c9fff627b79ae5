"""The errors a user can fix: the CLI prints them as one line (no traceback unless --debug).

TF-free, so the light `flexunet predict` install raises the same types as the pipeline."""

from __future__ import annotations


class UserError(Exception):
    """A problem with an input the user controls; the message names the file and the fix."""


class ImageError(UserError):
    """An image or mask file cannot be read or converted."""


class FlexUNetError(UserError):
    """A problem the user can fix: the message names the file or key and what to do."""


class ParamsError(FlexUNetError):
    """params.yaml is missing, malformed, has an unknown key or an impossible value."""


class DataError(FlexUNetError):
    """An image or mask on disk cannot be used (unreadable, missing pair, bad colour...)."""
