"""The server's view of the federation's certificate revocation list (`crl.pem` in its --pki
folder). grpcio's Python API has no CRL hook at the TLS handshake, so the transport checks
the peer certificate's serial when a stream opens, and drops live sessions whose
certificate a newer CRL revokes. A CRL is used only if the federation's CA signed it: a
forged or corrupt file is refused (at start: an error; later: the previous list is kept)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509

from fedcore.certificates import crl_number
from fedcore.errors import ConfigError

log = logging.getLogger(__name__)


def certificate_serial(pem: bytes) -> int:
    return x509.load_pem_x509_certificate(pem).serial_number


@dataclass
class RevocationList:
    path: Path
    ca_pem: bytes
    # Where the highest CRL number seen is kept (the run's state): a restart does not
    # forget it, so neither an older list put back nor a deleted one un-revokes anything.
    floor_file: Path | None = None
    revoked: frozenset[int] = frozenset()
    _seen: tuple[int, int] | None = field(default=None, repr=False)  # (mtime_ns, size) last read
    _number: int = field(default=-1, repr=False)  # the loaded CRL's sequence number

    def __post_init__(self) -> None:
        self._ca = x509.load_pem_x509_certificate(self.ca_pem)
        if self.floor_file is not None and self.floor_file.exists():
            self._number = int(self.floor_file.read_text())
        if not self.path.exists():
            if self._number >= 0:
                raise ConfigError(f"{self.path} is missing; this run has used CRL number {self._number}")
            log.warning("%s is missing: no certificate can be revoked until it appears", self.path)
            return
        self.revoked = self._load()

    def _load(self) -> frozenset[int]:
        try:
            stat = self.path.stat()
            crl = x509.load_pem_x509_crl(self.path.read_bytes())
        except (OSError, ValueError) as err:
            raise ConfigError(f"{self.path}: not a certificate revocation list ({err})") from None
        public_key = self._ca.public_key()
        if crl.issuer != self._ca.subject or not crl.is_signature_valid(public_key):  # type: ignore[arg-type]
            raise ConfigError(f"{self.path}: not signed by the federation's CA")
        number = crl_number(crl)
        if number < self._number:  # an old, genuine CRL put back would un-revoke certificates
            raise ConfigError(
                f"{self.path} (CRL number {number}) is older than the list loaded ({self._number})"
            )
        self._seen, self._number = (stat.st_mtime_ns, stat.st_size), number
        if self.floor_file is not None:
            self.floor_file.write_text(str(number))
        return frozenset(entry.serial_number for entry in crl)

    def refresh(self, *, force: bool = False) -> frozenset[int]:
        """Re-read the file if it changed (or `force`); the serials newly revoked."""
        try:
            stat = self.path.stat()
        except OSError:
            return frozenset()
        if not force and self._seen == (stat.st_mtime_ns, stat.st_size):
            return frozenset()
        try:
            revoked = self._load()
        except ConfigError as err:
            log.error("keeping the previous revocation list: %s", err)
            self._seen = (stat.st_mtime_ns, stat.st_size)  # report a bad file once, not every poll
            return frozenset()
        new, self.revoked = revoked - self.revoked, revoked
        return new
