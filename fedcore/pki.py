"""`fedcore pki`: a private CA for one federation, the server's certificate, and one
certificate per site. A site's identity is the common name of its certificate.

At the coordinator's CA (keep CA_DIR off the server: it needs only the four public-or-server
files below):

    CA_DIR/ca.crt  CA_DIR/ca.key (passphrase-protected if asked)  CA_DIR/crl.pem
    CA_DIR/server.crt  CA_DIR/server.key  CA_DIR/issued/SERIAL.crt (every certificate issued)

At a site, its kit folder: `site.key` is generated there by `pki request` and never leaves
it; `site.crt` and `ca.crt` come back from the CA (`pki sign`). `pki add-site` makes a whole
kit at the CA instead (its key is then born on the CA's machine): a shortcut for local demos
and tests only.
"""

from __future__ import annotations

import datetime as dt
import getpass
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fedcore.certificates import (
    VALIDITY,
    crl_number,
    make_certificate,
    make_crl,
    new_key,
    pem,
    pem_key,
    write_file,
)
from fedcore.errors import ConfigError

SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
PASSPHRASE_VARIABLE = "FEDCORE_CA_PASSPHRASE"
CA_NAME = "fedcore CA"


@dataclass(frozen=True)
class TlsFiles:
    """PEM bytes for one end of a mutual-TLS connection."""

    ca: bytes
    certificate: bytes
    key: bytes


def ask_passphrase(*, confirm: bool = False) -> bytes:
    """The CA key's passphrase: $FEDCORE_CA_PASSPHRASE, else asked at the terminal."""
    given = os.environ.get(PASSPHRASE_VARIABLE)
    if given:
        return given.encode()
    if not sys.stdin.isatty():
        raise ConfigError(
            f"the CA key is protected by a passphrase: set {PASSPHRASE_VARIABLE} or run in a terminal"
        )
    first = getpass.getpass("CA key passphrase: ")
    if confirm and getpass.getpass("again: ") != first:
        raise ConfigError("the two passphrases differ")
    if not first:
        raise ConfigError("an empty passphrase protects nothing")
    return first.encode()


def init(directory: Path, hosts: list[str], *, passphrase: bytes | None = None) -> None:
    """Create the CA (its key encrypted under `passphrase` if given), an empty CRL, and the
    server's certificate for `hosts` (names or IP addresses)."""
    if (directory / "ca.key").exists():
        raise ConfigError(f"{directory} already holds a CA; use another directory or `fedcore pki add-site`")
    if not hosts:
        raise ConfigError("give the server's host name or address with --host")
    ca_key = new_key()
    ca_cert = make_certificate(CA_NAME, ca_key.public_key(), None, ca_key, ca=True)
    server_key = new_key()
    server_cert = make_certificate(hosts[0], server_key.public_key(), ca_cert, ca_key, server_hosts=hosts)
    write_file(directory / "ca.key", pem_key(ca_key, passphrase), secret=True)
    write_file(directory / "ca.crt", pem(ca_cert))
    write_file(directory / "crl.pem", make_crl(ca_cert, ca_key, []))
    write_file(directory / "server.key", pem_key(server_key), secret=True)
    write_file(directory / "server.crt", pem(server_cert))


