"""Every AWS failure ends in one line naming the call and the error, never a traceback
(issue 20): a real HTTP endpoint answering an HTML 500 page, and one refusing connections."""
from __future__ import annotations

import http.server
import socket
import threading

import pytest

HTML_500 = (b"<!DOCTYPE html>\n<html><head><meta charset=utf-8><title>500</title></head>\n"
            b"<body><p>Internal Server Error<br></body></html>\n")


class _Html500(http.server.BaseHTTPRequestHandler):
    def _answer(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(500)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(HTML_500)))
        self.end_headers()
        self.wfile.write(HTML_500)

    do_GET = do_POST = _answer

    def log_message(self, *args):
        pass


@pytest.fixture
def html_500(aws_env):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Html500)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@pytest.fixture
def refused(aws_env):
    """A port nothing listens on (bound, then closed)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return f"http://127.0.0.1:{port}"


def _one_line_naming(err: str, call: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"spotrun: AWS {call} failed: "), err


@pytest.mark.parametrize("argv, call", [
    (("init",), "DescribeAvailabilityZones"),
    (("launch",), "DescribeAvailabilityZones"),
    (("status",), "DescribeFleets"),
    (("cancel",), "DescribeFleets"),
])
def test_an_html_error_page_is_one_line(argv, call, html_500, job_file, spotrun):
    """EC2's XML parser raises ResponseParserError on the HTML: before the fix it escaped the
    CLI's handler (it is not a BotoCoreError) and ended in a traceback."""
    code, _, err = spotrun(*argv, "-f", job_file(), "--endpoint-url", html_500)
    assert code == 1
    _one_line_naming(err, call)
    assert "not an AWS response" in err


def test_a_refused_connection_names_the_call(refused, job_file, spotrun):
    """Before the fix: 'AWS: Could not connect to the endpoint URL', without the call."""
    code, _, err = spotrun("status", "-f", job_file(), "--endpoint-url", refused)
    assert code == 1
    _one_line_naming(err, "DescribeFleets")
    assert "Could not connect" in err
