"""A file server on 127.0.0.1 for the tests of models by URL: serves the bytes it is
given by path (query strings ignored), answers the redirects it is given, records
each request's path, and answers 404 for anything else. Plain HTTP, or HTTPS with a
certificate from a test CA (``trustme``) that a test trusts through ``SSL_CERT_FILE``."""

from __future__ import annotations

import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class Files:
    def __init__(self, url: str) -> None:
        self.url = url
        self.files: dict[str, bytes] = {}
        self.redirects: dict[str, str] = {}
        self.requests: list[str] = []


@contextmanager
def serve_files(ca: Any = None) -> Iterator[Files]:
    """``ca``: a ``trustme.CA`` to serve HTTPS with a certificate for 127.0.0.1."""
    files: Files

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            files.requests.append(self.path)
            path = self.path.split("?", 1)[0]
            if path in files.redirects:
                self.send_response(302)
                self.send_header("Location", files.redirects[path])
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            body = files.files.get(path)
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    scheme = "http"
    if ca is not None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ca.issue_cert("127.0.0.1").configure_cert(context)
        server.socket = context.wrap_socket(server.socket, server_side=True)
        scheme = "https"
    files = Files(f"{scheme}://127.0.0.1:{server.server_address[1]}")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield files
    finally:
        server.shutdown()
        server.server_close()
