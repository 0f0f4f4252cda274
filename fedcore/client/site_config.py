"""`site.toml`: a site's own settings for `fedcore client --config`. Flags override it.

[server]    address
[identity]  kit, insecure, name
[data]      task, uri, label, features (tabular: the label column, the columns to use)
[agent]     device, give_up_after, audit (the site's audit log; default: audit.log in its kit)
[privacy]   ledger, max_epsilon, delta, min_noise_multiplier, require_dp, min_secure_cohort,
            colluding_fraction, accountant
[policy]    tasks (the task code this site approves: "NAME==VERSION[@SHA256]")
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from fedcore.config import DEFAULT_COLLUDING_FRACTION, Accountant
from fedcore.errors import ConfigError
from fedcore.privacy.site_policy import DEFAULT_DELTA, SitePolicy, SitePrivacy
from fedcore.typed_toml import read_toml

log = logging.getLogger("fedcore.client")

SCHEMA: dict[str, dict[str, type | tuple[type, ...]]] = {
    "server": {"address": str},
    "identity": {"kit": str, "insecure": bool, "name": str},
    "data": {"task": str, "uri": str, "label": str, "features": list},
    "agent": {"device": str, "give_up_after": (int, float), "audit": str},
    "privacy": {
        "ledger": str,
        "max_epsilon": (int, float),
        "delta": float,
        "min_noise_multiplier": (int, float),
        "require_dp": bool,
        "min_secure_cohort": int,
        "colluding_fraction": float,
        "accountant": str,
    },
    "policy": {"tasks": list},
}


def load_site_config(path: str | Path) -> dict[str, Any]:
    """Flat {"section.key": value} from a site.toml, checked against SCHEMA."""
    path = Path(path)
    raw = read_toml(path, "site")
    flat: dict[str, Any] = {}
    for section, table in raw.items():
        if section not in SCHEMA or not isinstance(table, dict):
            raise ConfigError(f"{path}: unknown table [{section}]; known tables: {', '.join(SCHEMA)}")
        for key, value in table.items():
            kind = SCHEMA[section].get(key)
            if kind is None:
                raise ConfigError(
                    f"{path}: unknown key {key!r} in [{section}]; known keys: {', '.join(SCHEMA[section])}"
                )
            if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
                raise ConfigError(f"{path}: [{section}] {key} has the wrong type ({value!r})")
            flat[f"{section}.{key}"] = value
    for key in (
        "identity.kit",
        "privacy.ledger",
        "agent.audit",
        "data.uri",
    ):  # relative to the file: a site folder moves whole
        if key in flat and not str(flat[key]).startswith("builtin:"):
            flat[key] = str((path.parent / flat[key]).resolve())
    return flat


def site_privacy(
    site: dict[str, Any], ledger: str | None, max_epsilon: float | None, kit: object, name: object
) -> SitePrivacy:
    """The site's own privacy policy: flags (`ledger`, `max_epsilon`), then the site file's
    [privacy]; the ledger defaults to the site's kit folder (or ./fedcore-privacy-NAME.json)."""
    ledger = ledger or site.get("privacy.ledger")
    if ledger is None:
        ledger = str(Path(str(kit)) / "privacy-ledger.json" if kit else Path(f"fedcore-privacy-{name}.json"))
    if max_epsilon is None:
        max_epsilon = site.get("privacy.max_epsilon")
    policy = SitePolicy(
        max_epsilon=float(max_epsilon) if max_epsilon is not None else None,
        delta=float(site.get("privacy.delta", DEFAULT_DELTA)),
        min_noise_multiplier=float(site.get("privacy.min_noise_multiplier", 0.0)),
        require_dp=bool(site.get("privacy.require_dp", False)),
        min_secure_cohort=int(site.get("privacy.min_secure_cohort", 3)),
        colluding_fraction=float(site.get("privacy.colluding_fraction", DEFAULT_COLLUDING_FRACTION)),
        accountant=_accountant(site.get("privacy.accountant", Accountant.PLD.value)),
        ledger=Path(ledger),
    )
    if policy.max_epsilon is not None and not policy.max_epsilon > 0:
        raise ConfigError("max_epsilon must be > 0")
    if not 0 < policy.delta < 1:
        raise ConfigError("[privacy] delta must be in (0, 1)")
    if not 0 <= policy.colluding_fraction < 0.5:
        raise ConfigError("[privacy] colluding_fraction must be in [0, 0.5)")
    privacy = SitePrivacy(policy)
    log.info(
        "privacy ledger %s: epsilon spent %.3f (budget %s)",
        policy.ledger,
        privacy.ledger.spent(),
        policy.max_epsilon,
    )
    return privacy


def _accountant(name: object) -> Accountant:
    try:
        return Accountant(str(name))
    except ValueError:
        choices = ", ".join(a.value for a in Accountant)
        raise ConfigError(f"[privacy] accountant must be one of {choices}, got {name!r}") from None
