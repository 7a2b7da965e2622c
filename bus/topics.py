"""Every bus topic, listed once. docs/events.md documents each payload for outsiders."""

# Service liveness (every process, once per heartbeat interval).
SERVICE_HEARTBEAT = "service.heartbeat"

# Pending queue (SPEC §3).
PENDING_CREATED = "pending_request.created"
PENDING_UPDATED = "pending_request.updated"
PENDING_ALLOWED = "pending_request.allowed"
PENDING_DISMISSED = "pending_request.dismissed"
WAITERS_CHANGED = "waiters.changed"

# Rules (SPEC §2.4).
RULE_CREATED = "rule.created"
RULE_UPDATED = "rule.updated"
RULE_DELETED = "rule.deleted"
RULES_CHANGED = "rules.changed"  # internal nudge: the rule set changed (ingest, expiry, hits excluded)

# Traffic.
LOG_NEW = "log.new"
TRANSACTION_NEW = "transaction.new"

# Modes and settings.
ALLOWALL_CHANGED = "allowall.changed"
SETTINGS_CHANGED = "settings.changed"
NOTIFICATION_CLAIMS_CHANGED = "notification.claims_changed"

# Maintenance.
MAINTENANCE_PROGRESS = "maintenance.progress"

# LLM conversations (SPEC §13.8).
CONVERSATION_NEW = "conversation.new"
CONVERSATION_UPDATED = "conversation.updated"
CONVERSATION_DELETED = "conversation.deleted"
TRANSACTIONS_STORED = "transactions.stored"  # internal: the recorder committed a batch with transactions

# Proxy workers (SPEC §15): an ip -> name one worker's DNS proxy learned, for the others.
DNS_NAME = "dns.name"

# Health (SPEC §5, §11): made by the API for its /ws clients when a process's state changes (the
# dashboard's health, with no polling); never on the bus, which may be what went down.
HEALTH_CHANGED = "health.changed"

# Claimed identities (SPEC §16): names and versions only, never a secret nor its hash.
IDENTITY_CHANGED = "identity.changed"
IDENTITY_REFUSED = "identity.refused"

# Credential substitution (SPEC §12.7): session events carry the session id string, never a value.
SESSION_CREATED = "session.created"
SESSION_HEARTBEAT = "session.heartbeat"
SESSION_DELETED = "session.deleted"
SESSION_EXPIRED = "session.expired"
SESSION_SUBSTITUTION = "session.substitution"
CREDENTIAL_CREATED = "credential.created"
CREDENTIAL_DELETED = "credential.deleted"
CREDENTIAL_REFUSED = "credential.refused"

# Public events: forwarded to /ws clients. Internal ones stay on the bus.
PUBLIC = (
    PENDING_CREATED,
    PENDING_UPDATED,
    PENDING_ALLOWED,
    PENDING_DISMISSED,
    WAITERS_CHANGED,
    RULE_CREATED,
    RULE_UPDATED,
    RULE_DELETED,
    LOG_NEW,
    TRANSACTION_NEW,
    ALLOWALL_CHANGED,
    SETTINGS_CHANGED,
    MAINTENANCE_PROGRESS,
    NOTIFICATION_CLAIMS_CHANGED,
    CONVERSATION_NEW,
    CONVERSATION_UPDATED,
    CONVERSATION_DELETED,
    IDENTITY_CHANGED,
    IDENTITY_REFUSED,
    SESSION_CREATED,
    SESSION_HEARTBEAT,
    SESSION_DELETED,
    SESSION_EXPIRED,
    SESSION_SUBSTITUTION,
    CREDENTIAL_CREATED,
    CREDENTIAL_DELETED,
    CREDENTIAL_REFUSED,
    HEALTH_CHANGED,
)
INTERNAL = (SERVICE_HEARTBEAT, RULES_CHANGED, TRANSACTIONS_STORED, DNS_NAME)
ALL = PUBLIC + INTERNAL
