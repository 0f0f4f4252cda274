"""The federation's PKI as its CA and sites use it: keys born at the site (CSR), one name one
key, renewal, a passphrase on the CA key, and revocation lists the server trusts only when
the CA signed them and only forward in time."""

from __future__ import annotations

import datetime as dt
import os
import shutil
from pathlib import Path

import pytest
from cryptography import x509

from fedcore import pki
from fedcore.cli import main
from fedcore.errors import ConfigError
from fedcore.server.revocation import RevocationList


def _serial(path: Path) -> int:
    return x509.load_pem_x509_certificate(path.read_bytes()).serial_number


def test_a_csr_kit_keeps_its_key_at_the_site_and_the_server_folder_needs_no_ca_key(tmp_path: Path) -> None:
    ca, site, server = tmp_path / "ca", tmp_path / "hospital-a", tmp_path / "server"
    assert main(["pki", "init", str(ca), "--host", "127.0.0.1"]) == 0
    assert main(["pki", "request", str(site), "--name", "hospital-a"]) == 0
    key = (site / "site.key").read_bytes()
    assert (site / "site.key").stat().st_mode & 0o077 == 0
    assert main(["pki", "sign", str(ca), str(site / "site.csr"), "-o", str(site / "site.crt")]) == 0
    assert (site / "ca.crt").read_bytes() == (ca / "ca.crt").read_bytes()
    cert = x509.load_pem_x509_certificate((site / "site.crt").read_bytes())
    assert pki.certificate_subject(cert) == "hospital-a"
    assert cert.not_valid_after_utc - dt.datetime.now(dt.UTC) > dt.timedelta(days=800)
    assert [p for p in tmp_path.rglob("*") if p.is_file() and p.read_bytes() == key] == [site / "site.key"]
    server.mkdir()
    for name in ("ca.crt", "crl.pem", "server.crt", "server.key"):
        shutil.copy(ca / name, server / name)
    files = pki.server_files(server)  # what `fedcore server --pki` reads: no ca.key there
    assert files.ca == (ca / "ca.crt").read_bytes()
    assert RevocationList(server / "crl.pem", files.ca).revoked == frozenset()


def test_one_name_one_key_until_revoked(tmp_path: Path) -> None:
    ca = tmp_path / "ca"
    pki.init(ca, ["127.0.0.1"])
    first, second = tmp_path / "a1", tmp_path / "a2"
    pki.sign(ca, pki.request(first, "site-a"), first / "site.crt")
    with pytest.raises(ConfigError, match="already holds a site key"):
        pki.request(first, "site-a")  # a site never overwrites its key
    csr = pki.request(second, "site-a")
    with pytest.raises(ConfigError, match="already holds an active certificate"):
        pki.sign(ca, csr, second / "site.crt")
    assert pki.revoke(ca, "site-a") == [_serial(first / "site.crt")]
    pki.sign(ca, csr, second / "site.crt")  # the name is free again
    with pytest.raises(ConfigError, match="no active certificate"):
        pki.revoke(ca, "nobody")


def test_renew_keeps_the_key_and_refuses_revoked_or_foreign_certificates(tmp_path: Path) -> None:
    ca, other, kit = tmp_path / "ca", tmp_path / "other", tmp_path / "kit"
    pki.init(ca, ["127.0.0.1"])
    pki.init(other, ["127.0.0.1"])
    pki.sign(ca, pki.request(kit, "site-a"), kit / "site.crt", days=30)
    old = x509.load_pem_x509_certificate((kit / "site.crt").read_bytes())
    new = pki.renew(ca, kit / "site.crt", kit / "renewed.crt")
    assert new.public_key() == old.public_key() and new.serial_number != old.serial_number
    assert new.not_valid_after_utc > old.not_valid_after_utc
    with pytest.raises(ConfigError, match="not a certificate of this CA"):
        pki.renew(other, kit / "site.crt", kit / "x.crt")
    pki.revoke(ca, "site-a")
    with pytest.raises(ConfigError, match="revoked"):
        pki.renew(ca, kit / "renewed.crt", kit / "y.crt")


