"""What a site writes that the server keeps: its name, a refusal or a reason to decline, and the
names of its metrics. A site is not trusted to keep them short or on one line (a 1 MB
refusal with newlines forged a thousand log lines; 256 metric names of 14 KB grew
`metrics.jsonl` by megabytes), so every such text is cut and escaped here, where it
arrives, before any log, record or file sees it."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Final

from fedcore.engine.messages import METRIC_NAME
from fedcore.errors import ProtocolError
from fedcore.pki import SITE_NAME
from fedcore.proto.v1 import federation_pb2 as pb

log = logging.getLogger(__name__)

MAX_TEXT: Final = 300  # characters of a refusal or a reason kept (then "...")
MAX_METRICS: Final = 32  # metrics kept from one reply


def clean_text(text: str, limit: int = MAX_TEXT) -> str:
    """`text` on one printable line of at most `limit` characters (before escapes):
    newlines, terminal escapes and other control or separator characters as escapes."""
    cut = text[:limit]
    escaped = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in cut)
    return escaped + ("..." if len(text) > limit else "")


def clean_metrics(site: str, metrics: Mapping[str, float]) -> dict[str, float]:
    """The first MAX_METRICS metrics whose names are short identifiers; the rest are left
    out (and said so, once per reply, without repeating what the site wrote)."""
    kept = {name: value for name, value in metrics.items() if METRIC_NAME.match(name)}
    kept = dict(list(kept.items())[:MAX_METRICS])
    if len(kept) < len(metrics):
        log.warning(
            "site %s: %d of its %d metrics left out (names or number)",
            site,
            len(metrics) - len(kept),
            len(metrics),
        )
    return kept


def site_identity(hello: pb.Hello, certificate: Mapping[str, Any] | None) -> str:
    """The connecting site's name: its certificate's common name under mutual TLS (its
    `auth_context`), else the name its Hello gives; ProtocolError unless it is one `fedcore
    pki` would issue (no blank, newline or control character: a name reaches logs and files)."""
    if certificate is not None:
        names = certificate.get("x509_common_name", [])
        if len(names) != 1:
            raise ProtocolError("the client certificate names no site")
        name = bytes(names[0]).decode(errors="replace")
    else:
        name = hello.site_name
        if not name:
            raise ProtocolError("on an insecure connection the Hello must carry a site name")
    if not SITE_NAME.fullmatch(name):
        raise ProtocolError(f"the site name {clean_text(name, 80)!r} is not one `fedcore pki` issues")
    return name
