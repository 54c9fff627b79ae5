"""The one exception type users see as a single clear line (no traceback unless --debug)."""

from __future__ import annotations

from serving.errors import UserError


class FlexUNetError(UserError):
    """A problem the user can fix: the message names the file or key and what to do."""


class ParamsError(FlexUNetError):
    """params.yaml is missing, malformed, has an unknown key or an impossible value."""


class DataError(FlexUNetError):
    """An image or mask on disk cannot be used (unreadable, missing pair, bad colour...)."""
