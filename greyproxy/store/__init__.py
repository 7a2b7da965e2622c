"""SQLite store: connection setup, numbered migrations, peewee models."""

from .db import open_database, database
from . import models

__all__ = ["open_database", "database", "models"]
