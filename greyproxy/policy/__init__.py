"""Rule matching and decisions (SPEC §2) and pending-decision scopes (SPEC §3.2)."""

from .patterns import (
    ContainerPattern,
    DestinationPattern,
    DestKind,
    PortPattern,
    analyse_host,
    normalise_host,
    parse_ip,
    validate_container_pattern,
    validate_destination_pattern,
    validate_port_pattern,
)
from .ruleset import (
    ACTIONS,
    LAYERS,
    CompiledRule,
    Decision,
    Rule,
    RuleSet,
    builtin_rules,
    compile_rule,
    rule_summary,
    to_epoch,
)
from .scopes import SCOPES, parse_duration, registrable_domain, scope_patterns

__all__ = [
    "ACTIONS",
    "LAYERS",
    "SCOPES",
    "CompiledRule",
    "ContainerPattern",
    "Decision",
    "DestKind",
    "DestinationPattern",
    "PortPattern",
    "Rule",
    "RuleSet",
    "analyse_host",
    "builtin_rules",
    "compile_rule",
    "normalise_host",
    "parse_duration",
    "parse_ip",
    "registrable_domain",
    "rule_summary",
    "scope_patterns",
    "to_epoch",
    "validate_container_pattern",
    "validate_destination_pattern",
    "validate_port_pattern",
]
