"""The `fedcore` command: simulate | server | client | pki.

Bad configuration or arguments exit with code 2 and one line saying what is wrong.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from fedcore import audit, lifecycle, privacy_audit, run_status, task_packages
from fedcore.client import command as client_command
from fedcore.config import AggregationRule, Backend, Experiment, PrivacyMode, StrategyName, load_experiment
from fedcore.errors import ConfigError, FedcoreError

EXIT_CONFIG = 2
INSECURE_WARNING = "WARNING: --insecure: traffic is plaintext and sites are not authenticated; use only for local experiments"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_CONFIG, f"fedcore: error: {message} (see '{self.prog} --help')\n")


# Command-line flags -> experiment settings (TABLE__KEY); a flag not given is None.
_FLAGS = {
    "task": "task__name", "model": "task__model", "rounds": "federation__rounds",
    "min_sites": "federation__min_sites", "sites_per_round": "federation__sites_per_round",
    "sites": "simulation__sites", "workers": "simulation__workers", "backend": "simulation__backend",
    "ray_address": "simulation__ray_address", "seed": "data__seed", "partition": "data__partition",
    "strategy": "strategy__name", "aggregation": "aggregation__rule", "privacy": "privacy__mode",
    "noise_multiplier": "privacy__noise_multiplier", "target_epsilon": "privacy__target_epsilon", "data": "task__data",
    "label": "task__label",
}  # fmt: skip


def _experiment(args: argparse.Namespace) -> Experiment:
    """The experiment file (or defaults) with the command line's flags on top."""
    flags = {key: getattr(args, flag, None) for flag, key in _FLAGS.items()}
    secure = True if getattr(args, "secure_aggregation", False) else None
    return load_experiment(args.config).override(**flags, secure_aggregation__enabled=secure)


def _command(args: argparse.Namespace, config: str | None) -> dict[str, object]:
    """How the experiment was given: the command line and the experiment file's text."""
    return {
        "argv": args.argv,
        "config_file": config,
        "config_text": Path(config).read_text() if config else None,
    }


# With --resume DIR the experiment is the stored one: only these flags may go with it.
_RESUME_FLAGS = {"rounds", "workers", "backend", "ray_address", "device", "resume", "run", "command", "argv"}


def _resumed_experiment(args: argparse.Namespace) -> tuple[Experiment, Path, int]:
    from fedcore.engine.runs import stored_experiment

    if given := [k for k, v in vars(args).items() if v not in (None, False) and k not in _RESUME_FLAGS]:
        raise ConfigError(
            "--resume DIR continues the experiment stored in DIR; only --rounds (to extend it), --workers, "
            f"--backend, --ray-address and --device may go with it, not --{given[0].replace('_', '-')}"
        )
    out = Path(args.resume)
    stored, done = stored_experiment(out)
    experiment = stored.override(
        federation__rounds=args.rounds,
        simulation__workers=args.workers,
        simulation__backend=args.backend,
        simulation__ray_address=args.ray_address,
    )
    return experiment, out, done


def _check_task(experiment: Experiment) -> None:
    from fedcore.tasks import task_for

    try:
        task_for(experiment)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def _simulate(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from fedcore.engine import RoundRecord
    from fedcore.simulation.report import print_results
    from fedcore.simulation.run import check_simulation, run_simulation
    from fedcore.tasks.torch_task import check_device
    from fedcore.tracking import build_tracker

    if args.compare:
        from fedcore.simulation.report import compare_runs

        compare_runs([Path(d) for d in args.compare], Path(args.out) if args.out else None)
        return 0
    done = 0
    if args.resume:
        experiment, out, done = _resumed_experiment(args)
    else:
        experiment = _experiment(args)
        out = Path(args.out) if args.out else Path("runs") / time.strftime("simulate-%Y%m%d-%H%M%S")
    check_device(args.device)
    check_simulation(experiment)
    console = Console(stderr=True)
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console) as progress:
        bar = progress.add_task(
            f"{experiment.task.name}, {experiment.simulation.sites} sites",
            total=experiment.federation.rounds,
            completed=done,
            status="resumed" if args.resume else "",
        )

        def on_round(record: RoundRecord) -> None:
            status = (
                f"accuracy {record.accuracy:.4f}  loss {record.loss:.4f}"
                if record.accuracy is not None
                else ""
            )
            if record.skipped:
                status = f"round skipped: {record.skipped}"
            progress.update(bar, advance=1, status=status)

        result, summary = run_simulation(
            experiment,
            out,
            device=args.device,
            on_round=on_round,
            resume=bool(args.resume),
            command=_command(args, args.config),
            trackers=[build_tracker(spec) for spec in args.track or ()],
        )
    print_results(result.records, summary, out)
    return 0


def _logging(verbose: bool) -> None:
    level, fmt = logging.DEBUG if verbose else logging.INFO, "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=level, format=fmt, stream=sys.stderr)


