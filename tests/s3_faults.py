"""A fault-injecting HTTP proxy in front of the loopback S3 server, for tests: it forwards each
request to the server, except that it answers a chosen share with a 503 SlowDown error or closes
the connection without an answer (what a throttled or restarting S3 endpoint does), and it can be
taken down and brought back on the same port (an outage in the middle of a job).

    with FaultyProxy(upstream="http://127.0.0.1:5000", fail_every=5) as proxy:
        os.environ["AWS_ENDPOINT_URL"] = proxy.url
        ...
        proxy.counts  # {"forwarded": n, "503": n, "dropped": n}

Faults are deterministic (every `fail_every`-th request, alternating 503 and drop) so a failing
test replays. Listens on 127.0.0.1 only; `stop()` joins its thread, and `__exit__` always stops it.
"""

from __future__ import annotations

import http.client
import http.server
import socket
import socketserver
import threading
import urllib.parse
from typing import Any

SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
             b"<Message>Please reduce your request rate.</Message></Error>")
HOP_HEADERS = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade"}


class _Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True


class FaultyProxy:
    def __init__(self, upstream: str, fail_every: int = 0, port: int = 0,
                 max_faults: int | None = None) -> None:
        parsed = urllib.parse.urlparse(upstream)
        self.upstream_host, self.upstream_port = parsed.hostname, parsed.port
        self.fail_every = fail_every
        self.max_faults = max_faults
        self.counts = {"forwarded": 0, "503": 0, "dropped": 0}
        self._lock = threading.Lock()
        self._requests = 0
        self._port = port
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._port}"

    def _fault(self) -> str | None:
        """None to forward this request, else "503" or "dropped"."""
        with self._lock:
            self._requests += 1
            faults = self.counts["503"] + self.counts["dropped"]
            if not self.fail_every or self._requests % self.fail_every:
                return None
            if self.max_faults is not None and faults >= self.max_faults:
                return None
            kind = "503" if (self._requests // self.fail_every) % 2 else "dropped"
            self.counts[kind] += 1
            return kind

    def _handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def _relay(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                fault = proxy._fault()
                if fault == "dropped":
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if fault == "503":
                    self.send_response(503, "Slow Down")
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(SLOW_DOWN)))
                    self.end_headers()
                    self.wfile.write(SLOW_DOWN)
                    return
                upstream = http.client.HTTPConnection(proxy.upstream_host, proxy.upstream_port, timeout=60)
                try:
                    headers = {key: value for key, value in self.headers.items()
                               if key.lower() not in HOP_HEADERS}
                    upstream.request(self.command, self.path, body=body, headers=headers)
                    response = upstream.getresponse()
                    payload = response.read()
                finally:
                    upstream.close()
                with proxy._lock:
                    proxy.counts["forwarded"] += 1
                self.send_response(response.status, response.reason)
                for key, value in response.getheaders():
                    # A HEAD answer carries the object's length and no body: keep its header.
                    if key.lower() not in HOP_HEADERS and (key.lower() != "content-length"
                                                           or self.command == "HEAD"):
                        self.send_header(key, value)
                if self.command != "HEAD":
                    self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _relay

        return Handler

    def start(self) -> "FaultyProxy":
        self._server = _Server(("127.0.0.1", self._port), self._handler())
        self._port = self._server.server_address[1]  # fixed from now on: a restart reuses it
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True,
                                        name="faulty-s3-proxy")
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening (connections are refused until `start()` on the same port)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=10)
            self._server = None

    def __enter__(self) -> "FaultyProxy":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
