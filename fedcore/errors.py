"""One error hierarchy for everything fedcore raises on purpose."""

from __future__ import annotations


class FedcoreError(Exception):
    """Root of fedcore's errors."""


class ConfigError(FedcoreError):
    """A configuration file, flag or argument is wrong; the message says how to fix it."""


class ProtocolError(FedcoreError):
    """A message broke the wire protocol (shape, dtype, size, order, round, stage)."""


class TransportError(FedcoreError):
    """The connection to a peer failed."""


class SiteUnavailable(TransportError):
    """A site vanished; the round goes on without it."""

    def __init__(self, site: str, reason: str) -> None:
        super().__init__(f"site {site}: {reason}")
        self.site = site
        self.reason = reason


class SecurityError(FedcoreError):
    """Authentication or authorisation failed."""


class PrivacyBudgetError(FedcoreError):
    """The work asked for would exceed a site's privacy budget."""
