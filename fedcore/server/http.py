"""The server's small HTTP endpoints (`--metrics`, `--dashboard`): a WSGI app served in a
daemon thread, a thread per connection with a timeout, on 127.0.0.1 unless told otherwise,
and with TLS (the server's certificate) under `--pki`."""

from __future__ import annotations

import logging
import socket
import socketserver
import ssl
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

log = logging.getLogger(__name__)

WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


class _Server(socketserver.ThreadingMixIn, WSGIServer):
    """A thread per connection, each with a timeout: a client that says nothing (or stalls
    its TLS handshake, done in its own thread) holds only its own thread, never the accept loop."""

    daemon_threads = True
    timeout_seconds = 10.0
    # Connections served at once; more are closed at accept. Threads and descriptors stay
    # bounded (within the server's RESERVED_FILES) however many clients dial or dawdle.
    max_connections = 64

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._slots = threading.BoundedSemaphore(self.max_connections)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def get_request(self) -> tuple[Any, Any]:
        sock, address = super().get_request()
        sock.settimeout(self.timeout_seconds)
        return sock, address

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A peer that speaks plain HTTP to TLS, or hangs up mid-request: one line, no traceback
        # on the operator's stderr (anyone who can reach the port could fill it).
        log.debug("web request from %s failed", client_address, exc_info=True)


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # a scrape every few seconds: not news
        pass


def split_listen(listen: str) -> tuple[str, int]:
    """HOST:PORT, or PORT alone for 127.0.0.1 ([::1]:PORT for IPv6)."""
    host, _, port = listen.rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port)


def serve_wsgi(
    listen: str, app: WsgiApp, *, tls: tuple[Path, Path] | None, name: str
) -> tuple[WSGIServer, str, int]:
    """Serve `app` on `listen` in a daemon thread named fedcore-`name`; with `tls`
    (certificate, key), over TLS. (server, host, port bound); stop it with shutdown()."""
    host, port = split_listen(listen)
    server_class = _Server6 if ":" in host else _Server
    httpd = make_server(host, port, app, server_class=server_class, handler_class=_Quiet)
    if tls is not None:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(str(tls[0]), str(tls[1]))
        httpd.socket = context.wrap_socket(httpd.socket, server_side=True, do_handshake_on_connect=False)
    threading.Thread(target=httpd.serve_forever, name=f"fedcore-{name}", daemon=True).start()
    bound = int(httpd.server_address[1])
    log.info("%s on %s://%s:%d/", name, "https" if tls else "http", host, bound)
    return httpd, host, bound


def plain(
    start_response: Callable[..., Any], status: str, text: str, headers: Iterable[tuple[str, str]] = ()
) -> list[bytes]:
    """A short text/plain answer (`/healthz`'s "ok", a refusal's reason)."""
    body = f"{text}\n".encode()
    kind = [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))]
    start_response(status, [*kind, ("Cache-Control", "no-store"), *headers])
    return [body]