def test_the_ca_key_can_be_protected_by_a_passphrase(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ca = tmp_path / "ca"
    pki.init(ca, ["127.0.0.1"], passphrase=b"correct horse")
    assert b"ENCRYPTED PRIVATE KEY" in (ca / "ca.key").read_bytes()
    monkeypatch.delenv(pki.PASSPHRASE_VARIABLE, raising=False)
    with pytest.raises(ConfigError, match="passphrase"):  # no terminal under pytest
        pki.add_site(ca, "site-a")
    monkeypatch.setenv(pki.PASSPHRASE_VARIABLE, "wrong")
    with pytest.raises(ConfigError, match="wrong passphrase"):
        pki.add_site(ca, "site-a")
    monkeypatch.setenv(pki.PASSPHRASE_VARIABLE, "correct horse")
    assert (pki.add_site(ca, "site-a") / "site.key").exists()


def test_the_server_trusts_only_crls_its_ca_signed_and_never_an_older_one(tmp_path: Path) -> None:
    ca, other = tmp_path / "ca", tmp_path / "other"
    pki.init(ca, ["127.0.0.1"])
    pki.init(other, ["127.0.0.1"])
    ca_pem = (ca / "ca.crt").read_bytes()
    with pytest.raises(ConfigError, match="not signed by the federation's CA"):
        RevocationList(other / "crl.pem", ca_pem)
    (tmp_path / "junk.pem").write_bytes(b"not a crl")
    with pytest.raises(ConfigError, match="not a certificate revocation list"):
        RevocationList(tmp_path / "junk.pem", ca_pem)

    empty = (ca / "crl.pem").read_bytes()
    revocations = RevocationList(ca / "crl.pem", ca_pem)
    pki.add_site(ca, "site-a")
    serial = _serial(ca / "sites" / "site-a" / "site.crt")
    pki.revoke(ca, "site-a")
    assert revocations.refresh() == {serial} and serial in revocations.revoked
    assert revocations.refresh() == frozenset()  # unchanged file: nothing new
    newer = (ca / "crl.pem").read_bytes()
    (ca / "crl.pem").write_bytes(empty)  # the older, genuine list put back
    os.utime(ca / "crl.pem", ns=(1, 1))
    assert revocations.refresh() == frozenset() and serial in revocations.revoked
    shutil.copy(other / "crl.pem", ca / "crl.pem")  # a list from another CA
    assert revocations.refresh(force=True) == frozenset() and serial in revocations.revoked
    (ca / "crl.pem").write_bytes(newer)
    assert revocations.refresh(force=True) == frozenset()  # the same list again: nothing new


def test_kits_made_before_the_issued_record_can_be_revoked_and_hold_their_name(tmp_path: Path) -> None:
    """An upgraded CA adopts the certificates of kits it made earlier (sites/NAME/site.crt):
    revoking them works, and a second key for the name is refused."""
    ca = tmp_path / "ca"
    pki.init(ca, ["127.0.0.1"])
    kit = pki.add_site(ca, "st-marys")
    shutil.rmtree(ca / "issued")  # as a CA made before this record existed
    other = tmp_path / "other"
    with pytest.raises(ConfigError, match="already holds an active certificate"):
        pki.sign(ca, pki.request(other, "st-marys"), other / "site.crt")
    assert pki.revoke(ca, "st-marys") == [_serial(kit / "site.crt")]


def test_the_ca_never_re_signs_a_crl_it_did_not_sign(tmp_path: Path) -> None:
    ca, other = tmp_path / "ca", tmp_path / "other"
    pki.init(ca, ["127.0.0.1"])
    pki.init(other, ["127.0.0.1"])
    pki.add_site(ca, "site-a")
    shutil.copy(other / "crl.pem", ca / "crl.pem")
    with pytest.raises(ConfigError, match="not signed by this CA"):
        pki.revoke(ca, "site-a")


def test_the_server_remembers_the_newest_crl_across_restarts(tmp_path: Path) -> None:
    """The highest CRL number seen is kept in the run's state: after a restart, neither an
    older genuine list put back nor a deleted one un-revokes anything."""
    ca = tmp_path / "ca"
    pki.init(ca, ["127.0.0.1"])
    ca_pem, floor = (ca / "ca.crt").read_bytes(), tmp_path / "state-crl-number"
    empty = (ca / "crl.pem").read_bytes()
    pki.add_site(ca, "site-a")
    pki.revoke(ca, "site-a")
    first = RevocationList(ca / "crl.pem", ca_pem, floor)
    assert first.revoked and floor.read_text() == "2"
    (ca / "crl.pem").write_bytes(empty)  # restart with the older list put back
    with pytest.raises(ConfigError, match="older than the list loaded"):
        RevocationList(ca / "crl.pem", ca_pem, floor)
    (ca / "crl.pem").unlink()
    with pytest.raises(ConfigError, match="is missing; this run has used CRL number 2"):
        RevocationList(ca / "crl.pem", ca_pem, floor)
