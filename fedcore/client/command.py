"""`fedcore client`: a site's agent from the command line and its site file."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from fedcore.errors import ConfigError

EXIT_CONFIG = 2
EXIT_REJECTED = 3


def add_command(sub: argparse._SubParsersAction, *, run: Callable[[argparse.Namespace], int]) -> None:  # type: ignore[type-arg]
    cli = sub.add_parser("client", help="run a site's agent (dials out to the server)")
    cli.add_argument("--config", help="site file (TOML, see client/site.toml); flags override it")
    cli.add_argument("--server", help="HOST:PORT of the server")
    cli.add_argument("--pki", help="this site's kit folder from `fedcore pki add-site`")
    cli.add_argument("--task", help="the installed task this site trains")
    cli.add_argument("--data", help="builtin:K/N (part K of N of the bundled data), a file or a folder")
    cli.add_argument("--label", help="tabular: the label column of --data (default: the job's)")
    cli.add_argument("--insecure", action="store_true", help="plaintext, no authentication")
    cli.add_argument("--name", help="site name (only with --insecure)")
    cli.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    cli.add_argument(
        "--give-up-after", type=float, help="seconds without a server before exiting (default 600)"
    )
    cli.add_argument("--privacy-ledger", help="this site's privacy ledger (default: in its kit folder)")
    cli.add_argument("--max-epsilon", type=float, help="this site's total privacy budget (all runs)")
    cli.add_argument("-v", "--verbose", action="store_true")
    cli.set_defaults(run=run)


def run(args: argparse.Namespace, *, setup_logging: Callable[[bool], None], insecure_warning: str) -> int:
    """`fedcore client`: exit 0 when the run ended, 1 when the agent gave up, 2 for this
    site's bad configuration or data, 3 when the server refused the site."""
    from fedcore import pki
    from fedcore.client.agent import AgentSettings, Outcome, SiteAgent
    from fedcore.client.site_config import load_site_config, site_privacy
    from fedcore.client.task_policy import parse_policy
    from fedcore.tasks import build_task
    from fedcore.tasks.torch_task import check_device

    site = load_site_config(args.config) if args.config else {}

    def pick(flag: object, key: str, what: str | None = None) -> object:
        value = flag if flag is not None else site.get(key)
        if value is None and what:
            raise ConfigError(f"give {what} (or set {key.replace('.', ' ')} in the site file)")
        return value

    server = str(pick(args.server, "server.address", "--server HOST:PORT"))
    task_name = str(pick(args.task, "data.task", "--task TASK"))
    data_uri = str(pick(args.data, "data.uri", "--data URI"))
    kit = pick(args.pki, "identity.kit")
    insecure = bool(args.insecure or site.get("identity.insecure", False))
    name = pick(args.name, "identity.name")
    if insecure == (kit is not None):
        raise ConfigError("give either --pki KIT (this site's kit folder) or --insecure")
    if insecure and not name:
        raise ConfigError("--insecure needs --name NAME (with --pki the certificate names the site)")
    try:
        task = build_task(task_name, None)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    device = pick(args.device, "agent.device")
    check_device(str(device) if device else None)
    if device:
        task.device = device  # type: ignore[attr-defined]
    tls = pki.site_files(Path(str(kit))) if kit else None
    if insecure:
        print(insecure_warning, file=sys.stderr)
    setup_logging(args.verbose)
    settings = AgentSettings(
        server=server,
        task_name=task_name,
        data_uri=data_uri,
        tls=tls,
        site_name=str(name or ""),
        give_up_after=float(pick(args.give_up_after, "agent.give_up_after") or 600.0),  # type: ignore[arg-type]
        approved_tasks=parse_policy(site["policy.tasks"]) if "policy.tasks" in site else None,
        audit=Path(
            str(
                site.get("agent.audit")
                or (Path(str(kit)) / "audit.log" if kit else f"fedcore-audit-{name}.log")
            )
        ),
        data_settings={
            k: v
            for k, v in (("label", pick(args.label, "data.label")), ("features", site.get("data.features")))
            if v is not None
        },
    )
    agent = SiteAgent(settings, task, site_privacy(site, args.privacy_ledger, args.max_epsilon, kit, name))
    outcome = asyncio.run(agent.run())
    if outcome is Outcome.BAD_DATA:  # one line, and nothing of the data went to the server
        print(f"fedcore: error: {agent.problem}", file=sys.stderr)
        return EXIT_CONFIG
    logging.getLogger("fedcore.client").info("site agent finished: %s", outcome.value)
    return {Outcome.COMPLETED: 0, Outcome.STOPPED: 0, Outcome.GAVE_UP: 1, Outcome.REJECTED: EXIT_REJECTED}[
        outcome
    ]
