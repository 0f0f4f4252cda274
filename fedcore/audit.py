"""Tamper-evident audit logs: append-only JSON lines, hash-chained, with a signed head.

Every entry carries its sequence number, the hash of the entry before it and its own hash
(SHA-256 over its canonical JSON without that field): editing, inserting, reordering or
removing an entry breaks the chain from there on. Cutting the tail leaves a valid chain, so
after every append the log's head (last sequence number and hash) is written beside it
(`FILE.head`), signed with the party's certificate key when it has one: a log shorter than
its head, or a head whose signature does not verify, is tampered.

`fedcore audit verify FILE [--certificate CERT]` exits 0 for an intact log, 1 for a tampered
one (naming the first bad entry), 2 for bad usage.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import enum
import hashlib
import json
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GENESIS = "0" * 64
MAX_TEXT = 500  # a peer's text in an entry (a refusal reason) is capped


class AuditKind(enum.StrEnum):
    LOG_OPENED = "log opened"
    CONNECTION_ACCEPTED = "connection accepted"
    CONNECTION_REFUSED = "connection refused"
    JOB_DECLINED = "job declined"  # a site's policy refused the job
    ROUND = "round"  # server: a round's aggregate became the model
    JOB_ACCEPTED = "job accepted"  # site: it took a run's job
    CONTRIBUTED = "contributed"  # site: it sent a round's contribution
    REFUSED_ROUND = "refused round"  # site: it refused an instruction
    REVOKED = "revoked"
    EXCLUDED = "excluded"  # server: a site that misbehaved is kept out of the rest of the run


def _digest(entry: dict[str, Any]) -> str:
    body = {k: v for k, v in entry.items() if k != "hash"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _head_bytes(seq: int, digest: str) -> bytes:
    return f"fedcore audit head|{seq}|{digest}".encode()


def _text(value: Any) -> Any:
    """Site-supplied text is capped and kept printable before it reaches the file."""
    if isinstance(value, str):
        return "".join(c if c.isprintable() else "?" for c in value[:MAX_TEXT])
    return value


class AuditLog:
    """One party's log; `sign`: its certificate key's signature over the head (None: unsigned)."""

    def __init__(self, path: Path, *, sign: Callable[[bytes], bytes] | None = None) -> None:
        self.path = Path(path)
        self.head = self.path.with_name(self.path.name + ".head")
        self._sign = sign
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._seq, self._prev = 0, GENESIS
        if self.path.exists():
            last = _last_line(self.path)
            if last:
                entry = json.loads(last)
                self._seq, self._prev = int(entry["seq"]), str(entry["hash"])
        self.append(AuditKind.LOG_OPENED, pid=os.getpid())

    def append(self, kind: AuditKind, **data: Any) -> None:
        with self._lock:
            seq = self._seq + 1
            entry: dict[str, Any] = {
                "seq": seq,
                "time": dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds"),
                "kind": kind.value,
                "data": {k: _text(v) for k, v in data.items()},
                "prev": self._prev,
            }
            entry["hash"] = _digest(entry)
            with self.path.open("ab") as f:
                size = f.tell()
                try:
                    f.write((json.dumps(entry, sort_keys=True, separators=(",", ":")) + "\n").encode())
                    f.flush()
                    os.fsync(f.fileno())
                except OSError:  # not durable: cut it, so that a retry writes this seq once
                    with contextlib.suppress(OSError):
                        f.truncate(size)
                    raise
            self._seq, self._prev = seq, str(entry["hash"])
            self._write_head()

    def _write_head(self) -> None:
        head: dict[str, Any] = {"seq": self._seq, "hash": self._prev}
        if self._sign is not None:
            head["signature"] = self._sign(_head_bytes(self._seq, self._prev)).hex()
        scratch = self.head.with_name(self.head.name + ".tmp")
        scratch.write_text(json.dumps(head, sort_keys=True) + "\n")
        os.replace(scratch, self.head)


def _last_line(path: Path) -> str:
    with path.open("rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(0, size - 65536))
        lines = f.read().decode("utf-8", errors="replace").strip().splitlines()
    return lines[-1] if lines else ""


@dataclass(frozen=True)
class Verdict:
    entries: int
    bad: int | None = None  # the first bad entry's line number (1-based), or None
    reason: str = ""

    @property
    def intact(self) -> bool:
        return self.bad is None


def verify(path: Path, *, verify_head: Callable[[bytes, bytes], bool] | None = None) -> Verdict:
    """Check the chain and the head. `verify_head(signature, data)`: the party's public key's
    check of the head's signature (None: the head's signature is not checked)."""
    seq, prev, count = 0, GENESIS, 0
    with Path(path).open(encoding="utf-8", errors="replace") as f:
        for line_number, line in enumerate(f, start=1):
            try:
                entry = json.loads(line)
                ok = (
                    isinstance(entry, dict)
                    and entry.get("seq") == seq + 1
                    and entry.get("prev") == prev
                    and entry.get("hash") == _digest(entry)
                )
            except json.JSONDecodeError:
                ok = False
            if not ok:
                return Verdict(
                    count,
                    line_number,
                    "entry does not follow the one before (edited, inserted, moved or removed)",
                )
            seq, prev, count = int(entry["seq"]), str(entry["hash"]), count + 1
    head_path = Path(path).with_name(Path(path).name + ".head")
    if not head_path.exists():
        return Verdict(count, count + 1, "the head file is missing")
    try:
        head = json.loads(head_path.read_text())
        head_seq, head_hash = int(head["seq"]), str(head["hash"])
    except (ValueError, KeyError, TypeError):
        return Verdict(count, count + 1, "the head file is unreadable")
    try:
        signature = bytes.fromhex(str(head.get("signature", "")))
    except ValueError:
        signature = b""  # not hex: it verifies against nothing
    if verify_head is not None and not verify_head(signature, _head_bytes(head_seq, head_hash)):
        return Verdict(count, count + 1, "the head's signature does not verify")
    if head_seq > seq:
        return Verdict(
            count, seq + 1, f"the log ends at entry {seq}, its head says {head_seq}: entries were cut"
        )
    if head_seq < seq or head_hash != prev:
        return Verdict(count, head_seq + 1, "the log goes past or differs from its head")
    return Verdict(count)


def key_signer(key_pem: bytes) -> Callable[[bytes], bytes]:
    """Head signatures with a party's EC private key (its TLS key)."""
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = serialization.load_pem_private_key(key_pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError("audit heads are signed with an EC key (fedcore pki writes P-256)")
    return lambda data: key.sign(data, ec.ECDSA(hashes.SHA256()))


def certificate_check(pem: bytes) -> Callable[[bytes, bytes], bool]:
    """A head-signature check with the public key of a certificate (the party's own)."""
    from cryptography import x509
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    key = x509.load_pem_x509_certificate(pem).public_key()

    def check(signature: bytes, data: bytes) -> bool:
        if not isinstance(key, ec.EllipticCurvePublicKey):
            return False
        try:
            key.verify(signature, data, ec.ECDSA(hashes.SHA256()))
            return True
        except (InvalidSignature, ValueError):
            return False

    return check


def add_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    audit = sub.add_parser("audit", help="check a tamper-evident audit log")
    asub = audit.add_subparsers(dest="audit_command", required=True)
    check = asub.add_parser("verify", help="exit 0 if FILE is intact, 1 if it was tampered with")
    check.add_argument("file")
    check.add_argument("--certificate", help="the party's certificate: its head signature is checked")
    check.set_defaults(run=_verify)


def _verify(args: argparse.Namespace) -> int:
    from fedcore.errors import ConfigError

    path = Path(args.file)
    if not path.is_file():
        raise ConfigError(f"{path} is not an audit log")
    check = certificate_check(Path(args.certificate).read_bytes()) if args.certificate else None
    verdict = verify(path, verify_head=check)
    if verdict.intact:
        print(f"{path}: intact, {verdict.entries} entries")
        return 0
    print(f"{path}: TAMPERED at entry {verdict.bad}: {verdict.reason}")
    return 1