def _server(args: argparse.Namespace) -> int:
    from fedcore.engine import RoundRecord
    from fedcore.server.app import run_server
    from fedcore.server.limits import PER_ADDRESS, ServerLimits
    from fedcore.tracking import build_tracker

    experiment = _experiment(args)
    _check_task(experiment)
    if args.insecure == (args.pki is not None):
        raise ConfigError(
            "give either --pki DIR (mutual TLS) or --insecure (plaintext, local experiments only)"
        )
    pki_dir = Path(args.pki) if args.pki else None
    if pki_dir is not None and not (pki_dir / "server.crt").is_file():
        raise ConfigError(
            f"{pki_dir} holds no server certificate; run `fedcore pki init {pki_dir} --host HOST`"
        )
    if args.insecure:
        print(INSECURE_WARNING, file=sys.stderr)
    _logging(args.verbose)
    log = logging.getLogger("fedcore.server")

    def on_round(r: RoundRecord) -> None:
        dropped = f", dropped {r.dropped}" if r.dropped else ""
        if r.skipped:
            dropped += f"; SKIPPED (model unchanged): {r.skipped}"
        log.info(
            "round %d/%d: %d sites, accuracy %s, loss %s, %.2f s%s",
            r.round,
            experiment.federation.rounds,
            r.sites,
            f"{r.accuracy:.4f}" if r.accuracy is not None else "-",
            f"{r.loss:.4f}" if r.loss is not None else "-",
            r.seconds,
            dropped,
        )

    result = run_server(
        experiment,
        listen=args.listen,
        state=Path(args.state),
        pki_dir=pki_dir,
        on_round=on_round,
        resume=args.resume,
        command=_command(args, args.config),
        trackers=[build_tracker(spec) for spec in args.track or ()],
        metrics=args.metrics,
        dashboard=args.dashboard,
        limits=ServerLimits(
            args.max_connections,
            args.upload_budget and args.upload_budget << 20,
            per_address=PER_ADDRESS if args.max_per_address is None else args.max_per_address,
        ),
    )
    if result is None:
        return 0  # stopped by a signal: a clean, requested shutdown
    log.info("run complete: %d rounds; metrics in %s/metrics.jsonl", len(result.records), args.state)
    return 0