@dataclass(frozen=True)
class _Authority:
    directory: Path
    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @classmethod
    def open(cls, directory: Path) -> _Authority:
        try:
            key_pem = (directory / "ca.key").read_bytes()
            cert = x509.load_pem_x509_certificate((directory / "ca.crt").read_bytes())
        except FileNotFoundError:
            raise ConfigError(
                f"{directory} holds no CA key; run `fedcore pki init {directory} --host HOST` "
                "(or run this where the CA key is kept)"
            ) from None
        try:
            key = serialization.load_pem_private_key(key_pem, password=None)
        except TypeError:  # encrypted
            try:
                key = serialization.load_pem_private_key(key_pem, password=ask_passphrase())
            except ValueError:
                raise ConfigError("wrong passphrase for the CA key") from None
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        authority = cls(directory, cert, key)
        authority._adopt_kits()
        return authority

    def _adopt_kits(self) -> None:
        """Certificates of kits made before `issued/` existed join it: they can be revoked,
        and they hold their names like any other."""
        for path in sorted(self.directory.glob("sites/*/site.crt")):
            cert = x509.load_pem_x509_certificate(path.read_bytes())
            record = self.directory / "issued" / f"{cert.serial_number:x}.crt"
            if cert.issuer == self.certificate.subject and not record.exists():
                write_file(record, pem(cert))

    def issue(
        self, name: str, public_key: ec.EllipticCurvePublicKey, validity: dt.timedelta
    ) -> x509.Certificate:
        if validity < dt.timedelta(days=1):
            raise ConfigError("a certificate must be valid for at least one day")
        cert = make_certificate(name, public_key, self.certificate, self.key, validity=validity)
        write_file(self.directory / "issued" / f"{cert.serial_number:x}.crt", pem(cert))
        return cert

    def issued(self) -> list[x509.Certificate]:
        folder = self.directory / "issued"
        files = sorted(folder.glob("*.crt")) if folder.is_dir() else []
        return [x509.load_pem_x509_certificate(f.read_bytes()) for f in files]

    def crl(self) -> x509.CertificateRevocationList:
        try:
            crl = x509.load_pem_x509_crl((self.directory / "crl.pem").read_bytes())
        except FileNotFoundError:  # a CA made before revocation existed
            return x509.load_pem_x509_crl(make_crl(self.certificate, self.key, []))
        if not crl.is_signature_valid(self.key.public_key()):  # never re-sign what we did not sign
            raise ConfigError(
                f"{self.directory / 'crl.pem'} is not signed by this CA; restore it from a backup"
            )
        return crl

    def revoked_serials(self) -> set[int]:
        return {entry.serial_number for entry in self.crl()}

    def active(self, name: str) -> list[x509.Certificate]:
        """Certificates for `name` that are neither revoked nor expired."""
        now, revoked = dt.datetime.now(dt.UTC), self.revoked_serials()
        return [
            c
            for c in self.issued()
            if certificate_subject(c) == name
            and c.serial_number not in revoked
            and c.not_valid_after_utc > now
        ]


def _check_name(name: str) -> None:
    if not SITE_NAME.match(name) or name == CA_NAME:
        raise ConfigError(f"site name {name!r} must be 1-63 letters, digits, '.', '_' or '-'")


def add_site(directory: Path, name: str) -> Path:
    """Demo shortcut: write the whole kit of site `name`, key included, at the CA."""
    _check_name(name)
    authority = _Authority.open(directory)
    kit = directory / "sites" / name
    if kit.exists() or authority.active(name):
        raise ConfigError(f"site {name!r} already has a kit or an active certificate; revoke it first")
    key = new_key()
    cert = authority.issue(name, key.public_key(), VALIDITY)
    write_file(kit / "ca.crt", pem(authority.certificate))
    write_file(kit / "site.crt", pem(cert))
    write_file(kit / "site.key", pem_key(key), secret=True)
    return kit


def request(kit: Path, name: str) -> Path:
    """At a site: generate its key in `kit` (it never leaves) and a certificate signing
    request naming the site; returns the CSR's path, the one file to send to the CA."""
    _check_name(name)
    if (kit / "site.key").exists():
        raise ConfigError(f"{kit} already holds a site key; renew its certificate instead of replacing it")
    key = new_key()
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .sign(key, hashes.SHA256())
    )
    write_file(kit / "site.key", pem_key(key), secret=True)
    write_file(kit / "site.csr", csr.public_bytes(serialization.Encoding.PEM))
    return kit / "site.csr"


def _deliver(authority: _Authority, cert: x509.Certificate, out: Path) -> None:
    """The certificate at `out`, with the CA's certificate beside it (the site's two files)."""
    write_file(out, pem(cert))
    beside = out.parent / "ca.crt"
    if beside.resolve() != (authority.directory / "ca.crt").resolve():
        write_file(beside, pem(authority.certificate))


