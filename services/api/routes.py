"""Imports every REST area so each registers its routes with app.ROUTE_PROVIDERS."""

from . import allowall, logs, pending, rules, settings  # noqa: F401 - imported for their registration

__all__ = ["allowall", "logs", "pending", "rules", "settings"]
from . import certs  # noqa: E402,F401 - /api/cert/*
from . import maintenance  # noqa: E402,F401 - /api/maintenance/*
from . import transactions  # noqa: E402,F401 - /api/transactions
from . import export  # noqa: E402,F401 - /api/transactions/export.har
from . import metrics  # noqa: E402,F401 - /metrics
from . import llm  # noqa: E402,F401 - /api/dissectors, /api/endpoint-rules, /api/conversations (SPEC §13)
from . import ui  # noqa: E402,F401 - the dashboard (a sink after the routes: /, deep links, static/)