def _pki(args: argparse.Namespace) -> int:
    from fedcore import pki

    command = args.pki_command
    if command == "init":
        passphrase = pki.ask_passphrase(confirm=True) if args.encrypt_key else None
        pki.init(Path(args.dir), args.host, passphrase=passphrase)
        print(f"created CA, CRL and server certificate for {', '.join(args.host)} in {args.dir}")
        print("the server needs ca.crt, crl.pem, server.crt and server.key; keep ca.key on the CA's machine")
    elif command == "add-site":
        kit = pki.add_site(Path(args.dir), args.name)
        print(
            f"wrote site kit {kit} (ca.crt, site.crt, site.key): hand this folder to the site (demo shortcut)"
        )
    elif command == "request":
        csr = pki.request(Path(args.dir), args.name)
        print(f"wrote {Path(args.dir) / 'site.key'} (keep it here) and {csr}: send {csr.name} to the CA")
    elif command in ("sign", "renew"):
        make = pki.sign if command == "sign" else pki.renew
        cert = make(Path(args.ca_dir), Path(args.file), Path(args.out), days=args.days)
        print(
            f"wrote {args.out} (serial {cert.serial_number:x}, expires {cert.not_valid_after_utc:%Y-%m-%d}) "
            f"and ca.crt beside it: send both to the site's kit folder"
        )
    else:
        serials = pki.revoke(Path(args.ca_dir), args.name)
        print(
            f"revoked {len(serials)} certificate(s) of {args.name}; {Path(args.ca_dir) / 'crl.pem'} updated "
            "(the server reloads it within a second, or on SIGHUP; copy it there if the CA is elsewhere)"
        )
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="fedcore", description="Federated learning with secure aggregation and differential privacy."
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def experiment_flags(p: argparse.ArgumentParser) -> None:
        p.add_argument("--task", help="task name, e.g. breast_cancer, digits, synthetic")
        p.add_argument("--model", help="the task's model (default: the task's first)")
        p.add_argument("--rounds", type=int, help="number of rounds")
        p.add_argument("--seed", type=int, help="experiment seed")
        p.add_argument("--partition", help="iid, dirichlet:ALPHA, shards:K or natural")
        p.add_argument("--strategy", type=str.lower, choices=[s.value for s in StrategyName])
        p.add_argument("--sites-per-round", type=int, help="sites sampled per round (default: all)")
        p.add_argument(
            "--aggregation",
            type=str.lower,
            choices=[r.value for r in AggregationRule],
            help="mean (default) or a Byzantine-robust rule (needs individual updates: no SecAgg)",
        )
        p.add_argument(
            "--secure-aggregation", action="store_true", help="SecAgg+: the server learns only the sum"
        )
        p.add_argument(
            "--privacy",
            type=str.lower,
            choices=[m.value for m in PrivacyMode],
            help="differential privacy: sample (DP-SGD at sites), user-central or user-distributed",
        )
        p.add_argument("--noise-multiplier", type=float, help="DP noise multiplier")
        p.add_argument(
            "--target-epsilon", type=float, help="DP: choose the noise so the run stays within this"
        )
        p.add_argument(
            "--track", action="append", metavar="mlflow:URI|tensorboard:DIR", help="log the run there"
        )

    sim = sub.add_parser("simulate", help="run a federation of virtual sites on this machine")
    sim.add_argument(
        "config", nargs="?", help="experiment file (TOML); defaults: breast_cancer, 5 sites, 20 rounds"
    )
    experiment_flags(sim)
    sim.add_argument("--sites", type=int, help="number of virtual sites")
    sim.add_argument("--data", help="one file or folder split into the virtual sites (e.g. --task images)")
    sim.add_argument("--label", help="tabular: the label column of --data")
    sim.add_argument("--workers", type=int, help="sites trained in parallel (default: the number of cores)")
    sim.add_argument(
        "--backend", type=str.lower, choices=[b.value for b in Backend], help="local (default) or ray"
    )
    sim.add_argument("--ray-address", help="an existing Ray cluster (with --backend ray)")
    sim.add_argument("--out", help="output directory (default: runs/simulate-TIMESTAMP)")
    sim.add_argument(
        "--resume", metavar="DIR", help="continue the run in DIR (an --out of a run that was stopped)"
    )
    sim.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    sim.add_argument(
        "--compare", nargs="+", metavar="DIR", help="plot the curves of earlier runs in one figure"
    )
    sim.set_defaults(run=_simulate)

    srv = sub.add_parser("server", help="run the aggregation server (the coordinator's process)")
    srv.add_argument("--listen", required=True, help="HOST:PORT to listen on")
    srv.add_argument("--pki", help="PKI directory from `fedcore pki init` (mutual TLS)")
    srv.add_argument(
        "--state", required=True, help="the run's directory: run.db, metrics.jsonl, sites.jsonl, the model"
    )
    srv.add_argument(
        "--resume", action="store_true", help="continue the run in --state after its last completed round"
    )
    srv.add_argument("--config", help="experiment file (TOML)")
    srv.add_argument("--min-sites", type=int, help="sites needed to start and to complete a round")
    srv.add_argument("--insecure", action="store_true", help="plaintext, no site authentication")
    srv.add_argument(
        "--metrics", metavar="[HOST:]PORT", help="serve Prometheus /metrics and /healthz (127.0.0.1)"
    )
    srv.add_argument(
        "--dashboard", metavar="[HOST:]PORT", help="live web dashboard; its URL: STATE/dashboard.url"
    )
    srv.add_argument("--max-connections", type=int, help="connections at once (default: the fd limit's room)")
    srv.add_argument(
        "--max-per-address", type=int, help="connections without a session, an address (32; 0: none)"
    )
    srv.add_argument(
        "--upload-budget", type=int, metavar="MIB", help="site payloads read at once (default 16)"
    )
    srv.add_argument("-v", "--verbose", action="store_true")
    experiment_flags(srv)
    srv.set_defaults(run=_server)

    client_command.add_command(
        sub,
        run=lambda args: client_command.run(args, setup_logging=_logging, insecure_warning=INSECURE_WARNING),
    )

    task_packages.add_commands(sub)
    lifecycle.add_commands(sub)
    audit.add_commands(sub)
    privacy_audit.add_commands(sub)
    run_status.add_commands(sub)
    p = sub.add_parser("pki", help="provision the federation's certificates")
    psub = p.add_subparsers(dest="pki_command", required=True, parser_class=_Parser)
    init = psub.add_parser("init", help="create the CA, its CRL and the server's certificate")
    init.add_argument("dir")
    init.add_argument("--host", action="append", required=True, help="server host name or IP (repeatable)")
    init.add_argument(
        "--encrypt-key",
        action="store_true",
        help="protect ca.key by a passphrase ($FEDCORE_CA_PASSPHRASE or asked)",
    )
    add = psub.add_parser("add-site", help="demo shortcut: a whole site kit DIR/sites/NAME made at the CA")
    add.add_argument("dir")
    add.add_argument("name")
    req = psub.add_parser("request", help="at a site: its key (kept) and a certificate request (sent)")
    req.add_argument("dir", help="the site's kit folder")
    req.add_argument("--name", required=True, help="the site's name")
    for verb, what, help_text in (
        ("sign", "csr", "at the CA: a site certificate for a request"),
        ("renew", "certificate", "at the CA: re-issue a site's unexpired certificate for the same key"),
    ):
        cmd = psub.add_parser(verb, help=help_text)
        cmd.add_argument("ca_dir")
        cmd.add_argument("file", metavar=what.upper())
        cmd.add_argument("-o", "--out", required=True, help="where to write the certificate (site.crt)")
        cmd.add_argument("--days", type=int, default=825, help="validity in days (default 825)")
    rev = psub.add_parser("revoke", help="at the CA: revoke a site's certificates (updates crl.pem)")
    rev.add_argument("ca_dir")
    rev.add_argument("name")
    p.set_defaults(run=_pki)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    args.argv = argv
    try:
        code: int = args.run(args)
        return code
    except ConfigError as err:
        print(f"fedcore: error: {err}", file=sys.stderr)
        return EXIT_CONFIG
    except FedcoreError as err:
        print(f"fedcore: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
