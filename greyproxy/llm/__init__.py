"""LLM conversation tracking (SPEC §13): dissectors, endpoint rules, assembly, token usage.

Everything here is pure (no I/O); the maintenance process (services/maintenance/assembler.py)
reads stored transactions, runs it, and writes conversations.
"""

# Bumped whenever the assembled output changes: a stored version below it makes maintenance
# start the rebuild-conversations job by itself (SPEC §13.1).
# 2: requests whose body did not parse keep their thread; thinking previews cut once.
ASSEMBLER_VERSION = 2
