"""Who a SecAgg+ message comes from, whatever the server says: every site signs what it
commits to (its advertised keys, the survivor set it agrees to unmask) with the key of its
certificate, and checks its neighbours' signatures against the federation's CA. A server
that substitutes a neighbour's keys, or shows sites different survivor sets, cannot make
the signatures match.

A credential is what proves a signer's key: its certificate (PEM) in a deployment, the raw
public key in a simulation (`LocalAuthority`, where one process is every party anyway).
Signed data is length-prefixed, so that no two different messages sign the same bytes.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

SIGNATURE = ec.ECDSA(hashes.SHA256())
MAX_CREDENTIAL = 8192  # bytes: a certificate, or a public key


def signed_bytes(purpose: str, *parts: str | bytes | Iterable[str]) -> bytes:
    """An unambiguous encoding of what is signed: each part length-prefixed."""
    out = bytearray(b"fedcore secagg+ v2\0")
    for part in (purpose, *parts):
        if isinstance(part, str):
            data = part.encode()
        elif isinstance(part, bytes):
            data = part
        else:
            data = "\0".join(sorted(part)).encode()
        out += len(data).to_bytes(8, "big") + data
    return bytes(out)


class Signer(Protocol):
    credential: bytes

    def sign(self, data: bytes) -> bytes: ...


class Verifier(Protocol):
    def verify(self, site: str, credential: bytes, signature: bytes, data: bytes) -> bool:
        """Whether `signature` over `data` is `site`'s, proven by `credential`."""
        ...


@dataclass(frozen=True)
class Identity:
    """A site's signer and its verifier of the others."""

    signer: Signer
    verifier: Verifier


class KeySigner:
    def __init__(self, key: ec.EllipticCurvePrivateKey, credential: bytes) -> None:
        self._key = key
        self.credential = credential

    def sign(self, data: bytes) -> bytes:
        return self._key.sign(data, SIGNATURE)


def _valid(public: ec.EllipticCurvePublicKey, signature: bytes, data: bytes) -> bool:
    try:
        public.verify(signature, data, SIGNATURE)
        return True
    except (InvalidSignature, ValueError):
        return False


def _site_certificate(cert: x509.Certificate) -> bool:
    """A site's certificate: for client authentication only, and no CA."""
    try:
        purposes = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False
    return list(purposes) == [ExtendedKeyUsageOID.CLIENT_AUTH] and not ca


class CertificateVerifier:
    """Credentials are certificates the federation's CA issued to the site's name, valid now."""

    def __init__(self, ca_pem: bytes) -> None:
        self.ca = x509.load_pem_x509_certificate(ca_pem)
        self._checked: dict[bytes, ec.EllipticCurvePublicKey | None] = {}  # digest -> key

    def _key(self, site: str, credential: bytes) -> ec.EllipticCurvePublicKey | None:
        digest = hashlib.sha256(site.encode() + b"\0" + credential).digest()
        if digest not in self._checked:
            self._checked[digest] = self._load(site, credential)
        return self._checked[digest]

    def _load(self, site: str, credential: bytes) -> ec.EllipticCurvePublicKey | None:
        if len(credential) > MAX_CREDENTIAL:
            return None
        try:
            cert = x509.load_pem_x509_certificate(credential)
            cert.verify_directly_issued_by(self.ca)
            names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        except (ValueError, TypeError, InvalidSignature):
            return None
        now = dt.datetime.now(dt.UTC)
        key = cert.public_key()
        if (
            len(names) != 1
            or names[0].value != site
            or not _site_certificate(cert)  # not the server's (it would sign as a fake site)
            or not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc
            or not isinstance(key, ec.EllipticCurvePublicKey)
        ):
            return None
        return key

    def verify(self, site: str, credential: bytes, signature: bytes, data: bytes) -> bool:
        key = self._key(site, credential)
        return key is not None and _valid(key, signature, data)


def certificate_identity(key_pem: bytes, certificate_pem: bytes, ca_pem: bytes) -> Identity:
    """A deployed site's identity: its TLS key and certificate, and the federation's CA."""
    key = serialization.load_pem_private_key(key_pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError("a site's key must be an EC key (fedcore pki writes P-256)")
    return Identity(KeySigner(key, certificate_pem), CertificateVerifier(ca_pem))


class LocalAuthority:
    """A simulation's identities: one P-256 key per site, derived from the run's seed, and a
    directory of their public keys (every virtual site lives in this process: no secret is
    kept from anyone here; the checks run so that a simulation runs the deployed protocol)."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self._keys: dict[str, ec.EllipticCurvePrivateKey] = {}
        self._public: dict[str, tuple[bytes, ec.EllipticCurvePublicKey]] = {}

    @classmethod
    @functools.cache
    def shared(cls, seed: int) -> LocalAuthority:
        """One authority per seed and process: virtual sites are rebuilt for every
        instruction, their keys are derived once."""
        return cls(seed)

    def _key(self, site: str) -> ec.EllipticCurvePrivateKey:
        if site not in self._keys:
            digest = hashlib.sha256(f"fedcore simulated identity|{self.seed}|{site}".encode()).digest()
            order = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551  # P-256's n
            self._keys[site] = ec.derive_private_key(int.from_bytes(digest) % (order - 1) + 1, ec.SECP256R1())
        return self._keys[site]

    def _public_key(self, site: str) -> tuple[bytes, ec.EllipticCurvePublicKey]:
        if site not in self._public:
            key = self._key(site).public_key()
            encoded = key.public_bytes(
                serialization.Encoding.X962, serialization.PublicFormat.CompressedPoint
            )
            self._public[site] = (encoded, key)
        return self._public[site]

    def public(self, site: str) -> bytes:
        return self._public_key(site)[0]

    def identity(self, site: str) -> Identity:
        return Identity(KeySigner(self._key(site), self.public(site)), self)

    def verify(self, site: str, credential: bytes, signature: bytes, data: bytes) -> bool:
        encoded, key = self._public_key(site)
        return credential == encoded and _valid(key, signature, data)
