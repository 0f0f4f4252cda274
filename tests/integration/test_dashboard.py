"""`fedcore server --dashboard`: the live page in a real headless browser (Debian's chromium,
driven by Playwright) against a real server and three site agents on 127.0.0.1: the page
opened from STATE/dashboard.url (mode 0600) shows each round as it completes, draws its
charts and lists the sites; without the token the page and its data are refused (401, 403
for a wrong one) while /healthz answers; a site's words are shown as text, never markup."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import ssl
import stat
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fedcore import pki
from fedcore.aggregation import Drop, DropReason, RefusalCode
from fedcore.engine import RoundRecord
from fedcore.server.app import serve
from fedcore.server.dashboard import Dashboard, serve_dashboard
from tests.integration.test_grpc_rounds import agent, experiment

pytestmark = pytest.mark.integration  # about 10 s with the browser

CHARTS = ("accuracy", "loss", "epsilon", "seconds", "sites")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    chromium = shutil.which("chromium")
    if chromium is None:
        why = "needs Debian's chromium: apt-get install chromium (.ci/run installs it)"
        if os.environ.get("CI"):  # CI must run it, never skip it
            pytest.fail(why)
        pytest.skip(why)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        launched = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        yield launched
        launched.close()


def fetch(url: str, headers: dict[str, str] | None = None, method: str = "GET") -> tuple[int, Any, bytes]:
    request = urllib.request.Request(url, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(request, timeout=5) as reply:
            return reply.status, reply.headers, reply.read()
    except urllib.error.HTTPError as err:
        with err:
            return err.code, err.headers, err.read()


def open_page(browser: Any, url: str) -> tuple[Any, list[str]]:
    """A page at `url`, and the list its script errors and console errors (a blocked
    script, a CSP violation) go to."""
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.goto(url)
    return page, errors


def test_the_dashboard_shows_the_run_live_behind_its_token(tmp_path: Path, browser: Any) -> None:
    rounds, names = 4, ["site-1", "site-2", "site-3"]
    state = tmp_path / "state"
    shown = {k: threading.Event() for k in range(1, rounds + 1)}  # the page showed round k
    outcome: dict[str, Any] = {}

    def on_round(record: RoundRecord) -> None:  # the next round waits for the page (bounded)
        shown[record.round].wait(30)

    def federation() -> None:
        async def main() -> object:
            listening: asyncio.Future[int] = asyncio.get_running_loop().create_future()
            server = asyncio.ensure_future(
                serve(
                    experiment(
                        federation__start_sites=3,
                        federation__rounds=rounds,
                        privacy__mode="user-central",
                        privacy__noise_multiplier=1.0,
                    ),
                    listen="127.0.0.1:0",
                    state=state,
                    pki_dir=None,
                    on_listening=listening.set_result,
                    on_round=on_round,
                    dashboard="127.0.0.1:0",
                )
            )
            port = await listening
            sites = [asyncio.ensure_future(agent(port, name).run()) for name in names]
            result = await asyncio.wait_for(server, 150)
            await asyncio.gather(*sites)
            return result

        try:
            outcome["result"] = asyncio.run(main())
        except BaseException as err:
            outcome["error"] = err

    run = threading.Thread(target=federation, name="federation", daemon=True)
    started = time.monotonic()
    run.start()
    url_file = state / "dashboard.url"
    try:
        while not url_file.exists():  # written once the dashboard serves
            assert run.is_alive() and time.monotonic() - started < 60, outcome
            time.sleep(0.05)
        assert stat.S_IMODE(url_file.stat().st_mode) == 0o600
        url = url_file.read_text().strip()
        assert url.startswith("http://127.0.0.1:") and "/?token=" in url
        base, token = url.split("/?token=")

        # Refused without the token, or with a wrong one; /healthz for anyone; nothing to POST.
        assert fetch(base + "/")[0] == 401 and fetch(base + "/api/state")[0] == 401
        assert fetch(base + "/?token=wrong")[0] == 403
        assert (
            fetch(base + "/api/state", {"Cookie": f"fedcore_dashboard_{base.rpartition(':')[2]}=x"})[0] == 403
        )
        assert fetch(base + "/api/state", {"Authorization": "Bearer " + token[:-1]})[0] == 403
        assert fetch(base + "/healthz")[:1] == (200,)
        assert fetch(base + "/api/state", {"Authorization": "Bearer " + token}, "POST")[0] == 405
        status, headers, body = fetch(url)
        assert status == 200 and b"<canvas" not in body and b"<svg" in body
        assert "HttpOnly" in headers["Set-Cookie"] and "SameSite=Strict" in headers["Set-Cookie"]
        assert "script-src 'sha256-" in headers["Content-Security-Policy"]
        status, _, body = fetch(base + "/api/state", {"Authorization": "Bearer " + token})
        assert status == 200 and json.loads(body)["rounds"] == rounds

        page, errors = open_page(browser, url)
        assert "token" not in page.url  # the cookie carries it from here on
        seen: list[int] = []
        while len(seen) < rounds:
            assert run.is_alive() and time.monotonic() - started < 120, (seen, outcome)
            k = int(page.text_content("#round") or 0)
            if k and (not seen or k != seen[-1]):
                seen.append(k)
            if 0 < k < rounds:
                shown[k].set()
            page.wait_for_timeout(50)
        assert seen == list(range(1, rounds + 1)), seen  # every round, live, in order

        # The last round on the page (the run waits for it): its charts and its sites.
        for key in CHARTS:
            points = page.get_attribute(f"#chart-{key} polyline", "points") or ""
            assert len(points.split()) == rounds, (key, points)
        rows = page.query_selector_all("#sites tbody tr")
        assert [r.get_attribute("data-site") for r in rows] == names
        for row in rows:
            cells = [c.text_content() for c in row.query_selector_all("td")]
            assert cells[1] == "connected" and cells[3] == str(rounds) and cells[6] == "0", cells
        assert page.text_content("#rounds") == str(rounds) and float(page.text_content("#epsilon") or 0) > 0
        page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)
        assert (tmp_path / "dashboard.png").stat().st_size > 10_000
        assert not errors, errors
        page.close()
    finally:
        for event in shown.values():
            event.set()
        run.join(60)
    assert "error" not in outcome, outcome
    assert len(outcome["result"].records) == rounds
    with pytest.raises(urllib.error.URLError):  # stopped with the run
        urllib.request.urlopen(base + "/healthz", timeout=5)


def test_a_sites_words_are_shown_as_text_never_markup(tmp_path: Path, browser: Any) -> None:
    hostile = "site-<b>2</b>"
    refusal = "<img src=x onerror=\"document.title='pwned'\"> budget spent"
    record = RoundRecord(
        round=1,
        sites=1,
        accuracy=0.5,
        loss=0.25,
        seconds=1.5,
        sampled=["site-1", hostile],
        dropped={hostile: Drop(DropReason.REFUSED, "fit", refusal, RefusalCode.PRIVACY_BUDGET)},
        epsilon=0.8,
        site_epsilon={"site-1": 0.8},
    )
    board = Dashboard(run_id="r-1", rounds=3, seen=lambda: {hostile: time.time()}, history=[record])
    httpd, _ = serve_dashboard("127.0.0.1:0", board, state=tmp_path)
    try:
        page, errors = open_page(browser, (tmp_path / "dashboard.url").read_text().strip())
        page.wait_for_selector("#sites tbody tr >> nth=1", timeout=10_000)
        rows = {
            r.get_attribute("data-site"): [c.text_content() for c in r.query_selector_all("td")]
            for r in page.query_selector_all("#sites tbody tr")
        }
        assert rows[hostile][:2] == [hostile, "connected"]
        assert rows[hostile][7] == "refused \u00d71" and refusal in (rows[hostile][8] or "")
        assert rows["site-1"][1] == "disconnected" and rows["site-1"][9] == "0.800"
        assert page.locator("img, b").count() == 0 and page.title() == "fedcore dashboard"
        assert not errors, errors
        page.close()
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_under_pki_the_dashboard_is_https_with_the_servers_certificate(tmp_path: Path) -> None:
    pki.init(tmp_path / "pki", ["127.0.0.1"])
    tls = (tmp_path / "pki" / "server.crt", tmp_path / "pki" / "server.key")
    board = Dashboard(run_id="r-1", rounds=3, seen=dict)
    httpd, port = serve_dashboard("127.0.0.1:0", board, state=tmp_path, tls=tls)
    trust = ssl.create_default_context(cafile=str(tmp_path / "pki" / "ca.crt"))
    try:
        url = (tmp_path / "dashboard.url").read_text().strip()
        assert url.startswith(f"https://127.0.0.1:{port}/?token=")
        base = url.partition("/?")[0]
        with urllib.request.urlopen(base + "/healthz", timeout=5, context=trust) as reply:
            assert reply.status == 200
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(base + "/api/state", timeout=5, context=trust)
        refused.value.close()
        assert refused.value.code == 401
        with urllib.request.urlopen(url, timeout=5, context=trust) as reply:
            assert reply.status == 200 and "; Secure" in reply.headers["Set-Cookie"]
    finally:
        httpd.shutdown()
        httpd.server_close()
