"""The audit log: an append-only, hash-chained record of every message's life, for auditors.

Separate from the operational log on purpose: it has a fixed schema
(``events``), is written durably before the client hears 250 (``writer``),
can prove it was not edited (``chain``), and is searched and reported on
without loading it into anything (``search``, ``render``, ``commands``).
"""

from relay.audit.chain import Problem, VerifyResult, load_key, verify
from relay.audit.writer import AuditError, AuditLog

__all__ = ["AuditError", "AuditLog", "Problem", "VerifyResult", "load_key", "verify"]
