"""Fail fast on a tracking server that does not answer.

MLflow's HTTP client retries a dead server for minutes (urllib3 back-off, one warning per
attempt). Before the first call to an `http(s)://` tracking URI, one GET of `<uri>/health`
with a short timeout says in one line which URI is down and which variable points at it.
Standard library only: the light `flexunet predict` install uses it too.
"""

from __future__ import annotations

import urllib.error
import urllib.request

from common.errors import UserError

TIMEOUT_SECONDS = 5.0
_answered: set[str] = set()   # URIs that answered once in this process: not probed again


def require_reachable(uri: str, fix: str = "start it, or set MLFLOW_TRACKING_URI to a reachable server",
                      timeout: float = TIMEOUT_SECONDS) -> None:
    """Raise UserError unless the HTTP(S) tracking server at `uri` answers `/health`
    within `timeout` seconds. Other URIs (sqlite:, postgresql:, file:, databricks) pass
    untouched: their own clients fail fast. `fix`: what the user should do, for the message."""
    if not uri.startswith(("http://", "https://")) or uri in _answered:
        return
    health = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(health, timeout=timeout) as response:   # http(s) only, checked above
            response.read(64)
    except urllib.error.HTTPError as exc:
        if exc.code >= 500:   # a proxy in front of a dead server answers 502/503
            raise UserError(f"MLflow tracking server {uri} answered HTTP {exc.code} on /health; {fix}") from None
        # 401/403/404: something answers there (auth, a proxy without /health): let MLflow talk to it
    except OSError as exc:   # URLError, timeouts, refused or reset connections
        reason = getattr(exc, "reason", None) or exc
        text = (f"no answer within {timeout:g} s" if isinstance(reason, TimeoutError)
                else str(getattr(reason, "strerror", None) or reason))
        raise UserError(f"MLflow tracking server {uri} is not reachable ({text}); {fix}") from None
    _answered.add(uri)
