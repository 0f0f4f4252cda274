"""What every SecAgg+ stage shares: the round's public parameters, aborts, encodings.

The protocol (Bonawitz et al. CCS'17 with Bell et al. CCS'20's sparse neighbour graph) runs
in four stages, each a pair of state classes (client, server) in `fedcore.secagg.stages`.
A state consumes the previous stage's messages and returns the next state with what it
sends; no state does I/O, reads the clock or draws randomness on its own: randomness
comes in as `randbytes`, so that tests can replay a round.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from fedcore.errors import SecurityError
from fedcore.secagg.graph import default_degree, neighbour_graph
from fedcore.secagg.packing import MIN_BITS

RandBytes = Callable[[int], bytes]

SEED_BYTES = 32
MIN_COHORT = 3  # a sum of two inputs tells each of the two the other's


class AbortReason(enum.Enum):
    TOO_FEW_NEIGHBOURS = "fewer than threshold neighbours remain"
    TOO_FEW_SURVIVORS = "fewer than threshold sites sent masked input"
    NOT_ENOUGH_SHARES = "a dropped or surviving site has fewer than threshold shares"
    BAD_MESSAGE = "a message is malformed, for another round or stage, or from an unknown site"
    INCONSISTENT_REQUEST = "the server asked for shares it must not have"
    UNSAFE_PARAMETERS = "the round's parameters would let the server reconstruct an input"
    BAD_SIGNATURES = "too few valid signatures on the survivor set"
    MISSING_REVEAL = "a site that advertised keys revealed no nonce"
    BAD_REVEAL = "a nonce that does not match its commitment, or commitments without this site's"


@dataclass(frozen=True)
class Aborted:
    """A terminal state: the round cannot complete (it is retried, never summed wrongly)."""

    reason: AbortReason
    detail: str = ""
    culprit: str | None = None  # the site whose misbehaviour caused it, when the server can tell


class ProtocolAbort(SecurityError):
    def __init__(self, reason: AbortReason, detail: str = "", culprit: str | None = None) -> None:
        super().__init__(f"{reason.value}: {detail}" if detail else reason.value)
        self.aborted = Aborted(reason, detail, culprit)


@dataclass(frozen=True)
class RoundParams:
    """Public parameters of one secure-aggregation round, fixed by the server at its start."""

    round: int
    participants: tuple[str, ...]  # the sites that start the round, sorted
    degree: int  # of the neighbour graph, which the beacon draws (`neighbours`)
    threshold: int  # shares needed to reconstruct a site's secrets
    length: int  # integers per input vector
    bits: int = 32  # arithmetic modulo 2**bits
    session: str = ""  # run, round and attempt: bound into every signature of the round
    # SHA-256 of the nonces the sites revealed after the participant set was fixed (b"" at
    # advertise, before it exists): with the session, what draws the neighbour graph.
    beacon: bytes = b""

    def __post_init__(self) -> None:
        if list(self.participants) != sorted(set(self.participants)):
            raise ValueError("participants must be sorted and distinct")
        if self.degree < 1:
            raise ValueError("degree must be positive")
        if not 1 <= self.threshold <= min((len(p) for p in self.neighbours.values()), default=0):
            raise ValueError("threshold must be between 1 and the smallest neighbourhood's size")
        if not (MIN_BITS <= self.bits <= 32 or self.bits == 64):
            raise ValueError("bits must be 16 to 32, or 64")

    @functools.cached_property
    def neighbours(self) -> Mapping[str, frozenset[str]]:
        """The graph the beacon draws (symmetric, no self loops): no party can pass another."""
        draw = f"{self.session}|{self.beacon.hex()}" if self.beacon else self.session
        return neighbour_graph(self.participants, self.degree, session=draw)

    @functools.cached_property
    def base(self) -> RoundParams:
        """The parameters before the beacon: what the advertise signatures and commitments bind."""
        return dataclasses.replace(self, beacon=b"") if self.beacon else self

    def index(self, site: str) -> int:
        """The site's Shamir x-coordinate (1-based, never 0: 0 is where the secret lives)."""
        return self.participants.index(site) + 1

    def info(self, purpose: str) -> bytes:
        return f"fedcore secagg+ v2|{purpose}|{self.session}|round {self.round}".encode()

    def associated(self, sender: str, recipient: str) -> bytes:
        """Binds an encrypted share to its session, sender and recipient (no replay, no reroute)."""
        return f"{self.session}|{self.round}|{sender}|{recipient}".encode()

    @functools.cached_property  # every signature of the round binds it: computed once
    def digest(self) -> bytes:
        """The parameters as one value: a site signs its view of them with its keys, so that
        neighbours given different parameters cannot verify each other."""
        view = (
            self.session,
            self.round,
            self.participants,
            self.degree,
            self.beacon,
            self.threshold,
            self.length,
            self.bits,
        )
        return hashlib.sha256(repr(view).encode()).digest()

    def check_safe(self, site: str) -> None:
        """What a site checks before it takes part (at advertise, and again with the beacon):
        at least MIN_COHORT participants, a degree at least the default (a sparser graph
        needs fewer colluders around a site), at least 2 neighbours, and a threshold above
        half of its neighbourhood counted with itself (2t >= k + 2): no two disjoint groups of that
        neighbourhood can each gather t signatures on different survivor sets, so the server
        cannot have one group reveal a site's self mask and the other its neighbours' keys."""
        n = len(self.participants)
        need(
            n >= MIN_COHORT,
            AbortReason.UNSAFE_PARAMETERS,
            f"{n} participants; a secure sum needs {MIN_COHORT}",
        )
        need(
            self.degree >= default_degree(n),
            AbortReason.UNSAFE_PARAMETERS,
            f"degree {self.degree}, sparser than the default {default_degree(n)}",
        )
        degree = len(self.neighbours[site])
        need(
            degree >= 2 and 2 * self.threshold >= degree + 2,
            AbortReason.UNSAFE_PARAMETERS,
            f"threshold {self.threshold} is not above half of this site and its {degree} neighbours",
        )


def need(ok: bool, reason: AbortReason, detail: str = "", culprit: str | None = None) -> None:
    if not ok:
        raise ProtocolAbort(reason, detail, culprit)
