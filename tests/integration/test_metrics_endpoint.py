"""`fedcore server --metrics`: the Prometheus endpoint of a real server on 127.0.0.1,
parsed with prometheus_client's own parser, its values against the run's records (what
metrics.jsonl holds), /healthz for liveness, and refused connections counted by reason."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from fedcore.engine import RoundRecord
from fedcore.server.app import serve
from tests.integration.test_grpc_rounds import agent, experiment
from tests.integration.test_site_identity import _hello


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    return {
        sample.name + json.dumps(sample.labels, sort_keys=True) * bool(sample.labels): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_the_metrics_endpoint_matches_the_records(tmp_path: Path) -> None:
    rounds, seen = 3, {}
    ports: dict[str, int] = {}

    def on_round(record: RoundRecord) -> None:
        if record.round == rounds:  # under DP a round is stored before on_round: no race
            seen.update(scrape(ports["metrics"]))
            with urllib.request.urlopen(f"http://127.0.0.1:{ports['metrics']}/healthz", timeout=5) as reply:
                seen["healthz"] = reply.status
            with pytest.raises(urllib.error.HTTPError):
                urllib.request.urlopen(f"http://127.0.0.1:{ports['metrics']}/other", timeout=5)

    async def main() -> object:
        listening: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        server = asyncio.ensure_future(
            serve(
                experiment(
                    federation__start_sites=2,
                    federation__rounds=rounds,
                    privacy__mode="user-central",
                    privacy__noise_multiplier=1.0,
                ),
                listen="127.0.0.1:0",
                state=tmp_path / "state",
                pki_dir=None,
                on_listening=listening.set_result,
                on_round=on_round,
                metrics="127.0.0.1:0",
                on_metrics=lambda p: ports.update(metrics=p),
            )
        )
        port = await listening
        refused = await _hello(port, "bad\nname")  # counted, by reason
        sites = [asyncio.ensure_future(agent(port, f"site-{k}").run()) for k in (1, 2)]
        result = await asyncio.wait_for(server, 60)
        await asyncio.gather(*sites)
        return result, refused

    _, refused = asyncio.run(main())
    records = [json.loads(x) for x in (tmp_path / "state" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == rounds and seen["healthz"] == 200
    assert seen["fedcore_round"] == rounds
    assert seen["fedcore_sites_connected"] == 2
    assert seen["fedcore_round_seconds_count"] == rounds
    assert seen["fedcore_round_seconds_sum"] == pytest.approx(sum(r["seconds"] for r in records))
    assert seen["fedcore_bytes_sent_total"] == sum(r["bytes_sent"] for r in records)
    assert seen["fedcore_bytes_received_total"] == sum(r["bytes_received"] for r in records)
    assert seen["fedcore_loss"] == pytest.approx(records[-1]["loss"])
    assert (
        seen["fedcore_epsilon"] == pytest.approx(records[-1]["epsilon"], rel=1e-12)
        and seen["fedcore_epsilon"] > 0
    )
    assert seen['fedcore_connections_refused_total{"reason": "unauthenticated"}'] == 1
    assert refused[0] is not None


def test_many_idle_connections_hold_a_bounded_number_of_threads() -> None:
    """Anyone who can reach the port may dial it: 200 connections that never send a byte hold
    at most `max_connections` threads (and descriptors); once they go, scrapes are served."""
    import socket
    import threading

    from fedcore.server.http import _Server
    from fedcore.server.metrics import ServerMetrics, serve_metrics

    httpd, port = serve_metrics("127.0.0.1:0", ServerMetrics())
    before = threading.active_count()
    idle = []
    try:
        for _ in range(200):
            idle.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        for _ in range(50):  # bounded: the accept loop takes them in turn
            if threading.active_count() >= before + _Server.max_connections:
                break
            threading.Event().wait(0.05)
        assert threading.active_count() <= before + _Server.max_connections
    finally:
        for s in idle:
            s.close()
    for _ in range(100):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as reply:
                assert reply.status == 200
            break
        except OSError:
            threading.Event().wait(0.1)
    else:
        raise AssertionError("the endpoint did not come back")
    httpd.shutdown()
    httpd.server_close()
