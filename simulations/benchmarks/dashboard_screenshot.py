"""A screenshot of `fedcore server --dashboard`: a short real federation on loopback (the
server and five site agents in this process; breast_cancer with sample-level DP, so each
site reports the privacy it spent; site-5 holds a small budget, spends it, then refuses
rounds), its dashboard opened in headless Chromium (Debian's `chromium`, driven by
Playwright) at the URL the server wrote to STATE/dashboard.url, and saved once the last
round is on the page (the run waits for it).

    python simulations/benchmarks/dashboard_screenshot.py [--rounds N] [--out PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from fedcore import load_experiment
from fedcore.client.agent import AgentSettings, SiteAgent
from fedcore.engine import RoundRecord
from fedcore.privacy.site_policy import SitePolicy, SitePrivacy
from fedcore.server.app import serve
from fedcore.tasks import build_task

SITES = 5
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "results" / "dashboard.png"
SMALL_BUDGET = 7.0  # site-5's max_epsilon: spent in two rounds (4.4, then 6.6)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    chromium = shutil.which("chromium")
    if chromium is None:
        print("needs Debian's chromium: apt-get install chromium", file=sys.stderr)
        return 1
    from playwright.sync_api import sync_playwright

    shown = threading.Event()  # the screenshot is taken: the run may end
    done: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        state = Path(tmp) / "state"

        def on_round(record: RoundRecord) -> None:
            dropped = {site: str(drop) for site, drop in record.dropped.items()}
            print(
                f"round {record.round}/{args.rounds}: accuracy {record.accuracy:.3f}, "
                f"epsilon {record.epsilon or 0:.2f}{', dropped ' + str(dropped) if dropped else ''}",
                flush=True,
            )
            if record.round == args.rounds:
                shown.wait(60)

        run = threading.Thread(target=federate, args=(state, args.rounds, on_round, done), daemon=True)
        started = time.monotonic()
        run.start()
        try:
            url_file = state / "dashboard.url"
            while not url_file.exists():
                if not run.is_alive() or time.monotonic() - started > 60:
                    raise RuntimeError(f"the server never wrote {url_file}: {done}")
                time.sleep(0.05)
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
                page = browser.new_page(viewport={"width": 1400, "height": 600})
                page.goto(url_file.read_text().strip())
                print(f"dashboard open at {page.url} (the token now in its cookie)", flush=True)
                while page.text_content("#round") != str(args.rounds):
                    if not run.is_alive() or time.monotonic() - started > 600:
                        raise RuntimeError(f"the page never showed round {args.rounds}: {done}")
                    page.wait_for_timeout(200)
                page.wait_for_timeout(1200)  # one more poll: every site's last seen "now"
                args.out.parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(args.out), full_page=True)
                browser.close()
        finally:
            shown.set()
            run.join(60)
    if "error" in done:
        raise done["error"]
    print(f"saved {args.out}")
    return 0


def federate(state: Path, rounds: int, on_round: Any, done: dict[str, Any]) -> None:
    experiment = load_experiment().override(
        task__name="breast_cancer",
        federation__rounds=rounds,
        federation__min_sites=2,
        federation__start_sites=SITES,
        federation__round_timeout=60.0,
        simulation__sites=SITES,
        privacy__mode="sample",
        privacy__noise_multiplier=1.0,
    )

    async def run() -> None:
        listening: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        server = asyncio.ensure_future(
            serve(
                experiment,
                listen="127.0.0.1:0",
                state=state,
                pki_dir=None,
                on_listening=listening.set_result,
                on_round=on_round,
                dashboard="127.0.0.1:0",
            )
        )
        port = await listening
        agents = [
            SiteAgent(
                AgentSettings(
                    server=f"127.0.0.1:{port}",
                    task_name="breast_cancer",
                    data_uri=f"builtin:{k}/{SITES}",
                    tls=None,
                    site_name=f"site-{k}",
                    give_up_after=30.0,
                ),
                build_task("breast_cancer"),
                SitePrivacy(SitePolicy(max_epsilon=SMALL_BUDGET if k == SITES else None)),
            )
            for k in range(1, SITES + 1)
        ]
        sites = [asyncio.ensure_future(a.run()) for a in agents]
        await asyncio.wait_for(server, 600)
        await asyncio.gather(*sites)

    try:
        asyncio.run(run())
    except BaseException as err:
        done["error"] = err


if __name__ == "__main__":
    sys.exit(main())
