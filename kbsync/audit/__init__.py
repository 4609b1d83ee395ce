"""The audit log of edits (SQLModel over SQLite or PostgreSQL)."""

from kbsync.audit.log import AuditError, AuditLog, mask_url
from kbsync.audit.models import CHECK_KINDS, SOURCES, STATUSES, Edit, EditCheck

__all__ = ["AuditError", "AuditLog", "CHECK_KINDS", "Edit", "EditCheck", "SOURCES", "STATUSES", "mask_url"]