def sign(ca_dir: Path, csr_path: Path, out: Path, *, days: int = VALIDITY.days) -> x509.Certificate:
    """At the CA: a site certificate for a CSR. Refuses a name that already holds an active
    certificate for another key (revoke that one first): one name, one key."""
    try:
        csr = x509.load_pem_x509_csr(csr_path.read_bytes())
    except (OSError, ValueError) as err:
        raise ConfigError(f"{csr_path}: not a certificate signing request ({err})") from None
    if not csr.is_signature_valid:
        raise ConfigError(f"{csr_path}: the request's signature does not verify")
    public_key = csr.public_key()
    if not (isinstance(public_key, ec.EllipticCurvePublicKey) and isinstance(public_key.curve, ec.SECP256R1)):
        raise ConfigError(f"{csr_path}: site keys must be ECDSA P-256 (`fedcore pki request` makes one)")
    names = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1:
        raise ConfigError(f"{csr_path}: the request must name exactly one site")
    name = str(names[0].value)
    _check_name(name)
    authority = _Authority.open(ca_dir)
    mine = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    for other in authority.active(name):
        theirs = other.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        if theirs != mine:
            raise ConfigError(
                f"site {name!r} already holds an active certificate (serial {other.serial_number:x}) "
                f"for another key; `fedcore pki revoke {ca_dir} {name}` first"
            )
    cert = authority.issue(name, public_key, dt.timedelta(days=days))
    _deliver(authority, cert, out)
    return cert


def renew(ca_dir: Path, cert_path: Path, out: Path, *, days: int = VALIDITY.days) -> x509.Certificate:
    """At the CA: a fresh certificate for the same site and key as `cert_path`, which must be
    this CA's, unrevoked and unexpired (an expired site makes a new request)."""
    authority = _Authority.open(ca_dir)
    try:
        old = x509.load_pem_x509_certificate(cert_path.read_bytes())
        old.verify_directly_issued_by(authority.certificate)
    except (OSError, ValueError, TypeError) as err:
        raise ConfigError(f"{cert_path}: not a certificate of this CA ({err})") from None
    except Exception as err:  # cryptography.exceptions.InvalidSignature
        raise ConfigError(f"{cert_path}: not a certificate of this CA ({type(err).__name__})") from None
    if old.serial_number in authority.revoked_serials():
        raise ConfigError(f"{cert_path} is revoked; the site needs a new request")
    if old.not_valid_after_utc <= dt.datetime.now(dt.UTC):
        raise ConfigError(
            f"{cert_path} expired on {old.not_valid_after_utc:%Y-%m-%d}; the site needs a new request"
        )
    public_key = old.public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    cert = authority.issue(certificate_subject(old), public_key, dt.timedelta(days=days))
    _deliver(authority, cert, out)
    return cert


def revoke(ca_dir: Path, name: str) -> list[int]:
    """At the CA: revoke every active certificate of site `name` and re-sign CA_DIR/crl.pem
    (copy it to the server's --pki folder when that is another machine). Returns the serials."""
    authority = _Authority.open(ca_dir)
    targets = authority.active(name)
    if not targets:
        raise ConfigError(f"no active certificate of site {name!r} was issued by {ca_dir}")
    now = dt.datetime.now(dt.UTC)
    current = authority.crl()
    entries = list(current)
    entries += [
        x509.RevokedCertificateBuilder().serial_number(c.serial_number).revocation_date(now).build()
        for c in targets
    ]
    write_file(
        ca_dir / "crl.pem", make_crl(authority.certificate, authority.key, entries, crl_number(current) + 1)
    )
    return [c.serial_number for c in targets]


def _read(directory: Path, cert: str, key: str) -> TlsFiles:
    try:
        return TlsFiles(
            ca=(directory / "ca.crt").read_bytes(),
            certificate=(directory / cert).read_bytes(),
            key=(directory / key).read_bytes(),
        )
    except FileNotFoundError as err:
        raise ConfigError(
            f"{directory} is missing {Path(err.filename).name}; see `fedcore pki --help`"
        ) from None


def server_files(directory: Path) -> TlsFiles:
    return _read(directory, "server.crt", "server.key")


def site_files(kit: Path) -> TlsFiles:
    return _read(kit, "site.crt", "site.key")


def certificate_subject(cert: x509.Certificate) -> str:
    return str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)
