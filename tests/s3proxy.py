"""An S3 proxy on loopback for the fault tests and the object-store benchmark (no pytest needed)."""

from __future__ import annotations

import http.client
import http.server
import socket
import threading
import time
import urllib.parse


class FaultyProxy:
    """An HTTP proxy on loopback in front of moto's S3 server that injects faults and latency:
    every ``throttle_every``-th request answers 503 SlowDown, PUTs whose path contains ``fail_put``
    always answer 500, and every request is held ``latency_s`` before it is passed on (an object
    store's latency). It counts and logs the requests it gets."""

    def __init__(self, upstream_port: int, throttle_every: int = 0, fail_put: str | None = None,
                 latency_s: float = 0.0):
        proxy = self
        self.count = 0
        self.injected = 0
        self.log: list[tuple[str, str]] = []  # (method, path) in the order requests arrived
        # requests the upstream server could not answer (it was down): answered 503 here, so clients retry
        self.upstream_failures: list[tuple[str, str, str]] = []
        self.lock = threading.Lock()

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def _fault(self, code: int, text: str) -> None:
                body = (f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{text}</Code>"
                        f"<Message>injected</Message></Error>").encode()
                self.send_response(code)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Content-Type", "application/xml")
                self.end_headers()
                self.wfile.write(body)

            def _any(self):
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else None
                with proxy.lock:
                    proxy.count += 1
                    c = proxy.count
                    proxy.log.append((self.command, urllib.parse.unquote(self.path)))
                if proxy.fail_put and self.command == "PUT" and proxy.fail_put in self.path:
                    proxy.injected += 1
                    return self._fault(500, "InternalError")
                if proxy.throttle_every and c % proxy.throttle_every == 0:
                    proxy.injected += 1
                    return self._fault(503, "SlowDown")
                if proxy.latency_s:
                    time.sleep(proxy.latency_s)
                conn = http.client.HTTPConnection("127.0.0.1", upstream_port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                headers["Host"] = f"127.0.0.1:{upstream_port}"
                try:
                    conn.request(self.command, self.path, body=body, headers=headers)
                    r = conn.getresponse()
                    data = r.read()
                except OSError as exc:  # the server is down (stopped mid-run by a test)
                    with proxy.lock:
                        proxy.upstream_failures.append((self.command, urllib.parse.unquote(self.path),
                                                        type(exc).__name__))
                    conn.close()
                    return self._fault(503, "ServiceUnavailable")
                self.send_response(r.status)
                for k, v in r.getheaders():
                    if k.lower() not in ("transfer-encoding", "content-length", "connection"):
                        self.send_header(k, v)
                # HEAD carries the object's size without a body: pass the upstream length through.
                length = r.getheader("Content-Length") if self.command == "HEAD" else str(len(data))
                self.send_header("Content-Length", length or "0")
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _any

        self.throttle_every, self.fail_put, self.latency_s = throttle_every, fail_put, latency_s
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()
