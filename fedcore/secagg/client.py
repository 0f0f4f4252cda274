"""A site's side of SecAgg+ across the stages of one round, holding the stage states."""

from __future__ import annotations

import os

from fedcore.config import DEFAULT_COLLUDING_FRACTION
from fedcore.secagg.common import MIN_COHORT, AbortReason, RoundParams, need
from fedcore.secagg.graph import colluders, safe_threshold
from fedcore.secagg.identity import Identity
from fedcore.secagg.quantize import UInt
from fedcore.secagg.stages.advertise import ClientAdvertise
from fedcore.secagg.stages.consistency import ClientConsistency
from fedcore.secagg.stages.masked_input import ClientMaskedInput
from fedcore.secagg.stages.messages import (
    ConsistencyRequest,
    MaskedInput,
    NeighbourKeys,
    RevealRequest,
    RoutedShares,
    UnmaskRequest,
    dtype,
)
from fedcore.secagg.stages.reveal import ClientReveal
from fedcore.secagg.stages.share_keys import ClientShareKeys
from fedcore.secagg.stages.unmask import ClientUnmask

MAX_ATTEMPTS = 10  # sessions of one round a site takes part in, by default

# A site's state within a round.
SecAggState = ClientReveal | ClientShareKeys | ClientMaskedInput | ClientConsistency | ClientUnmask


class SecAggClient:
    def __init__(
        self,
        site: str,
        identity: Identity | None = None,
        *,
        min_cohort: int = MIN_COHORT,
        max_attempts: int = MAX_ATTEMPTS,
        colluding_fraction: float = DEFAULT_COLLUDING_FRACTION,
    ) -> None:
        """`identity`: the site's signing key and its verifier of the others (None: no
        signatures, so only an honest server is kept from the inputs). `min_cohort`: the
        site's policy on the fewest participants of a round it joins (at least MIN_COHORT).
        `max_attempts`: the most times it advertises for one round, whatever the session
        (a server that aborts at reveal, or redoes a session, draws the graph again: this
        caps its draws; the count lives as long as the site's state for the run).
        `colluding_fraction`: the share of participants this site assumes may collude with
        the server; it refuses a threshold that does not hold against them (`safe_threshold`)."""
        self.site = site
        self.identity = identity
        self.min_cohort = max(min_cohort, MIN_COHORT)
        self.max_attempts = max_attempts
        self.colluding_fraction = colluding_fraction
        self.advertised: dict[int, int] = {}  # round -> times this site advertised for it
        self.state: SecAggState | None = None

    def participants(self) -> tuple[str, ...]:
        """The sites in the current round's secure aggregation (empty between rounds)."""
        return self.state.params.participants if self.state is not None else ()

    def threshold(self) -> int:
        """The fewest inputs whose sum the server can unmask in the current round (0 between rounds)."""
        return self.state.params.threshold if self.state is not None else 0

    def _expect(self, kind: type, round_number: int) -> None:
        need(
            self.state is not None
            and isinstance(self.state, kind)
            and self.state.params.round == round_number,
            AbortReason.BAD_MESSAGE,
            f"a message for another round or stage (round {round_number}, state {type(self.state).__name__})",
        )

    def step(self, message: object, round_number: int) -> object:
        """Stages 1, 1b (reveal), 2 and 4: the reply to the server's message."""
        if isinstance(message, RoundParams):
            need(
                message.round == round_number and self.site in message.participants,
                AbortReason.BAD_MESSAGE,
                "round parameters",
            )
            need(
                len(message.participants) >= self.min_cohort,
                AbortReason.UNSAFE_PARAMETERS,
                f"{len(message.participants)} participants; this site's policy needs {self.min_cohort}",
            )
            # Every advertisement draws a fresh nonce, so every one counts (a redone session
            # too), and no round's count is ever forgotten (going back to a round would reset it).
            count = self.advertised.get(message.round, 0)
            need(
                count < self.max_attempts,
                AbortReason.UNSAFE_PARAMETERS,
                f"attempt {count + 1} of round {message.round}; this site takes part in {self.max_attempts}",
            )
            self.advertised[message.round] = count + 1
            self._check_threshold(message)
            # Fresh keys every time, also for a session redone after a server's crash: every
            # signature binds the signer's keys of this execution, so nothing old is replayable.
            reply, self.state = ClientAdvertise(message, self.site, self.identity).start(os.urandom)
            return reply
        if isinstance(message, RevealRequest):
            self._expect(ClientReveal, round_number)
            assert isinstance(self.state, ClientReveal)
            nonce, self.state = self.state.receive(message, self.min_cohort)
            return nonce
        if isinstance(message, NeighbourKeys):
            self._expect(ClientShareKeys, round_number)
            assert isinstance(self.state, ClientShareKeys)
            shares, after = self.state.receive(message, os.urandom, self.identity)
            self._check_threshold(after.params)  # the graph drawn: before any share leaves
            self.state = after
            return shares
        if isinstance(message, ConsistencyRequest):
            self._expect(ClientConsistency, round_number)
            assert isinstance(self.state, ClientConsistency)
            signature, self.state = self.state.receive(message, self.identity)
            return signature
        if isinstance(message, UnmaskRequest):
            self._expect(ClientUnmask, round_number)
            assert isinstance(self.state, ClientUnmask)
            state, self.state = self.state, None  # one answer per round: no second request
            return state.receive(message, self.identity)
        need(False, AbortReason.BAD_MESSAGE, f"unexpected {type(message).__name__}")
        raise AssertionError("unreachable")

    def _check_threshold(self, p: RoundParams) -> None:
        n, degree = len(p.participants), len(p.neighbours[self.site])
        safe = safe_threshold(n, degree, self.colluding_fraction, attempts=self.max_attempts)
        need(
            safe is not None and p.threshold >= safe,
            AbortReason.UNSAFE_PARAMETERS,
            f"threshold {p.threshold} of {degree} neighbours among {n} sites does not hold against "
            f"{colluders(n, self.colluding_fraction)} colluding (this site's policy: "
            f"{self.colluding_fraction:g} of the sites; it needs {safe or 'a larger degree'})",
        )

    def mask(self, routed: RoutedShares, round_number: int, values: UInt) -> MaskedInput:
        """Stage 3: mask the site's encoded contribution (integers modulo 2**bits, the round's
        length), in place."""
        self._expect(ClientMaskedInput, round_number)
        assert isinstance(self.state, ClientMaskedInput)
        p = self.state.params
        need(
            values.dtype == dtype(p) and values.shape == (p.length,),
            AbortReason.BAD_MESSAGE,
            f"a contribution needs {p.bits}-bit integers and the round's vector length",
        )
        masked, self.state = self.state.receive(routed, values, in_place=True)
        return masked
