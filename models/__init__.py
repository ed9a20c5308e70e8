"""Atelier's SQL store: SQLAlchemy 2.0 typed ORM models and the repositories over them.

Repositories return plain dataclasses (``models.records``), never ORM rows.
"""

from models.base import Base
from models.tables import Generation, Image, User

__all__ = ["Base", "Generation", "Image", "User"]
