"""A site's side of SecAgg+ across the stages of one round, holding the stage states."""

from __future__ import annotations

import os

import numpy as np

from fedcore.privacy.randomness import SecureRandom
from fedcore.secagg.common import AbortReason, RoundParams, need
from fedcore.secagg.contribution import quantized_contribution
from fedcore.secagg.stages.advertise import ClientAdvertise, NeighbourKeys
from fedcore.secagg.stages.masked_input import ClientMaskedInput, MaskedInput
from fedcore.secagg.stages.share_keys import ClientShareKeys, RoutedShares
from fedcore.secagg.stages.unmask import ClientUnmask, UnmaskRequest
from fedcore.tensors import Arrays


class SecAggClient:
    def __init__(self, site: str) -> None:
        self.site = site
        self.state: ClientShareKeys | ClientMaskedInput | ClientUnmask | None = None

    def participants(self) -> tuple[str, ...]:
        """The sites in the current round's secure aggregation (empty between rounds)."""
        return self.state.params.participants if self.state is not None else ()

    def _expect(self, kind: type, round_number: int) -> None:
        need(
            self.state is not None
            and isinstance(self.state, kind)
            and self.state.params.round == round_number,
            AbortReason.BAD_MESSAGE,
            f"a message for another round or stage (round {round_number}, state {type(self.state).__name__})",
        )

    def step(self, message: object, round_number: int) -> object:
        """Stages 1, 2 and 4: the reply to the server's message."""
        if isinstance(message, RoundParams):
            need(
                message.round == round_number and self.site in message.participants,
                AbortReason.BAD_MESSAGE,
                "round parameters",
            )
            reply, self.state = ClientAdvertise(message, self.site).start(os.urandom)
            return reply
        if isinstance(message, NeighbourKeys):
            self._expect(ClientShareKeys, round_number)
            assert isinstance(self.state, ClientShareKeys)
            shares, self.state = self.state.receive(message, os.urandom)
            return shares
        if isinstance(message, UnmaskRequest):
            self._expect(ClientUnmask, round_number)
            assert isinstance(self.state, ClientUnmask)
            state, self.state = self.state, None  # one answer per round: no second request
            return state.receive(message)
        need(False, AbortReason.BAD_MESSAGE, f"unexpected {type(message).__name__}")
        raise AssertionError("unreachable")

    def mask(
        self,
        routed: RoutedShares,
        round_number: int,
        update: Arrays,
        template: Arrays,
        *,
        weight: float,
        clip: float,
        step: float,
    ) -> MaskedInput:
        """Stage 3: the site's weighted, clipped, quantized and masked update."""
        self._expect(ClientMaskedInput, round_number)
        assert isinstance(self.state, ClientMaskedInput)
        quantized = quantized_contribution(
            update,
            template,
            weight=weight,
            clip=clip,
            step=step,
            bits=self.state.params.bits,
            rng=SecureRandom(),  # stochastic rounding from AES-CTR keyed by the OS
        )
        masked, self.state = self.state.receive(routed, quantized, in_place=True)
        return masked

    def mask_integers(self, routed: RoutedShares, round_number: int, values: np.ndarray) -> MaskedInput:
        """Stage 3 for a contribution the site has already made integer (distributed DP)."""
        self._expect(ClientMaskedInput, round_number)
        assert isinstance(self.state, ClientMaskedInput)
        need(
            self.state.params.bits == 64 and len(values) == self.state.params.length,
            AbortReason.BAD_MESSAGE,
            "an integer contribution needs 64-bit arithmetic and the round's vector length",
        )
        masked, self.state = self.state.receive(routed, np.asarray(values, dtype=np.int64).view(np.uint64))
        return masked
