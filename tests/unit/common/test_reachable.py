"""common/reachable.py: a tracking server that does not answer is one UserError, fast."""

from __future__ import annotations

import http.server
import socket
import threading
import time

import pytest

from common import reachable
from common.errors import UserError


def _serve(status: int):
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(status)
            self.end_headers()
            self.wfile.write(b"OK")

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def test_a_closed_port_is_one_line_naming_the_uri_and_the_fix():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        uri = f"http://127.0.0.1:{s.getsockname()[1]}"   # bound, not listening: refused
        started = time.monotonic()
        with pytest.raises(UserError) as err:
            reachable.require_reachable(uri, "set MLFLOW_TRACKING_URI")
    assert time.monotonic() - started < 5
    message = str(err.value)
    assert "\n" not in message and uri in message and "not reachable" in message
    assert message.endswith("; set MLFLOW_TRACKING_URI")


def test_a_server_that_does_not_answer_in_time_is_an_error():
    with socket.socket() as s:   # listening, never accepting: the request times out
        s.bind(("127.0.0.1", 0))
        s.listen(0)
        uri = f"http://127.0.0.1:{s.getsockname()[1]}"
        with pytest.raises(UserError, match=r"no answer within 0\.3 s"):
            reachable.require_reachable(uri, timeout=0.3)


@pytest.mark.parametrize("status, ok", [(200, True), (404, True), (401, True), (503, False)])
def test_any_answer_but_a_server_error_counts_as_reachable(status, ok):
    server, uri = _serve(status)
    try:
        if ok:
            reachable.require_reachable(uri)
            assert uri in reachable._answered   # not asked again in this process
        else:
            with pytest.raises(UserError, match="answered HTTP 503"):
                reachable.require_reachable(uri)
    finally:
        server.shutdown()
        reachable._answered.discard(uri)


@pytest.mark.parametrize("uri", ["sqlite:///mlflow.db", "postgresql://u@h/db", "file:///tmp/mlruns", "databricks", ""])
def test_other_stores_are_not_probed(uri):
    reachable.require_reachable(uri)   # no network, no error
