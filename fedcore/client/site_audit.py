"""A site's tamper-evident audit log (fedcore.audit): every job it took or declined, every
contribution it sent with the model it trained from and the privacy it spent, every round
it refused and why. Kept in the site's kit folder unless site.toml says otherwise."""

from __future__ import annotations

from pathlib import Path

from fedcore.audit import AuditKind, AuditLog, key_signer
from fedcore.engine import Instruction, InstructionKind, Reply
from fedcore.engine.model_file import model_digest
from fedcore.proto.v1 import federation_pb2 as pb


class SiteAudit:
    def __init__(self, path: Path, *, key_pem: bytes | None) -> None:
        """`key_pem`: the site's certificate key, which signs the log's head (None: unsigned)."""
        self.log = AuditLog(path, sign=key_signer(key_pem) if key_pem is not None else None)

    def accepted(self, welcome: pb.Welcome, server: str) -> None:
        identity = welcome.task_identity
        self.log.append(
            AuditKind.JOB_ACCEPTED,
            run=welcome.run_id,
            server=server,
            task=welcome.task,
            package=identity.package,
            version=identity.version,
            code_hash=identity.code_hash,
        )

    def declined(self, run: str, why: str) -> None:
        self.log.append(AuditKind.JOB_DECLINED, run=run, reason=why)

    def handled(self, run: str, instruction: Instruction, reply: Reply) -> None:
        """A contribution with the model it was trained from (its SHA-256 is what the
        server's log gives the previous round's model) and the privacy it spent; or a
        refusal and why. Secure-aggregation key exchanges and evaluations are not logged."""
        if instruction.kind not in (InstructionKind.FIT, InstructionKind.STATISTICS):
            return
        if reply.refusal:
            self.log.append(AuditKind.REFUSED_ROUND, run=run, round=instruction.round, reason=reply.refusal)
            return
        model = (
            model_digest(instruction.round - 1, instruction.parameters) if instruction.parameters else None
        )
        self.log.append(
            AuditKind.CONTRIBUTED,
            run=run,
            round=instruction.round,
            instruction=instruction.kind.value,
            model_sha256=model,
            epsilon=reply.metrics.get("epsilon"),
        )
