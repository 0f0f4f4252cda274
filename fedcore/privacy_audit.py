"""`fedcore privacy-audit EXPERIMENT.toml`: the one-run canary audit of a job's DP mechanism
(fedcore.privacy.audit), its empirical lower bound beside the accountant's epsilon."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from fedcore.config import load_experiment
from fedcore.errors import ConfigError
from fedcore.privacy.audit import CONFIDENCE, run_audit


def add_commands(sub: Any) -> None:
    aud = sub.add_parser(
        "privacy-audit", help="an empirical lower bound on a job's epsilon, from one run with canaries"
    )
    aud.add_argument("config", help="experiment file (TOML): its [privacy] table and rounds")
    aud.add_argument(
        "--canaries", type=int, default=1000, help="canaries, each inserted with probability 1/2"
    )
    aud.add_argument("--guesses", type=int, default=200, help="guesses (half 'in', half 'out')")
    aud.add_argument("--seed", type=int, help="which canaries are inserted (default: fresh)")
    aud.add_argument("--json", action="store_true", help="print only a JSON object on stdout")
    aud.add_argument("--test-noise-scale", type=float, default=1.0, help=argparse.SUPPRESS)  # tests only
    aud.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    experiment = load_experiment(args.config)
    fed, sites = experiment.federation, experiment.simulation.sites
    rate = 1.0 if fed.sites_per_round is None else min(1.0, fed.sites_per_round / sites)
    say = (lambda _: None) if args.json else (lambda line: print(line, file=sys.stderr))
    try:
        result = run_audit(
            experiment.privacy,
            rounds=fed.rounds,
            site_rate=rate,
            canaries=args.canaries,
            guesses=args.guesses,
            seed=args.seed,
            noise_scale=args.test_noise_scale,
            progress=say,
        )
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if args.json:
        print(json.dumps(result.as_json()))
        return 0
    print(
        f"privacy audit ({result.mode}, one {result.unit}, delta {result.delta:g}): "
        f"{result.correct} of {result.guesses} guesses right on {result.canaries} canaries\n"
        f"  accountant's epsilon      {result.epsilon:.3f}  (an upper bound)\n"
        f"  empirical lower bound     {result.empirical_lower_bound:.3f}  ({CONFIDENCE:.0%} confidence)"
    )
    if result.empirical_lower_bound > result.epsilon:
        print("  the mechanism spends MORE than the accountant claims: do not trust this job's epsilon")
    return 0
