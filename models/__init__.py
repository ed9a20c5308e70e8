"""Atelier's SQL store: SQLAlchemy 2.0 typed ORM models and the repositories over them.

Repositories return plain dataclasses (``models.records``), never ORM rows.
"""

from models.base import Base
from models.delivery_store import ActionToken, ThreadRoute
from models.governance import AuditEntry, Ban, QuotaLedger, QuotaOverride, QuotaUsage, WordRule
from models.identity_store import IdentityLink, LinkCode
from models.preferences import Preference
from models.styles import SavedPreset, SavedStyle
from models.tables import Generation, Image, User

__all__ = [
    "ActionToken",
    "AuditEntry",
    "Ban",
    "Base",
    "Generation",
    "IdentityLink",
    "Image",
    "LinkCode",
    "Preference",
    "QuotaLedger",
    "QuotaOverride",
    "QuotaUsage",
    "SavedPreset",
    "SavedStyle",
    "ThreadRoute",
    "User",
    "WordRule",
]
