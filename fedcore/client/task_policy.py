"""Which task code a site agrees to run: `site.toml` `[policy] tasks`, a list of
`"NAME==VERSION"` or `"NAME==VERSION@SHA256"` (the code hash `fedcore tasks` prints, or a
prefix of at least 32 hex digits: 128 bits, beyond forging).

The site runs its own installed code, never code from the network. With a policy, it
declines a job unless that code is approved and is the code the job was built with (the
server names package, version and hash in its Welcome); the server records the reason.
Without a policy, a site runs any job of its task, and a job built with other code is
logged as a warning.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

from fedcore.errors import ConfigError
from fedcore.tasks.plugins import TaskSource

log = logging.getLogger(__name__)

_ENTRY = re.compile(r"^(?P<name>[^=@\s]+)==(?P<version>[^=@\s]+)(@(?P<hash>[0-9a-fA-F]{32,64}))?$")


@dataclass(frozen=True)
class Approval:
    name: str
    version: str
    code_hash: str | None  # a prefix of the SHA-256, or None: any code of that version

    def allows(self, code: TaskSource) -> bool:
        return (
            self.name == code.name
            and self.version == code.version
            and (self.code_hash is None or code.code_hash.startswith(self.code_hash))
        )

    def __str__(self) -> str:
        return f"{self.name}=={self.version}" + (f"@{self.code_hash}" if self.code_hash else "")


@dataclass(frozen=True)
class JobCode:
    """What the server says the job was built with."""

    package: str
    version: str
    code_hash: str


def parse_policy(entries: list[object]) -> list[Approval]:
    approvals = []
    for entry in entries:
        match = _ENTRY.match(entry) if isinstance(entry, str) else None
        if match is None:
            raise ConfigError(f"[policy] tasks: {entry!r} is not NAME==VERSION or NAME==VERSION@SHA256")
        code_hash = match["hash"].lower() if match["hash"] else None
        approvals.append(Approval(match["name"], match["version"], code_hash))
    return approvals


def refusal(policy: list[Approval] | None, local: TaskSource, job: JobCode) -> str | None:
    """Why the site declines the job, or None when it runs it."""
    same = job.version == local.version and job.code_hash == local.code_hash
    if not same:
        what = (
            f"the job was built with {job.package or '?'} {job.version or '?'} (code {job.code_hash[:12] or '?'}); "
            f"this site runs {local.package} {local.version} (code {local.code_hash[:12]})"
        )
        if policy is not None:
            return what
        log.warning("%s; running it (no [policy] tasks on this site)", what)
    if policy is not None and not any(a.allows(local) for a in policy):
        allowed = ", ".join(map(str, policy)) or "none"
        return (
            f"this site's policy does not approve task {local.name}=={local.version}@{local.code_hash[:12]} "
            f"(approved: {allowed})"
        )
    return None
