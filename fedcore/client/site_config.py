"""`site.toml`: a site's own settings for `fedcore client --config`. Flags override it.

[server]    address
[identity]  kit, insecure, name
[data]      task, uri
[agent]     device, give_up_after
[privacy]   ledger, max_epsilon, delta, min_noise_multiplier, require_dp
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedcore.config import read_toml
from fedcore.errors import ConfigError

SCHEMA: dict[str, dict[str, type | tuple[type, ...]]] = {
    "server": {"address": str},
    "identity": {"kit": str, "insecure": bool, "name": str},
    "data": {"task": str, "uri": str},
    "agent": {"device": str, "give_up_after": (int, float)},
    "privacy": {
        "ledger": str,
        "max_epsilon": (int, float),
        "delta": float,
        "min_noise_multiplier": (int, float),
        "require_dp": bool,
    },
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
    for key in ("identity.kit", "privacy.ledger"):  # relative to the file: a site folder moves whole
        if key in flat:
            flat[key] = str((path.parent / flat[key]).resolve())
    return flat
