"""`fedcore server --dashboard [HOST:]PORT`: a live, read-only web page of the run (rounds,
accuracy, loss and epsilon charts; every site with its state, last seen, rounds, drops and
privacy spent), behind a token. At start the server writes STATE/dashboard.url (mode 0600)
with the token in its query string; the page answers it with an HttpOnly, SameSite=Strict
cookie that its own polls of /api/state carry. No token: 401; a wrong one: 403; /healthz
answers without one. Served like the metrics endpoint (`fedcore.server.http`): 127.0.0.1
unless told otherwise, TLS with the server's certificate under `--pki`. Nothing here
changes the run: every endpoint only reads."""

from __future__ import annotations

import contextlib
import hmac
import json
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict
from http.cookies import CookieError, SimpleCookie
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs
from wsgiref.simple_server import WSGIServer

from fedcore.engine import RoundRecord
from fedcore.engine.records import finite, site_rows
from fedcore.engine.run_state import RunState
from fedcore.server.dashboard_page import CONTENT_SECURITY_POLICY, PAGE
from fedcore.server.http import plain, serve_wsgi
from fedcore.site_status import SiteStatus, tally

URL_FILE = "dashboard.url"
# Each response's headers besides its type: nothing cached, nothing framed or sniffed, and no
# Referer (the page's first URL holds the token).
_HEADERS = [
    ("Cache-Control", "no-store"),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    ("X-Frame-Options", "DENY"),
]


class Dashboard:
    """The run as the page shows it: a round store (`record`) fed every completed round,
    and the sites' live state (`seen`: each connected site's wall-clock last message) read
    at every request."""

    def __init__(
        self,
        *,
        run_id: str,
        rounds: int,
        seen: Callable[[], dict[str, float]],
        history: Iterable[RoundRecord] = (),
    ) -> None:
        self.run_id = run_id
        self.rounds = rounds
        self.seen = seen
        self._lock = threading.Lock()  # rounds come in on the run's thread, requests on others
        self._series: list[dict[str, Any]] = []
        self._sites: dict[str, SiteStatus] = {}
        self._last_seen: dict[str, float] = {}  # kept once a site disconnects
        for record in history:  # a resumed run's earlier rounds
            self.record(record)

    def record(self, record: RoundRecord, state: RunState | None = None) -> None:
        with self._lock:
            if self._series and record.round <= self._series[-1]["round"]:
                return  # a retried write enters a round once
            self._series.append(
                {
                    "round": record.round,
                    "accuracy": record.accuracy,
                    "loss": record.loss,
                    "epsilon": record.epsilon,
                    "seconds": record.seconds,
                    "sites": record.sites,
                    "sampled": len(record.sampled),
                    "dropped": len(record.dropped),
                }
            )
            tally(self._sites, record.round, site_rows(record))

    def state(self, since: int = 0) -> dict[str, Any]:
        """The run now, with the rounds after `since` (the page has the earlier ones)."""
        live = self.seen()
        with self._lock:
            self._last_seen.update(live)
            series = [r for r in self._series if r["round"] > since]
            last = self._series[-1] if self._series else {}
            sites = {name: asdict(s) for name, s in self._sites.items()}
            last_seen = dict(self._last_seen)
        for name in live:
            sites.setdefault(name, asdict(SiteStatus(name)))
        state = {
            "run_id": self.run_id,
            "rounds": self.rounds,
            "round": last.get("round", 0),
            "accuracy": last.get("accuracy"),
            "loss": last.get("loss"),
            "epsilon": last.get("epsilon"),
            "connected": len(live),
            "now": time.time(),
            "series": series,
            "sites": [
                {**row, "connected": name in live, "last_seen": last_seen.get(name)}
                for name, row in sorted(sites.items())
            ],
        }
        clean: dict[str, Any] = finite(state)
        return clean


class DashboardApp:
    """The WSGI app: the page and /api/state for the token's holder, /healthz for anyone."""

    def __init__(self, board: Dashboard, token: str, *, secure: bool) -> None:
        self.board = board
        self.token = token
        self.secure = secure  # served over TLS: the cookie travels over it alone
        self.cookie = "fedcore_dashboard"  # made unique to the port once bound (`serve_dashboard`)

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/healthz":
            return plain(start_response, "200 OK", "ok")
        if path not in ("/", "/api/state"):
            return plain(start_response, "404 Not Found", "not found")
        if environ.get("REQUEST_METHOD") != "GET":
            return plain(start_response, "405 Method Not Allowed", "read-only: GET", [("Allow", "GET")])
        query = parse_qs(environ.get("QUERY_STRING", ""))
        given = self._given(environ, query)
        if given is None:
            challenge = [("WWW-Authenticate", 'Bearer realm="fedcore dashboard"')]
            return plain(start_response, "401 Unauthorized", "open the URL in STATE/dashboard.url", challenge)
        if not hmac.compare_digest(given.encode(), self.token.encode()):
            return plain(start_response, "403 Forbidden", "wrong token")
        if path == "/":
            cookie = (
                f"{self.cookie}={self.token}; Path=/; HttpOnly; SameSite=Strict" + "; Secure" * self.secure
            )
            headers = [("Content-Security-Policy", CONTENT_SECURITY_POLICY), ("Set-Cookie", cookie)]
            return _send(start_response, PAGE.encode(), "text/html; charset=utf-8", headers)
        try:
            since = int(query.get("since", ["0"])[0])
        except ValueError:
            since = 0
        body = json.dumps(self.board.state(since), allow_nan=False).encode()
        return _send(start_response, body, "application/json", [])

    def _given(self, environ: dict[str, Any], query: dict[str, list[str]]) -> str | None:
        """The token a request offers: in the query, an `Authorization: Bearer` header or the
        page's cookie (None: none offered)."""
        if "token" in query:
            return query["token"][0]
        scheme, _, credentials = str(environ.get("HTTP_AUTHORIZATION", "")).partition(" ")
        if scheme.lower() == "bearer" and credentials:
            return credentials.strip()
        cookies: SimpleCookie = SimpleCookie()
        with contextlib.suppress(CookieError):
            cookies.load(str(environ.get("HTTP_COOKIE", "")))
        morsel = cookies.get(self.cookie)
        return str(morsel.value) if morsel is not None else None


def _send(
    start_response: Callable[..., Any], body: bytes, kind: str, headers: list[tuple[str, str]]
) -> list[bytes]:
    start_response(
        "200 OK", [("Content-Type", kind), ("Content-Length", str(len(body))), *_HEADERS, *headers]
    )
    return [body]


def serve_dashboard(
    listen: str, board: Dashboard, *, state: Path, tls: tuple[Path, Path] | None = None
) -> tuple[WSGIServer, int]:
    """Serve the dashboard on `listen` in a daemon thread with a new token, and write its
    URL (token included) to STATE/dashboard.url, readable by the server's user alone;
    (server, port)."""
    app = DashboardApp(board, secrets.token_urlsafe(32), secure=tls is not None)
    httpd, host, port = serve_wsgi(listen, app, tls=tls, name="dashboard")
    app.cookie = f"fedcore_dashboard_{port}"  # cookies ignore ports: one per dashboard
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1"  # any address: the local one opens it
    shown = f"[{host}]" if ":" in host else host
    scheme = "https" if tls else "http"
    write_private(state / URL_FILE, f"{scheme}://{shown}:{port}/?token={app.token}\n")
    return httpd, port


def write_private(path: Path, text: str) -> None:
    """Write `path` atomically, created with mode 0600 (never readable by others, not even
    for a moment: no chmod after the fact)."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        temporary.unlink()
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "w") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
        raise
