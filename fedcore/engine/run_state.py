"""The run's state as one value: everything a Coordinator needs to continue a run exactly.

Saved after every completed round (with the round, in one transaction: see `run_store`)
and loaded on resume. The encoding is safetensors: the global model and the strategy's
arrays as tensors, everything else (stage states, the roster, the transport's state) as
JSON in the metadata. Nothing is pickled, so a state file from an untrusted place cannot
run code; floats go through JSON's shortest round-trip repr, so they come back bit for bit.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from safetensors.numpy import load, save

from fedcore.errors import ConfigError
from fedcore.tensors import Arrays

FORMAT = "fedcore.run_state/1"
_MODEL = "model/"
_STRATEGY = "strategy/"


@dataclass
class RunState:
    run_id: str
    round: int  # the last completed round (0: none yet)
    parameters: Arrays  # the global model after `round`
    strategy: dict[str, Arrays] = field(default_factory=dict)  # e.g. FedOpt's moments
    pipeline: dict[str, Any] = field(default_factory=dict)  # each stage's state_dict, by stage name
    stopped: str | None = None  # why a stage ended the run early, if one did
    roster: list[str] = field(default_factory=list)  # the sites available at the last round
    transport: Any = None  # the transport's own state, JSON (a simulation's virtual sites)
    statistics: list[float] | None = None  # the task's federated statistics (engine.statistics)
    excluded: dict[str, str] = field(default_factory=dict)  # sites kept out of the run, and why

    def to_bytes(self) -> bytes:
        tensors = {_MODEL + k: np.ascontiguousarray(v) for k, v in self.parameters.items()}
        for group, arrays in self.strategy.items():
            if "/" in group:
                raise ValueError(f"strategy state group {group!r} must not contain '/'")
            tensors.update({f"{_STRATEGY}{group}/{k}": np.ascontiguousarray(v) for k, v in arrays.items()})
        metadata = {  # one key: safetensors writes several in no fixed order
            "state": json.dumps(
                {
                    "format": FORMAT,
                    "run_id": self.run_id,
                    "round": self.round,
                    "pipeline": self.pipeline,
                    "stopped": self.stopped,
                    "roster": self.roster,
                    "transport": self.transport,
                    "statistics": self.statistics,
                    "excluded": self.excluded,
                    "strategy_groups": sorted(self.strategy),
                    "names": list(self.parameters),  # safetensors sorts tensors; a model's order matters
                }
            ),
        }
        return save(tensors, metadata=metadata)

    @classmethod
    def from_bytes(cls, data: bytes) -> RunState:
        try:
            tensors = load(data)
            meta = json.loads(safetensors_metadata(data)["state"])
            if meta.get("format") != FORMAT:
                raise ValueError(f"format {meta.get('format')!r}, expected {FORMAT!r}")
            parameters = {name: tensors[_MODEL + name] for name in meta["names"]}
            strategy: dict[str, Arrays] = {group: {} for group in meta["strategy_groups"]}
            for key, value in tensors.items():
                if key.startswith(_STRATEGY):
                    group, _, name = key.removeprefix(_STRATEGY).partition("/")
                    strategy[group][name] = value
        except (ValueError, KeyError, TypeError) as err:
            raise ConfigError(f"the saved run state is unreadable ({err!r})") from None
        return cls(
            run_id=str(meta["run_id"]),
            round=int(meta["round"]),
            parameters=parameters,
            strategy=strategy,
            pipeline=meta["pipeline"],
            stopped=meta["stopped"],
            roster=list(meta["roster"]),
            transport=meta["transport"],
            statistics=meta.get("statistics"),
            excluded=dict(meta.get("excluded", {})),
        )


def safetensors_metadata(data: bytes) -> dict[str, str]:
    """The `__metadata__` of a safetensors buffer (its JSON header, after an 8-byte length)."""
    if len(data) < 8:
        raise ValueError("too short for safetensors")
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    meta: dict[str, str] = header.get("__metadata__", {})
    return meta
